"""The facts of the retained ``info`` message, taken from the running config."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.clock import boot_id
from agent.contract.payloads import InfoDevice, InfoPoint, InfoTelemetry, info
from drivers.kinds import is_serial_line

if TYPE_CHECKING:
    from agent.config.model import AgentConfig


_KNOWN: list[tuple[AgentConfig, str]] = []
"""The config last handed over by the checking process and its hash (computed there, so
the agent does not build the models' serializers to compute it again)."""


def remember_hash(cfg: AgentConfig, digest: str) -> None:
    """Take ``digest`` as :func:`config_hash` of this very object (not of equal ones)."""
    _KNOWN[:] = [(cfg, digest)]


def config_hash(cfg: AgentConfig) -> str:
    """``sha256:`` + hex digest of the running config as compact JSON of its fields
    (:func:`drivers.plain.plain_data`: profiles merged, paths resolved, secrets left out,
    since a hash of a short secret can be guessed): equal configs give equal hashes on
    every gateway, whether ``cfg`` is the validated model or its plain twin."""
    for known, digest in _KNOWN:
        if known is cfg:
            return digest
    from drivers.plain import Plain, plain_data

    if not isinstance(cfg, Plain):  # a model: the checking process, or the CLI
        from drivers.plain import to_plain

        cfg = to_plain(cfg)
    text = json.dumps(plain_data(cfg), separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def streams(dev: Any) -> bool:
    """Whether a device sends without being asked (a text-line sensor without ``request``,
    a seismic sensor): its availability is judged by silence, not by failed polls."""
    if is_serial_line(dev):
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
