"""The facts of the retained ``info`` message, taken from the running config."""

from __future__ import annotations

import hashlib
from typing import Any

from agent import __version__
from agent.clock import boot_id
from agent.config.model import AgentConfig
from agent.contract.payloads import InfoDevice, InfoPoint, InfoTelemetry, info
from drivers.serial_line import SerialLineDevice

SECRET_FIELDS: dict[str, Any] = {"mqtt": {"password"}}
"""Config members left out of the config hash (a hash of a short secret can be guessed)."""


_KNOWN: list[tuple[AgentConfig, str]] = []
"""The config last handed over by the checking process and its hash (computed there, so
the agent does not build the models' serializers to compute it again)."""


def remember_hash(cfg: AgentConfig, digest: str) -> None:
    """Take ``digest`` as :func:`config_hash` of this very object (not of equal ones)."""
    _KNOWN[:] = [(cfg, digest)]


def config_hash(cfg: AgentConfig) -> str:
    """``sha256:`` + hex digest of the running config as JSON (profiles merged, paths
    resolved, secrets left out): equal configs give equal hashes on every gateway."""
    for known, digest in _KNOWN:
        if known is cfg:
            return digest
    text = cfg.model_dump_json(exclude=SECRET_FIELDS)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def streams(dev: Any) -> bool:
    """Whether a device sends without being asked (a text-line sensor without ``request``,
    a seismic sensor): its availability is judged by silence, not by failed polls."""
    if isinstance(dev, SerialLineDevice):
        return dev.request is None
    return getattr(dev, "driver", "") == "seismic"


def info_points(dev: Any) -> list[InfoPoint]:
    """A device's points as ``info`` lists them, in config order: the order of the values
    of a compact telemetry message (:class:`agent.contract.compact.CompactEncoder`)."""
    return [
        InfoPoint(
            p.name,
            p.unit,
            str(p.type),
            getattr(p, "scale", 1),
            getattr(p, "offset", 0),
        )
        for p in dev.points
    ]


def gateway_info(cfg: AgentConfig, started_ms: int) -> bytes:
    """The ``info`` payload (:func:`agent.contract.payloads.info`) of this config."""
    devices = [
        InfoDevice(
            id=d.id,
            name=getattr(d, "name", None),
            driver=d.driver,
            bus=d.bus,
            poll_interval_s=None if streams(d) else float(getattr(d, "poll_interval", 0.0)),
            points=info_points(d),
        )
        for d in cfg.devices
    ]
    rules = []
    for r in cfg.alarms:
        for d in cfg.devices:
            if d.id == r.device or (r.profile is not None and d.profile == r.profile):
                rules.append((f"{d.id}/{r.id}", r.point, r.kind, r.severity))
    m = cfg.mqtt
    telemetry = InfoTelemetry(
        m.payload,
        None if m.compression == "none" else m.compression,
        m.max_batch_delay,
    )
    return info(
        cfg.gateway_id,
        __version__,
        config_hash(cfg),
        boot_id(),
        started_ms,
        devices,
        rules,
        telemetry,
    )
