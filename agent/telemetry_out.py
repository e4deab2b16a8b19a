"""Telemetry into the buffer, in the payload mode the config chose (``mqtt.payload``):
one encoder per device, and for compact payloads the batching of several polls of a device
into one message (``mqtt.max_batch_delay``) and the compression on the wire
(``mqtt.compression``). The buffer, the publisher's ordering and the alarms know nothing of
the mode: they see messages (topic, body, time), as before."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.contract.compact import CompactEncoder, Row, deflate
from agent.contract.info import info_points
from agent.contract.payloads import layout_hash
from agent.contract.telemetry import TelemetryEncoder
from agent.contract.topics import telemetry_topic
from drivers.base import PointResult

if TYPE_CHECKING:
    from agent.config.model import AgentConfig


Submit = Callable[[str, bytes, int, int, "int | None"], None]
""":meth:`agent.writer.BufferWriter.submit`: (topic, body, time ms, prio, clock epoch)."""

BATCH_MAX_BYTES = 32_768
"""Largest batch message (about, bytes): a batch that would grow beyond it is sent first.
Well under the packet limits brokers commonly set (128 KiB and up)."""
BATCH_MAX_ROWS = 1000
"""Most polls in one batch message."""


@dataclass(slots=True)
class _Batch:
    """The polls of one device waiting in memory for their message."""

    historical: bool
    epoch: int | None
    deadline: float
    """Monotonic time (s) at which the batch is sent."""
    rows: list[Row] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


class TelemetryOut:
    """Turns each device poll into telemetry for the buffer writer.

    ``verbose`` (``telemetry/1``) and ``compact`` (``telemetry_compact/1``) without
    batching: one message per poll, handed to ``submit`` at once. ``compact`` with
    ``max_batch_delay``: a device's polls are kept (as encoded rows) until the first of
    them is ``max_batch_delay`` old, then go to ``submit`` as one message with one
    ``seq``; a change of the ``historical`` flag or the clock epoch, or a batch reaching
    :data:`BATCH_MAX_BYTES` or :data:`BATCH_MAX_ROWS`, sends it earlier. Polls waiting
    in a batch are in memory only: a crash loses them (at most ``max_batch_delay`` of
    each device), a clean stop sends them (:meth:`flush`).

    Args:
        cfg: the running config (``mqtt.payload``, ``max_batch_delay``, ``compression``,
            ``topic_prefix``, the devices and their points).
        submit: where messages go (the buffer writer).
        kick: asks the writer to commit (after a batch sent by its timer).
    """

    def __init__(self, cfg: AgentConfig, submit: Submit, kick: Callable[[], None]) -> None:
        m = cfg.mqtt
        self._submit = submit
        self._kick = kick
        self._prefix = m.topic_prefix
        self._gateway = cfg.gateway_id
        self.topics: dict[str, str] = {}
        """Device id → its telemetry topic."""
        self.compact = m.payload == "compact"
        self.max_batch_delay = m.max_batch_delay if self.compact else 0.0
        self._encoders: dict[str, TelemetryEncoder | CompactEncoder] = {}
        self._compact: dict[str, CompactEncoder] = {}
        self._batches: dict[str, _Batch] = {}
        self._telemetry: set[str] = set()
        for d in cfg.devices:
            self.add_device(d)
        self.wire: Callable[[str, bytes], bytes] | None = None
        """For the publisher: the payload of a message as it goes on the wire (zlib for
        telemetry with ``compression: zlib``), None: as buffered."""
        if self.compact and m.compression == "zlib":
            telemetry = self._telemetry
            self.wire = lambda topic, payload: deflate(payload) if topic in telemetry else payload

    def add_device(self, dev: Any) -> None:
        """Encode the polls of ``dev`` from now on (at start, and for a device a config
        reload added or changed: a batch of its previous points is sent first)."""
        if dev.id in self._batches:
            self._send(dev.id)
        topic = telemetry_topic(self._prefix, self._gateway, dev.id)
        self.topics[dev.id] = topic
        self._telemetry.add(topic)
        if self.compact:
            points = info_points(dev)
            enc = CompactEncoder([p.name for p in points], layout_hash(points))
            self._compact[dev.id] = enc
            self._encoders[dev.id] = enc
        else:
            units = {p.name: p.unit for p in dev.points}
            self._encoders[dev.id] = TelemetryEncoder(self._gateway, dev.id, units)

    def forget_device(self, device: str) -> None:
        """``device`` was removed by a config reload: its waiting batch is sent, and its
        polls are no longer encoded."""
        if device in self._batches:
            self._send(device)
        topic = self.topics.pop(device, None)
        if topic is not None:
            self._telemetry.discard(topic)
        self._encoders.pop(device, None)
        self._compact.pop(device, None)

    def poll(
        self,
        device: str,
        ts_ms: int,
        results: Sequence[PointResult],
        deltas: Mapping[str, int] | None,
        historical: bool,
        epoch: int | None,
        texts: Sequence[str] | None = None,
    ) -> None:
        """One poll of ``device`` (UTC ms, its results, counter deltas): its message now,
        or its row into the device's batch. ``historical``: taken without a broker
        connection; ``epoch``: the untrusted clock's epoch that stamped it (None:
        trusted); ``texts``: :func:`agent.contract.telemetry.value_texts` of the results,
        when the caller made them."""
        if not self.max_batch_delay:
            enc = self._encoders[device]
            body = enc.encode(ts_ms, results, deltas, historical, epoch is not None, texts)
            self._submit(self.topics[device], body, ts_ms, 0, epoch)
            return
        row = self._compact[device].row(ts_ms, results, deltas, texts)
        now = time.monotonic()
        batch = self._batches.get(device)
        if batch is not None and (
            batch.historical != historical
            or batch.epoch != epoch
            or now >= batch.deadline
            or batch.size + row.size > BATCH_MAX_BYTES
            or len(batch.rows) >= BATCH_MAX_ROWS
        ):
            self._send(device)
            batch = None
        if batch is None:
            batch = _Batch(historical, epoch, now + self.max_batch_delay)
            batch.timer = asyncio.get_running_loop().call_later(
                self.max_batch_delay, self._due, device, batch
            )
            self._batches[device] = batch
        batch.rows.append(row)
        batch.size += row.size

    @property
    def waiting(self) -> int:
        """Polls waiting in memory for their batch's message."""
        return sum(len(b.rows) for b in self._batches.values())

    def _due(self, device: str, batch: _Batch) -> None:
        if self._batches.get(device) is batch:
            self._send(device)
            self._kick()

    def _send(self, device: str) -> None:
        batch = self._batches.pop(device)
        if batch.timer is not None:
            batch.timer.cancel()
        body = self._compact[device].message(batch.rows, batch.historical, batch.epoch is not None)
        self._submit(self.topics[device], body, batch.rows[0].ts_ms, 0, batch.epoch)

    def flush(self) -> None:
        """Send every waiting batch now (a clean stop, before the last commit)."""
        for device in list(self._batches):
            self._send(device)
