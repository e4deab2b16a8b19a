"""Build the agent from its config and run it on one asyncio loop until a stop signal.

Order of a clean stop (SIGTERM/SIGINT): stop polling → commit what was polled → wait briefly
for in-flight PUBACKs → delete acknowledged rows → publish retained ``offline`` and wait for
its PUBACK → DISCONNECT → close the buffer. Unsent rows stay in the buffer for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.alarms import Alarm, AlarmEngine, Event
from agent.buffer import (
    MEMORY_MAX_BYTES,
    AsyncBuffer,
    Buffer,
    BufferError,
    Restamp,
    Row,
    StateDirError,
    lock_state_dir,
    memory_buffer,
    open_buffer,
)
from agent.clock import RELEASE_DATE_MS, Clock
from agent.config.alarms import AlarmRule
from agent.config.model import AgentConfig
from agent.gpio import Gpio, desired_outputs
from agent.mqtt import MqttLink
from agent.pipeline import CounterTracker
from agent.poller import BusPoller
from agent.publisher import ALARMS_MAX, Publisher
from agent.readings import TelemetryEncoder, iso_ms, now_ms
from agent.seismic import SeismicOutput, SeismicProcessor
from agent.topics import (
    OFFLINE,
    alarm_state_topic,
    event_topic,
    health_topic,
    notice_topic,
    status_topic,
    telemetry_topic,
    waveform_topic,
)
from drivers.base import PointResult
from drivers.modbus.config import (
    ModbusDevice,
    ModbusRtuDevice,
    ModbusRtuOverTcpDevice,
    ModbusTcpDevice,
)
from drivers.modbus.driver import LineBus, ModbusBus, ModbusTcpBus
from drivers.modbus.line import SerialLine
from drivers.seismic_stream import SeismicDevice, SeismicSerialReader, SeismicUdpReader
from drivers.serial_line import SerialLineDevice, SerialLineReader

log = logging.getLogger(__name__)

STOP_BUDGET_S = 5.0
TIME_KEYS = frozenset({"onset", "end", "start", "pga_at", "pgv_at", "peak_raw_at"})
"""Fields of seismic messages that are times (UTC ms inside, ISO 8601 on the wire)."""
HEALTH_S = 30.0
"""How often the health message is published."""
HEALTH_DRAINING_S = 2.0
"""How often while a backlog drains (its progress is the pending count)."""
ALARM_TICK_S = 0.5
"""How often time alone is let act on the alarms (delays, stale data)."""


def machine_suffix(path: Path = Path("/etc/machine-id")) -> str:
    """8 hex digits derived from the machine id, or ``""`` when there is none."""
    try:
        mid = path.read_text(encoding="ascii").strip()
    except OSError:
        return ""
    return hashlib.sha256(mid.encode()).hexdigest()[:8] if mid else ""


def default_client_id(gateway_id: str) -> str:
    """``<gateway_id>-<machine suffix>``: stable across reboots, distinct on cloned cards
    once their machine id is regenerated (``systemd-machine-id-setup``)."""
    suffix = machine_suffix()
    return f"{gateway_id}-{suffix}" if suffix else gateway_id


def make_bus(devices: list[ModbusDevice]) -> ModbusBus:
    """The driver object for the bus these devices share (all of one kind and bus).

    The bus's default timeout is the longest of its devices' (each poll passes its own
    device's timeout); a line keeps the longest ``frame_gap`` any of its devices asks for.
    """
    first = devices[0]
    timeout = max(d.timeout for d in devices)
    if isinstance(first, ModbusRtuDevice | ModbusRtuOverTcpDevice):
        gaps = [g for d in devices if (g := getattr(d, "frame_gap", None)) is not None]
        frame_gap = max(gaps) if gaps else None
        pause = max(getattr(d, "connect_pause", 0.0) for d in devices)
        if isinstance(first, ModbusRtuDevice):
            line = SerialLine(
                first.serial_port,
                first.framing,
                first.baudrate,
                first.parity,
                first.stopbits,
                first.bytesize,
                frame_gap=frame_gap,
                local_echo=first.local_echo,
                connect_pause=pause,
            )
        else:
            line = SerialLine(
                f"{first.host}:{first.port}",
                first.framing,
                frame_gap=frame_gap,
                connect_pause=pause,
                tcp=True,
            )
        return LineBus(line, timeout)
    assert isinstance(first, ModbusTcpDevice)
    return ModbusTcpBus(first.host, first.port, timeout)


class BufferWriter:
    """Collects polls and commits everything that is pending in one transaction.

    Polls arrive synchronously from bus tasks; a commit covers all polls that arrived while
    the previous commit ran (one transaction per cycle under load, per poll when idle).
    A failed commit (disk full, I/O error) is retried every second with the polls kept in
    memory, up to ``max_pending`` messages (beyond that the oldest are dropped and counted in
    :attr:`lost`).

    Attributes:
        on_commit: called with the committed rows and the buffer's ``dropped_upto`` after
            every successful commit (the publisher takes fresh rows from there instead of
            reading them back, and forgets rows the size cap deleted).
        handed_upto: the highest seq already given to the MQTT client (not counted as
            dropped when the size cap deletes it).
    """

    def __init__(
        self, buffer: AsyncBuffer, max_pending: int = 100_000, commit_every: float = 0.0
    ) -> None:
        self.buffer = buffer
        self.commit_every = commit_every
        """Least seconds between two commits (``buffer.commit_every``); alarm events and
        notices (``prio`` 1) are committed at once."""
        self._urgent = asyncio.Event()
        self.pending: list[tuple[str, bytes, int, int, int | None]] = []
        self.alarms: dict[str, str] = {}
        """Alarm states (JSON) committed with the next batch."""
        self.state: dict[tuple[str, str], int] = {}
        """Per-point state committed with the next batch (counters' last raw values)."""
        self.max_pending = max_pending
        self.lost = 0
        self.on_commit: Callable[[list[Row], int], None] = lambda rows, dropped_upto: None
        self.handed_upto: Callable[[], int] = lambda: 0
        self.on_drops: Callable[[list[tuple[int, int, int]]], None] = lambda reports: None
        """Called with the buffer cap's drop blocks (count, first seq, last seq)."""
        self.take_acked: Callable[[], list[int]] = list
        """Seqs the broker acknowledged, deleted in the next commit's transaction."""
        self.return_acked: Callable[[list[int]], None] = lambda seqs: None
        """Takes back what :attr:`take_acked` gave when the commit failed."""
        self.restamp_offset: int | None = None
        """Set to the synchronised clock's offset: the next commit re-stamps the buffered
        messages of untrusted clock epochs (:meth:`agent.buffer.Buffer.append_many`)."""
        self.on_restamps: Callable[[list[Restamp]], None] = lambda restamps: None
        self._event = asyncio.Event()
        self._lock = asyncio.Lock()
        self._failing = False

    def submit(
        self, topic: str, body: bytes, ts_ms: int, prio: int = 0, epoch: int | None = None
    ) -> None:
        """Queue one message for the next commit (never blocks); see :meth:`kick`.
        ``prio`` 1: an alarm event (published first, never dropped); ``epoch``: the clock
        epoch of a message stamped by an untrusted clock (:class:`agent.clock.Clock`)."""
        self.pending.append((topic, body, ts_ms, prio, epoch))
        if prio:
            self._urgent.set()
        if len(self.pending) > self.max_pending:
            oldest = next((i for i, m in enumerate(self.pending) if not m[3]), 0)
            del self.pending[oldest]
            self.lost += 1
            if self.lost == 1 or self.lost % 1000 == 0:
                log.error(
                    "buffer %s unwritable and %d messages waiting in memory: %d oldest lost",
                    self.buffer.sync.path,
                    self.max_pending,
                    self.lost,
                )

    def kick(self) -> None:
        """Commit what is pending (called at the end of each polling cycle)."""
        if self.pending or self.alarms or self.restamp_offset is not None:
            self._event.set()

    async def commit(self) -> bool:
        """Commit everything pending now; return False if the commit failed.

        Commits never overlap: a second caller (the clean stop) waits for the running one,
        so nothing committed escapes :attr:`on_commit`.
        """
        async with self._lock:
            return await self._commit()

    async def _commit(self) -> bool:
        if not self.pending and not self.alarms and self.restamp_offset is None:
            return True
        batch, self.pending = self.pending, []
        state, self.state = self.state, {}
        alarms, self.alarms = self.alarms, {}
        restamp = self.restamp_offset
        acked = self.take_acked()
        try:
            seqs = await self.buffer.append_many(
                batch, self.handed_upto(), state, alarms, restamp, acked
            )
        except sqlite3.Error as exc:
            self.return_acked(acked)
            self.pending = batch + self.pending
            self.state = {**state, **self.state}
            self.alarms = {**alarms, **self.alarms}
            if not self._failing:
                log.error(
                    "cannot write buffer %s: %s; keeping %d message(s) in memory and retrying",
                    self.buffer.sync.path,
                    exc,
                    len(self.pending),
                )
                self._failing = True
            return False
        if self._failing:
            log.info("buffer %s is writable again", self.buffer.sync.path)
            self._failing = False
        if restamp is not None and self.restamp_offset == restamp:
            self.restamp_offset = None
        rows = [Row(s, t, b, ts, p) for s, (t, b, ts, p, _) in zip(seqs, batch, strict=True)]
        self.on_commit(rows, self.buffer.sync.dropped_upto)
        reports = self.buffer.sync.take_drop_reports()
        if reports:
            self.on_drops(reports)
        restamps = self.buffer.sync.take_restamps()
        if restamps:
            self.on_restamps(restamps)
        return True

    async def run(self) -> None:
        """Commit whenever something is pending; cancel to stop (then call commit())."""
        last = -1e9
        while True:
            await self._event.wait()
            wait = last + self.commit_every - time.monotonic()
            if wait > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._urgent.wait()
            self._event.clear()
            self._urgent.clear()
            last = time.monotonic()
            if not await self.commit():
                await asyncio.sleep(1.0)
                self._event.set()


class Agent:
    """The running daemon: buses, buffer writer, publisher and MQTT link."""

    def __init__(self, cfg: AgentConfig, pin_factory: Any = None) -> None:
        self.cfg = cfg
        self.stop_event = asyncio.Event()
        state = Path(cfg.state_dir)
        self._lock_fd = lock_state_dir(state)
        self.buffer_error: str | None = None
        """Why the buffer is in memory (None: it is on disk)."""
        self._health_now = asyncio.Event()
        try:
            sync, notice = self._open_disk_buffer()
        except StateDirError:
            raise
        except BufferError as exc:
            sync, notice = (
                memory_buffer(state / "buffer.db", cfg.buffer.max_messages, cfg.buffer.max_bytes),
                None,
            )
            self.buffer_error = str(exc)
            log.error(
                "%s. BUFFERING IN MEMORY ONLY (at most %d MB): what is not yet published is "
                "lost if the agent stops; the disk is tried again every %.0f s",
                exc,
                MEMORY_MAX_BYTES // 1_000_000,
                cfg.buffer.disk_retry,
            )
        self.buffer = AsyncBuffer(sync)
        self.writer = BufferWriter(self.buffer, commit_every=cfg.buffer.commit_every)
        c = cfg.clock
        self.clock = Clock(c.sync, Path(c.sync_file), c.not_before_ms() or RELEASE_DATE_MS)
        self.writer.on_restamps = self._report_restamps
        prefix = cfg.mqtt.topic_prefix
        self.status_topic = status_topic(prefix, cfg.gateway_id)
        self._topics = {d.id: telemetry_topic(prefix, cfg.gateway_id, d.id) for d in cfg.devices}
        self._encoders = {
            d.id: TelemetryEncoder(cfg.gateway_id, d.id, {p.name: p.unit for p in d.points})
            for d in cfg.devices
        }
        stored = self.buffer.sync.point_state()
        self._counters = {
            d.id: CounterTracker(
                d,
                {
                    p.name: v
                    for p in d.points
                    if p.counter and (v := stored.get((d.id, p.name))) is not None
                },
            )
            for d in cfg.devices
            if isinstance(d, ModbusDevice) and any(p.counter for p in d.points)
        }
        client_id = cfg.mqtt.client_id or default_client_id(cfg.gateway_id)
        self.link = MqttLink(cfg.mqtt, client_id, self.status_topic, lambda: self.clock.synced)
        self.publisher = Publisher(
            self.buffer, self.link, self.status_topic, cfg.mqtt.max_inflight, cfg.buffer.drain_rate
        )
        self.writer.on_commit = self.publisher.offer
        self.writer.take_acked = self.publisher.take_acked
        self.writer.return_acked = self.publisher.return_acked
        self.writer.handed_upto = lambda: self.publisher.cursor
        self.writer.on_drops = self._report_drops
        self._prefix = prefix
        self.alarms = AlarmEngine(
            expand_rules(cfg), self.buffer.sync.alarm_state(), time.monotonic(), now_ms()
        )
        self.publisher.add_alarm_events(self.buffer.sync.fetch(0, ALARMS_MAX, prio_only=True))
        self.publisher.on_online = self._publish_alarm_states
        initial = {
            n: st for n, st in desired_outputs(cfg.outputs, self.alarms.alarms).items() if st.on
        }
        self.gpio = Gpio(cfg.gpio, cfg.outputs, initial, pin_factory)
        if notice is not None:
            self.notice("buffer_moved_aside", notice, next_seq=sync.next_seq or None)
        if self.buffer_error is not None:
            self.notice(
                "buffer_in_memory",
                f"the buffer cannot be kept on disk ({self.buffer_error}); buffering in "
                "memory until the disk can be written",
                first_seq=sync.next_seq,
            )
        groups: dict[str, list[ModbusDevice]] = defaultdict(list)
        self.readers: list[SerialLineReader | SeismicSerialReader | SeismicUdpReader] = []
        for d in cfg.devices:
            if isinstance(d, SerialLineDevice):
                self.readers.append(SerialLineReader(d, self._on_line, now_ms))
            elif isinstance(d, SeismicDevice):
                self.readers.append(self._seismic_reader(d))
            else:
                groups[d.bus].append(d)
        self.pollers = [
            BusPoller(name, make_bus(devs), devs, self._on_poll) for name, devs in groups.items()
        ]
        for poller in self.pollers:
            poller.on_cycle_end = self.writer.kick

    def _open_disk_buffer(self) -> tuple[Buffer, str | None]:
        b = self.cfg.buffer
        path = Path(self.cfg.state_dir) / "buffer.db"
        return open_buffer(path, b.max_messages, b.synchronous, b.max_bytes, b.min_free)

    async def _disk_retry(self) -> None:
        """While the buffer is in memory, try the disk every ``buffer.disk_retry``; once it
        opens, move every buffered message there (same seqs) and go on from the disk."""
        every = self.cfg.buffer.disk_retry
        failures = 0
        notices: list[str] = []

        def make() -> Buffer:
            new, notice = self._open_disk_buffer()
            if notice:
                notices.append(notice)
            return new

        while True:  # a task of the agent's life: ends only when cancelled
            await asyncio.sleep(every)
            if not self.buffer.sync.memory:
                continue
            notices.clear()

            try:
                moved = await self.buffer.switch_to(make)
            except (BufferError, sqlite3.Error) as exc:
                failures += 1
                if failures * every >= 600:  # loud, but not every few seconds
                    log.error("buffer still in memory only: %s", exc)
                    failures = 0
                self.buffer_error = str(exc)
                continue
            log.warning(
                "buffer %s can be written again: %d buffered message(s) moved to disk",
                self.buffer.sync.path,
                moved,
            )
            self.buffer_error = None
            self.publisher.rewind()
            self._health_now.set()
            for notice in notices:
                self.notice("buffer_moved_aside", notice)
            self.notice(
                "buffer_on_disk",
                f"the buffer is on disk again ({self.buffer.sync.path}); {moved} message(s) "
                "moved there from memory",
                moved=moved,
            )

    def _on_poll(self, dev: Any, ts_ms: int, results: list[PointResult]) -> None:
        counters = self._counters.get(dev.id)
        deltas = None
        if counters is not None:
            deltas = counters.deltas(results)
            for name, value in counters.last.items():
                self.writer.state[(dev.id, name)] = value
        historical = not self.link.connected.is_set()
        self._check_clock()
        epoch = self.clock.epoch
        body = self._encoders[dev.id].encode(ts_ms, results, deltas, historical, epoch is not None)
        self.writer.submit(self._topics[dev.id], body, ts_ms, 0, epoch)
        events = self.alarms.on_poll(dev.id, results, time.monotonic(), ts_ms)
        if events:
            self._emit(events)

    def _report_drops(self, reports: list[tuple[int, int, int]]) -> None:
        for count, first, last in reports:
            self.notice(
                "dropped",
                f"buffer full: dropped {count} unsent telemetry message(s), seq {first}..{last} "
                "(alarm events and notices in that range are kept)",
                count=count,
                first_seq=first,
                last_seq=last,
            )

    def notice(self, kind: str, message: str, **fields: Any) -> None:
        """A gateway notice for the platform (``{prefix}/{gateway_id}/notice``), buffered
        with alarm priority: never dropped, sent ahead of any backlog."""
        ts = now_ms()
        doc = {"gateway": self.cfg.gateway_id, "type": kind, "message": message, **fields}
        doc["ts"] = iso_ms(ts)
        epoch = self.clock.epoch
        if epoch is not None:
            doc["clock"] = "unsynced"
        body = json.dumps(doc, separators=(",", ":")).encode()
        self.writer.submit(notice_topic(self._prefix, self.cfg.gateway_id), body, ts, 1, epoch)
        self.writer.kick()

    def _check_clock(self) -> None:
        """Follow the clock's trust: steps are reported; on synchronisation the buffered
        messages of untrusted epochs are re-stamped with the next commit."""
        if self.clock.check():
            self._health_now.set()
            if self.clock.synced:
                self.writer.restamp_offset = self.clock.offset
                self.writer.kick()
        for step in self.clock.take_steps():
            self.notice(
                "clock_step",
                f"the wall clock jumped by {step.step_ms / 1000:+.3f} s",
                step_ms=step.step_ms,
                synced=step.synced,
            )

    def _report_restamps(self, restamps: list[Restamp]) -> None:
        for r in restamps:
            self.publisher.restamped(r.bodies)
            self.notice(
                "clock_restamp",
                f"the clock is synchronised: messages seq {r.first_seq}..{r.last_seq} flagged "
                f'"clock":"unsynced" were stamped {-r.correction_ms / 1000:+.3f} s off; add '
                f"correction_ms to their time stamps ({r.rewritten} still buffered were "
                're-stamped and flagged "restamped")',
                first_seq=r.first_seq,
                last_seq=r.last_seq,
                correction_ms=r.correction_ms,
            )

    def _on_line(self, dev: Any, ts_ms: int, results: list[PointResult]) -> None:
        """A reading of a text-line sensor: as a poll, and committed soon (the writer
        batches whatever is pending into one transaction)."""
        self._on_poll(dev, ts_ms, results)
        self.writer.kick()

    def _seismic_reader(self, dev: SeismicDevice) -> SeismicSerialReader | SeismicUdpReader:
        """A strong-motion sensor: its samples through :class:`SeismicProcessor`; 1 Hz
        summaries as telemetry, events as priority rows, waveforms as their own rows."""
        proc = SeismicProcessor(dev)
        gw = self.cfg.gateway_id
        events = event_topic(self._prefix, gw, dev.id)
        waves = waveform_topic(self._prefix, gw, dev.id)

        def on_sample(n: int, counts: list[float], ts: int) -> None:
            publish(proc.feed(counts, ts))

        def publish(outs: list[SeismicOutput]) -> None:
            for out in outs:
                if out.kind == "summary":
                    assert out.results is not None
                    self._on_line(dev, out.ts_ms, out.results)
                    continue
                assert out.doc is not None
                doc = {
                    k: iso_ms(v) if k in TIME_KEYS and isinstance(v, int) else v
                    for k, v in out.doc.items()
                }
                head = {"gateway": gw, "device": dev.id, "type": "seismic"}
                if out.kind == "waveform":
                    head["type"] = "waveform"
                epoch = self.clock.epoch
                if epoch is not None:
                    head["clock"] = "unsynced"
                body = json.dumps({**head, **doc}, separators=(",", ":")).encode()
                if out.kind == "event":
                    self.writer.submit(events, body, out.ts_ms, 1, epoch)
                    log.warning(
                        "seismic %s on %s: STA/LTA %.1f, PGA %.4g m/s², intensity %s",
                        doc["event"],
                        dev.id,
                        doc.get("sta_lta", doc.get("peak_sta_lta", 0.0)),
                        doc["pga"],
                        doc["intensity"],
                    )
                else:
                    self.writer.submit(waves, body, out.ts_ms, 0, epoch)
                self.writer.kick()

        def on_gap(kind: str, samples: int, n: int) -> None:
            if kind == "gap":
                publish(proc.skip(samples))
            log.warning(
                "device %s: %s of %d sample(s) before sample %d (not bridged)",
                dev.id,
                kind,
                samples,
                n,
            )

        if dev.udp_port is not None:
            return SeismicUdpReader(dev, on_sample, on_gap, now_ms)
        return SeismicSerialReader(dev, on_sample, on_gap, now_ms)

    def _emit(self, events: list[tuple[Alarm, Event]]) -> None:
        """Alarm events: outputs first (no await between a reading and its relay), then
        into the buffer as priority rows, and the retained state to the broker."""
        now, wall = time.monotonic(), now_ms()
        self.gpio.apply(desired_outputs(self.cfg.outputs, self.alarms.alarms))
        epoch = self.clock.epoch
        for a, e in events:
            body = alarm_event_body(self.cfg.gateway_id, a, e, self.gpio, epoch is not None)
            self.writer.submit(
                event_topic(self._prefix, self.cfg.gateway_id, a.device), body, e.at_ms, 1, epoch
            )
            level = logging.WARNING if e.event == "raise" else logging.INFO
            log.log(
                level,
                "alarm %s %s (%s %s, %s): value %s, now %s",
                a.key,
                e.event,
                a.rule.kind,
                a.rule.severity,
                a.rule.category,
                e.value,
                e.state,
            )
            self._publish_alarm_state(a, wall)
        self.writer.alarms.update(
            {k: json.dumps(v) for k, v in self.alarms.take_changed(now, wall).items()}
        )
        self.writer.kick()

    def _publish_alarm_state(self, a: Alarm, wall: int) -> None:
        if self.link.connected.is_set():
            topic = alarm_state_topic(self._prefix, self.cfg.gateway_id, a.device, a.rule.id)
            body = alarm_state_body(self.cfg.gateway_id, a, wall)
            self.link.publish(topic, body, qos=1, retain=True)

    def _publish_alarm_states(self) -> None:
        """After every CONNACK: the current state of every alarm, retained, and the health."""
        self._health_now.set()
        wall = now_ms()
        for a in self.alarms.alarms:
            self._publish_alarm_state(a, wall)

    def acknowledge(self, by: str, keys: list[str] | None = None) -> int:
        """Acknowledge alarms (all, or those ``keys``: ``device/rule``); return how many
        changed. The acknowledge button calls it; a platform command can later."""
        events = self.alarms.acknowledge(time.monotonic(), now_ms(), by, keys)
        if events:
            self._emit(events)
        return len(events)

    def _disk_write_bytes(self) -> int | None:
        """Bytes this process caused to be written to storage (/proc/self/io), or None."""
        try:
            for line in Path("/proc/self/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
        except (OSError, ValueError):
            return None
        return None

    async def _health(self) -> None:
        """Publish the gateway's health (retained) every :data:`HEALTH_S`, every
        :data:`HEALTH_DRAINING_S` while a backlog drains."""
        start_bytes = self._disk_write_bytes()
        start = time.monotonic()
        while True:
            for kind, message, fields in self.link.tls_notices():  # cert_expiring
                self.notice(kind, message, **fields)
            stats = await self.buffer.stats()
            draining = stats.pending > self.cfg.mqtt.max_inflight
            if self.link.connected.is_set():
                elapsed = time.monotonic() - start
                written = self._disk_write_bytes()
                per_hour = (
                    None  # (a rate over the first seconds says nothing about SD wear)
                    if written is None or start_bytes is None or elapsed < 60
                    else round((written - start_bytes) / (elapsed / 3600))
                )
                doc = {
                    "gateway": self.cfg.gateway_id,
                    "ts": iso_ms(now_ms()),
                    "pending": stats.pending,
                    "last_seq": stats.last_seq,
                    "dropped": stats.dropped,
                    "published": self.publisher.published,
                    "acked": self.publisher.acked_total,
                    "draining": draining,
                    "disk_write_bytes_per_hour": per_hour,
                    "gpio": "none"
                    if not self.gpio.outputs
                    else ("ok" if self.gpio.available else "unavailable"),
                    "gpio_factory": self.gpio.factory_name or None,
                    "alarms_active": sum(1 for a in self.alarms.alarms if a.on),
                    "buffer": "memory" if self.buffer.sync.memory else "disk",
                    "clock": "synced" if self.clock.synced else "unsynced",
                    **self.link.tls_health(),
                }
                if self.buffer_error is not None:
                    doc["buffer_error"] = self.buffer_error
                body = json.dumps(doc, separators=(",", ":")).encode()
                self.link.publish(
                    health_topic(self._prefix, self.cfg.gateway_id), body, qos=1, retain=True
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEALTH_DRAINING_S if draining else HEALTH_S):
                    await self._health_now.wait()
            self._health_now.clear()

    async def _alarm_timer(self) -> None:
        """Let time act on the alarms (delays, stale data) and keep the outputs and the
        status LED current; with none of them, only follow the clock (once a second)."""
        busy = self.cfg.alarms or self.cfg.outputs or self.cfg.gpio.status_led
        tick = ALARM_TICK_S if busy else 1.0
        while True:
            self._check_clock()
            events = self.alarms.tick(time.monotonic(), now_ms())
            if events:
                self._emit(events)
            else:
                # changed conditions without events (a delay started) are saved too
                changed = self.alarms.take_changed(time.monotonic(), now_ms())
                if changed:
                    self.writer.alarms.update({k: json.dumps(v) for k, v in changed.items()})
                    self.writer.kick()
                self.gpio.apply(desired_outputs(self.cfg.outputs, self.alarms.alarms))
            self.gpio.set_status(self.link.connected.is_set())
            await asyncio.sleep(tick)

    async def run(self) -> int:
        """Run until :attr:`stop_event` is set; return the process exit code."""
        stats = await self.buffer.stats()
        log.info(
            "gateway %s: %d device(s) on %d bus(es); buffer %s holds %d unsent "
            "message(s), last seq %d, %d dropped so far",
            self.cfg.gateway_id,
            len(self.cfg.devices),
            len(self.pollers),
            self.buffer.sync.path,
            stats.pending,
            stats.last_seq,
            stats.dropped,
        )
        bg = [
            asyncio.create_task(self.writer.run(), name="buffer-writer"),
            asyncio.create_task(self.publisher.run(), name="publisher"),
            asyncio.create_task(self.publisher.run_acks(), name="acks"),
            asyncio.create_task(self._health(), name="health"),
            asyncio.create_task(self._disk_retry(), name="disk-retry"),
        ]
        link_task = asyncio.create_task(self.link.run(), name="mqtt")
        loop = asyncio.get_running_loop()

        def pressed() -> None:  # on gpiozero's thread: hand over to the loop
            loop.call_soon_threadsafe(self.acknowledge, "button")

        self.gpio.on_ack = pressed
        polls = [asyncio.create_task(p.run(), name=f"poll:{p.name}") for p in self.pollers]
        polls += [asyncio.create_task(r.run(), name=f"read:{r.dev.id}") for r in self.readers]
        polls.append(asyncio.create_task(self._alarm_timer(), name="alarms"))
        watched = [*bg, link_task, *polls]
        stop_wait = asyncio.create_task(self.stop_event.wait(), name="stop")
        done, _ = await asyncio.wait([stop_wait, *watched], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for t in done:
            if t is not stop_wait and t.exception() is not None:
                log.critical("task %s failed: %r; stopping", t.get_name(), t.exception())
                code = 1
        await self._shutdown(polls, bg, link_task, stop_wait)
        return code

    async def _shutdown(
        self,
        polls: list[asyncio.Task[None]],
        bg: list[asyncio.Task[None]],
        link_task: asyncio.Task[None],
        stop_wait: asyncio.Task[bool],
    ) -> None:
        log.info("stopping: polling stopped, flushing buffer and publishes")
        for t in polls:
            t.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        self.gpio.close()
        # the last minute's drops, to the platform too
        self._report_drops(await self.buffer.flush_drop_reports())
        if not await self.writer.commit():
            log.error(
                "%d poll(s) could not be written to buffer %s and are lost at this stop",
                len(self.writer.pending),
                self.buffer.sync.path,
            )
        # the last commit's drops, to the platform too (a commit of notices alone never
        # makes the cap drop anything)
        reports = await self.buffer.flush_drop_reports()
        if reports:
            self._report_drops(reports)
            await self.writer.commit()
        await self.publisher.drain(STOP_BUDGET_S / 2)
        for t in bg:
            t.cancel()
        await asyncio.gather(*bg, return_exceptions=True)
        if not await self.publisher.flush_acks():
            log.warning("some acknowledged messages stay in the buffer; they will be sent again")
        sent = await self.publisher.publish_offline(OFFLINE, STOP_BUDGET_S / 4)
        if not sent and self.link.ever_connected:
            log.warning(
                "could not publish 'offline' (broker unreachable); the broker's last "
                "will announces it when the connection times out"
            )
        elif not sent:
            log.warning("never reached the broker in this run: no status to take back")
        await self.link.stop(timeout=1.0)
        link_task.cancel()
        stop_wait.cancel()
        await asyncio.gather(link_task, stop_wait, return_exceptions=True)
        stats = await self.buffer.stats()
        await self.buffer.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
        log.info(
            "stopped; this run published %d message(s), %d acknowledged; %d unsent kept in "
            "the buffer for the next start",
            self.publisher.published,
            self.publisher.acked_total,
            stats.pending,
        )


def expand_rules(cfg: AgentConfig) -> list[Alarm]:
    """One :class:`Alarm` per rule and device (a ``profile`` rule applies to every device
    using that profile)."""
    out = []
    for rule in cfg.alarms:
        for d in cfg.devices:
            if d.id == rule.device or (rule.profile is not None and d.profile == rule.profile):
                unit = next((p.unit for p in d.points if p.name == rule.point), None)
                out.append(Alarm(rule, d.id, unit))
    return out


def _limits(rule: AlarmRule) -> dict[str, Any]:
    if rule.kind in ("high", "low"):
        return {"setpoint": rule.setpoint, "clear": rule.clear_level}
    if rule.kind == "rate":
        return {"change": rule.change, "window_s": rule.window, "clear": rule.clear_level}
    return {"after_s": rule.after}


def alarm_event_body(gateway: str, a: Alarm, e: Event, gpio: Gpio, unsynced: bool = False) -> bytes:
    """The JSON of one alarm event (``docs/mqtt.md``); ``seq`` is spliced in later."""
    rule = a.rule
    doc: dict[str, Any] = {
        "gateway": gateway,
        "device": a.device,
        "type": "alarm",
        "event": e.event,
        "alarm": a.key,
        "rule": rule.id,
        "point": rule.point,
        "kind": rule.kind,
        "category": rule.category,
        "severity": rule.severity,
        "state": e.state,
        "value": e.value,
        "unit": a.unit,
        "quality": e.quality,
        **_limits(rule),
        "ts": iso_ms(e.at_ms),
    }
    if unsynced:
        doc["clock"] = "unsynced"
    if a.state.raised_ms is not None:
        doc["raised_at"] = iso_ms(a.state.raised_ms)
    if rule.message:
        doc["message"] = rule.message
    if e.by:
        doc["by"] = e.by
    if gpio.outputs:
        doc["outputs"] = "ok" if gpio.available else "unavailable"
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def alarm_state_body(gateway: str, a: Alarm, wall_ms: int) -> bytes:
    """The retained current state of one alarm."""
    rule = a.rule
    doc: dict[str, Any] = {
        "gateway": gateway,
        "device": a.device,
        "alarm": a.key,
        "rule": rule.id,
        "point": rule.point,
        "kind": rule.kind,
        "category": rule.category,
        "severity": rule.severity,
        "state": a.state.state,
        "value": a.state.value,
        "unit": a.unit,
        **_limits(rule),
        "raised_at": None if a.state.raised_ms is None else iso_ms(a.state.raised_ms),
        "ts": iso_ms(wall_ms),
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


async def run_agent(cfg: AgentConfig) -> int:
    """Run the agent with SIGTERM/SIGINT handlers; return the exit code."""
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop_event.set)
    try:
        return await agent.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
