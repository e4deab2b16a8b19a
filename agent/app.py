"""Build the agent from its config and run it on one asyncio loop until a stop signal.

Order of a clean stop (SIGTERM/SIGINT): stop polling → commit what was polled → wait briefly
for in-flight PUBACKs → delete acknowledged rows → publish retained ``offline`` and wait for
its PUBACK → DISCONNECT → close the buffer. Unsent rows stay in the buffer for the next start.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.alarms import Alarm, AlarmEngine, Event
from agent.availability import AvailabilityTracker, Change
from agent.buffer import (
    MEMORY_MAX_BYTES,
    AsyncBuffer,
    Buffer,
    BufferError,
    Restamp,
    StateDirError,
    lock_state_dir,
    memory_buffer,
    open_buffer,
)
from agent.clock import RELEASE_DATE_MS, Clock
from agent.commands import Commands
from agent.contract import payloads
from agent.contract.info import gateway_info, streams
from agent.contract.telemetry import value_texts
from agent.contract.topics import (
    OFFLINE,
    alarm_state_topic,
    availability_topic,
    event_topic,
    health_topic,
    info_topic,
    notice_topic,
    status_topic,
    waveform_topic,
)
from agent.formats.thingsboard import ThingsBoardEncoder, ThingsBoardRpc
from agent.gpio import Gpio, desired_outputs
from agent.health import Health
from agent.logs import toggle_debug
from agent.mqtt import MqttLink
from agent.pipeline import CounterTracker, finite_results
from agent.poller import BusPoller
from agent.publisher import ALARMS_MAX, Publisher
from agent.readings import now_ms
from agent.reload import Reloader
from agent.retained import RetainedState
from agent.sdnotify import Notifier
from agent.status_writer import StatusWriter
from agent.supervise import supervised, where_raised
from agent.supervisor import Supervisor
from agent.telemetry_out import TelemetryOut
from agent.writer import BufferWriter, Stall
from drivers.base import PointResult
from drivers.kinds import (
    is_modbus,
    is_modbus_rtu,
    is_modbus_rtu_over_tcp,
    is_modbus_tcp,
    is_seismic,
    is_serial_line,
    on_a_line,
)
from drivers.modbus.driver import LineBus, ModbusBus, ModbusTcpBus
from drivers.modbus.line import SerialLine
from drivers.seismic_stream import SeismicSerialReader, SeismicUdpReader
from drivers.serial_line import SerialLineReader

if TYPE_CHECKING:
    from agent.config.model import AgentConfig
    from agent.seismic import SeismicOutput  # imported where a seismic sensor is set up
    from drivers.modbus.config import ModbusDevice
    from drivers.seismic_config import SeismicDevice

log = logging.getLogger(__name__)

Reader = SerialLineReader | SeismicSerialReader | SeismicUdpReader
"""The task of a sensor that has a port of its own."""

STOP_BUDGET_S = 5.0
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
    if on_a_line(first):
        gaps = [g for d in devices if (g := getattr(d, "frame_gap", None)) is not None]
        frame_gap = max(gaps) if gaps else None
        pause = max(getattr(d, "connect_pause", 0.0) for d in devices)
        if is_modbus_rtu(first):
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
            assert is_modbus_rtu_over_tcp(first)
            line = SerialLine(
                f"{first.host}:{first.port}",
                first.framing,
                frame_gap=frame_gap,
                connect_pause=pause,
                tcp=True,
            )
        return LineBus(line, timeout)
    assert is_modbus_tcp(first)
    return ModbusTcpBus(first.host, first.port, timeout)


class Agent:
    """The running daemon: buses, buffer writer, publisher and MQTT link."""

    def __init__(
        self, cfg: AgentConfig, pin_factory: Any = None, config_path: str | None = None
    ) -> None:
        self.cfg = cfg
        self.started_ms = now_ms()
        self.stop_event = asyncio.Event()
        state = Path(cfg.state_dir)
        self._lock_fd = lock_state_dir(state)
        self.buffer_error: str | None = None
        """Why the buffer is in memory (None: it is on disk)."""
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
        self.writer = BufferWriter(
            self.buffer, commit_every=cfg.buffer.commit_every, stall_after=cfg.buffer.stall_after
        )
        self.writer.on_stall = self._buffer_stalled
        self.writer.on_resume = self._buffer_resumed
        c = cfg.clock
        self.clock = Clock(c.sync, Path(c.sync_file), c.not_before_ms or RELEASE_DATE_MS)
        self.writer.on_restamps = self._report_restamps
        prefix = cfg.mqtt.topic_prefix
        self.status_topic = status_topic(prefix, cfg.gateway_id)
        self._prefix = prefix
        self._counters: dict[str, CounterTracker] = {}
        self.telemetry = TelemetryOut(cfg, self.writer.submit, self.writer.kick)
        """Polls into telemetry messages, in the payload mode of ``mqtt.payload``."""
        stored = self.buffer.sync.point_state()
        for d in cfg.devices:
            self.add_device(d, {p: v for (dev, p), v in stored.items() if dev == d.id})
        client_id = cfg.mqtt.client_id or default_client_id(cfg.gateway_id)
        self.link = MqttLink(cfg.mqtt, client_id, self.status_topic, lambda: self.clock.synced)
        node = None
        if cfg.mqtt.format == "sparkplug_b":  # protobuf is imported for this format only
            from agent.sparkplug.node import sparkplug_node

            node = sparkplug_node(cfg, gateway_info(cfg, self.started_ms))
            self.link.use_format(node)
        self.thingsboard = (
            ThingsBoardEncoder(prefix, cfg.gateway_id, cfg.devices)
            if cfg.mqtt.format == "thingsboard"
            else None
        )
        """The ThingsBoard output format (``mqtt.format: thingsboard``), or None."""
        if self.thingsboard is not None:
            self.link.use_format(self.thingsboard)
        self.publisher = Publisher(
            self.buffer, self.link, self.status_topic, cfg.mqtt.max_inflight, cfg.buffer.drain_rate
        )
        self.publisher.wire = self.telemetry.wire
        self.writer.on_commit = self.publisher.offer
        self.writer.take_acked = self.publisher.take_acked
        self.writer.return_acked = self.publisher.return_acked
        self.writer.handed_upto = lambda: self.publisher.cursor
        self.writer.on_drops = self._report_drops
        self.alarms = AlarmEngine(
            expand_rules(cfg), self.buffer.sync.alarm_state(), time.monotonic(), now_ms()
        )
        self.publisher.add_alarm_events(self.buffer.sync.fetch(0, ALARMS_MAX, prio_only=True))
        self.publisher.on_online = self._on_online
        self.availability = AvailabilityTracker(
            [(d.id, streams(d)) for d in cfg.devices],
            cfg.availability.offline_after,
            cfg.availability.stream_timeout,
            time.monotonic(),
        )
        self.retained = RetainedState(
            self.link,
            self.buffer,
            self._owned_retained(),
            self.buffer.sync.retained_topics(),
            prefix,
            cfg.gateway_id,
        )
        self.publisher.on_other_puback = self.retained.on_puback
        self.retained.publish(
            info_topic(prefix, cfg.gateway_id), gateway_info(cfg, self.started_ms)
        )
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
        groups: dict[str, list[Any]] = defaultdict(list)
        for d in cfg.devices:
            groups[d.bus].append(d)
        self.pollers: list[BusPoller] = []
        """The Modbus buses' pollers (kept current by reloads)."""
        self.readers: list[SerialLineReader | SeismicSerialReader | SeismicUdpReader] = []
        """The sensors' readers, one per port (kept current by reloads)."""
        self._runners: dict[str, BusPoller | Reader] = {}
        self._device_tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        for name, devs in groups.items():
            self.start_bus(name, devs)
        self.reloader = None if config_path is None else Reloader(self, config_path)
        """Reloads the config on SIGHUP (:mod:`agent.reload`); None without a file."""
        self.status = StatusWriter(self)
        self.health = Health(self, prefix)
        """The state file of ``edge-agent status`` and the health's metrics."""
        self.commands = Commands(self)
        """Downlink commands (:mod:`agent.commands`), on the link's subscription."""
        self.rpc = ThingsBoardRpc(self) if self.thingsboard is not None else None
        """ThingsBoard server-side RPC onto the commands (instead of their native topics)."""
        intake = self.commands if self.rpc is None else self.rpc
        self.link.client.subscriptions.append(intake.topic_filter)
        self.link.on_message = intake.offer
        if node is not None:  # a DCMD is the allow-listed write
            node.on_write = lambda device, request: self.commands.offer_request(
                "write", request, "sparkplug_b"
            )

    @property
    def locked(self) -> bool:
        """Whether this process holds the lock of its state_dir."""
        return self._lock_fd >= 0

    # -- devices: set up at start, and again by a config reload (agent.reload) ------------

    def add_device(self, dev: Any, stored: dict[str, int] | None = None) -> None:
        """Encode the readings of ``dev`` (again, for a reloaded device: its counters go on
        from their last values, or from ``stored``: point name → last raw value)."""
        self.telemetry.add_device(dev)
        old = self._counters.pop(dev.id, None)
        if is_modbus(dev) and any(p.counter for p in dev.points):
            last = dict(stored or {}) if old is None else old.last
            self._counters[dev.id] = CounterTracker(
                dev,
                {
                    p.name: v
                    for p in dev.points
                    if p.counter and (v := last.get(p.name)) is not None
                },
            )

    def forget_device(self, dev_id: str) -> None:
        """``dev_id`` was removed by a reload: its readings are no longer encoded."""
        self.telemetry.forget_device(dev_id)
        self._counters.pop(dev_id, None)

    def start_bus(self, name: str, devices: list[Any]) -> None:
        """Poll (or read) the devices of bus ``name``: a Modbus bus's poller, or a sensor's
        reader (one device); started at once when the agent runs."""
        first = devices[0]
        runner: BusPoller | Reader
        if is_serial_line(first):
            runner = SerialLineReader(first, self._on_line, now_ms)
        elif is_seismic(first):
            runner = self._seismic_reader(first)
        else:
            runner = BusPoller(name, make_bus(devices), devices, self._on_poll)
            runner.on_cycle_end = self.writer.kick
        self._runners[name] = runner
        self._list_runners()
        if self._running:
            self._start_task(runner)

    def update_bus(self, name: str, devices: list[Any]) -> None:
        """A reload changed the devices of Modbus bus ``name`` but not the bus itself."""
        runner = self._runners[name]
        assert isinstance(runner, BusPoller)
        runner.update(devices)

    async def stop_buses(self, names: list[str], timeout: float) -> None:
        """Stop polling (or reading) these buses, waiting at most ``timeout`` seconds for
        their tasks to end (a poll in progress is abandoned: it made no reading yet)."""
        tasks = []
        for name in names:
            runner = self._runners.pop(name)
            task = self._device_tasks.pop(self._task_name(runner), None)
            if task is not None:
                task.cancel()
                tasks.append(task)
        self._list_runners()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                log.error("task %s did not stop within %.0f s of a reload", t.get_name(), timeout)

    def _list_runners(self) -> None:
        runners = list(self._runners.values())
        self.pollers = [r for r in runners if isinstance(r, BusPoller)]
        self.readers = [r for r in runners if not isinstance(r, BusPoller)]

    @staticmethod
    def _task_name(runner: BusPoller | Reader) -> str:
        if isinstance(runner, BusPoller):
            return f"poll:{runner.name}"
        return f"read:{runner.dev.id}"

    def _start_task(self, runner: BusPoller | Reader) -> None:
        name = self._task_name(runner)
        self._device_tasks[name] = asyncio.create_task(supervised(name, runner.run), name=name)

    def replace_alarms(self, alarms: list[Alarm], reset: set[str]) -> None:
        """A reload's alarms (:meth:`agent.alarms.AlarmEngine.replace`): the outputs follow
        at once, the alarms that start afresh have their retained state published and
        stored."""
        now, wall = time.monotonic(), now_ms()
        self.alarms.replace(alarms, reset, now)
        self.gpio.apply(desired_outputs(self.cfg.outputs, self.alarms.alarms))
        for a in self.alarms.alarms:
            if a.key in reset:
                self._publish_alarm_state(a, wall)
        changed = self.alarms.take_changed(now, wall)
        if changed:
            self.writer.alarms.update({k: json.dumps(v) for k, v in changed.items()})
            self.writer.kick()

    def config_changed(self) -> None:
        """After a reload applied :attr:`cfg`: availability settings and devices, the
        retained topics owned (those of removed devices and alarms are cleared), ``info``
        published again, and a fresh health."""
        cfg = self.cfg
        self.availability.reconfigure(
            [(d.id, streams(d)) for d in cfg.devices],
            cfg.availability.offline_after,
            cfg.availability.stream_timeout,
            time.monotonic(),
        )
        self.status.devices_changed()
        if self.link.format is not None:
            self.link.format.configure(cfg.devices)
        self.retained.reown(self._owned_retained())
        self.retained.publish(
            info_topic(self._prefix, cfg.gateway_id), gateway_info(cfg, self.started_ms)
        )
        self.health.now.set()

    def _owned_retained(self) -> set[str]:
        """Every retained topic this config publishes."""
        gw, p = self.cfg.gateway_id, self._prefix
        owned = {status_topic(p, gw), health_topic(p, gw), info_topic(p, gw)}
        owned |= {availability_topic(p, gw, d.id) for d in self.cfg.devices}
        owned |= {alarm_state_topic(p, gw, a.device, a.rule.id) for a in self.alarms.alarms}
        return owned

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
            self.health.now.set()
            for notice in notices:
                self.notice("buffer_moved_aside", notice)
            self.notice(
                "buffer_on_disk",
                f"the buffer is on disk again ({self.buffer.sync.path}); {moved} message(s) "
                "moved there from memory",
                moved=moved,
            )

    def _buffer_stalled(self, stall: Stall, waiting: int) -> None:
        secs = time.monotonic() - stall.since
        self.notice(
            "buffer_stalled",
            f"the buffer cannot be written: no commit has succeeded for {secs:.0f} s "
            f"({stall.error}); {waiting} message(s) wait in memory",
            error=stall.error,
            stalled_s=round(secs, 1),
            waiting=waiting,
        )
        self.health.now.set()

    def _buffer_resumed(self, stall: Stall, secs: float, written: int) -> None:
        self.notice(
            "buffer_resumed",
            f"the buffer is written again after {secs:.0f} s without a commit; {written} "
            "message(s) that waited in memory are in it",
            stalled_s=round(secs, 1),
            written=written,
        )
        self.health.now.set()

    def _on_poll(self, dev: Any, ts_ms: int, results: list[PointResult]) -> None:
        if dev.id not in self.telemetry.topics:
            return  # a poll that was in progress when a reload removed its device
        results = finite_results(results)
        counters = self._counters.get(dev.id)
        deltas = None
        if counters is not None:
            results, deltas = counters.apply(results)
            for name, value in counters.last.items():
                self.writer.state[(dev.id, name)] = value
        texts = value_texts(results)  # once, for the telemetry and the state file
        self.status.on_poll(dev.id, ts_ms, results, texts)
        historical = self.link.outage
        self._check_clock()
        epoch = self.clock.epoch
        self.telemetry.poll(dev.id, ts_ms, results, deltas, historical, epoch, texts)
        events = self.alarms.on_poll(dev.id, results, time.monotonic(), ts_ms)
        if events:
            self._emit(events)
        change = self.availability.on_reading(dev.id, results, time.monotonic(), ts_ms)
        if change is not None:
            self._availability_changed([change])

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
        epoch = self.clock.epoch
        body = payloads.notice(self.cfg.gateway_id, kind, message, ts, epoch is not None, **fields)
        self.writer.submit(notice_topic(self._prefix, self.cfg.gateway_id), body, ts, 1, epoch)
        self.writer.kick()

    def _check_clock(self) -> None:
        """Follow the clock's trust: steps are reported; on synchronisation the buffered
        messages of untrusted epochs are re-stamped with the next commit."""
        if self.clock.check():
            self.health.now.set()
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
        from agent.seismic import SeismicProcessor

        proc = SeismicProcessor(dev)
        gw = self.cfg.gateway_id
        events = event_topic(self._prefix, gw, dev.id)
        waves = waveform_topic(self._prefix, gw, dev.id)

        def on_sample(n: int, counts: list[float | None], ts: int) -> None:
            publish(proc.feed(counts, ts))

        def publish(outs: list[SeismicOutput]) -> None:
            for out in outs:
                if out.kind == "summary":
                    assert out.results is not None
                    self._on_line(dev, out.ts_ms, out.results)
                    continue
                doc = out.doc
                assert doc is not None
                epoch = self.clock.epoch
                body = payloads.seismic(gw, dev.id, out.kind, out.ts_ms, doc, epoch is not None)
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
            if kind == "gap":  # (the reader counts and logs gaps and overlaps)
                publish(proc.skip(samples))

        if dev.udp_port is not None:
            return SeismicUdpReader(dev, on_sample, on_gap, now_ms, lambda: self.clock.synced)
        return SeismicSerialReader(dev, on_sample, on_gap, now_ms)

    def _emit(self, events: list[tuple[Alarm, Event]]) -> None:
        """Alarm events: outputs first (no await between a reading and its relay), then
        into the buffer as priority rows, and the retained state to the broker."""
        now, wall = time.monotonic(), now_ms()
        self.gpio.apply(desired_outputs(self.cfg.outputs, self.alarms.alarms))
        epoch = self.clock.epoch
        for a, e in events:
            body = payloads.alarm_event(
                self.cfg.gateway_id, a, e, self.gpio.outputs_state(), epoch is not None
            )
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
        self.health.now.set()  # alarms_active
        self.writer.alarms.update(
            {k: json.dumps(v) for k, v in self.alarms.take_changed(now, wall).items()}
        )
        self.writer.kick()

    def _publish_alarm_state(self, a: Alarm, wall: int) -> None:
        if self.link.connected.is_set():
            topic = alarm_state_topic(self._prefix, self.cfg.gateway_id, a.device, a.rule.id)
            body = payloads.alarm_state(self.cfg.gateway_id, a, wall)
            self.link.publish(topic, body, qos=1, retain=True)

    def _on_online(self) -> None:
        """After every CONNACK: the current state of every alarm, the other retained state
        (info, availability, clears of stale topics) and the health."""
        self.health.now.set()
        wall = now_ms()
        for a in self.alarms.alarms:
            self._publish_alarm_state(a, wall)
        self.retained.on_connected()

    def _availability_changed(self, changes: list[Change]) -> None:
        """Devices that went online or offline: logged, and their retained state."""
        gw, wall = self.cfg.gateway_id, now_ms()
        for c in changes:
            # (the poller has said loudly why a device fails: this is what the platform sees)
            if c.online:
                log.log(
                    logging.DEBUG if c.first else logging.INFO,
                    "availability of %s: online",
                    c.device,
                )
            elif c.reason != "gateway_stopped":
                log.info("availability of %s: offline (%s)", c.device, c.reason)
            body = payloads.availability(
                gw, c.device, c.online, c.reason, c.error, c.since_ms, wall
            )
            self.retained.publish(availability_topic(self._prefix, gw, c.device), body)
        self.health.now.set()

    def acknowledge(self, by: str, keys: list[str] | None = None) -> int:
        """Acknowledge alarms (all, or those ``keys``: ``device/rule``); return how many
        changed. The acknowledge button calls it (``by`` ``button``), and the ``ack``
        command (``platform``)."""
        events = self.alarms.acknowledge(time.monotonic(), now_ms(), by, keys)
        if events:
            self._emit(events)
        return len(events)

    async def _alarm_timer(self) -> None:
        """Let time act on the alarms (delays, stale data) and keep the outputs and the
        status LED current; with none of them, only follow the clock (once a second)."""
        while True:
            busy = self.cfg.alarms or self.cfg.outputs or self.cfg.gpio.status_led
            tick = ALARM_TICK_S if busy else 1.0  # (a reload may add the first alarm)
            self._check_clock()
            changes = self.availability.tick(time.monotonic(), now_ms())
            if changes:
                self._availability_changed(changes)
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
        self.health.start(stats)
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
            asyncio.create_task(self.health.run(), name="health"),
            asyncio.create_task(self._disk_retry(), name="disk-retry"),
            asyncio.create_task(self.writer.watch(), name="buffer-watch"),
            asyncio.create_task(self.retained.run(), name="retained"),
            asyncio.create_task(self.status.run(), name="status-file"),
            asyncio.create_task(self.commands.run(), name="commands"),
        ]
        if self.rpc is not None:
            bg.append(asyncio.create_task(self.rpc.run(), name="thingsboard-rpc"))
        link_task = asyncio.create_task(self.link.run(), name="mqtt")
        loop = asyncio.get_running_loop()

        def pressed() -> None:  # on gpiozero's thread: hand over to the loop
            loop.call_soon_threadsafe(self.acknowledge, "button")

        self.gpio.on_ack = pressed
        self._running = True
        for runner in self._runners.values():
            self._start_task(runner)
        alarm_timer = asyncio.create_task(self._alarm_timer(), name="alarms")
        # (the device tasks are supervised: they end only when cancelled, by a stop or a
        # reload, so they are not watched here)
        watched = [*bg, link_task, alarm_timer]
        stop_wait = asyncio.create_task(self.stop_event.wait(), name="stop")
        done, _ = await asyncio.wait([stop_wait, *watched], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for t in done:
            if t is not stop_wait and t.exception() is not None:
                exc = t.exception()
                assert exc is not None
                log.critical(
                    "task %s failed: %s at %s; stopping",
                    t.get_name(),
                    type(exc).__name__,
                    where_raised(exc),
                )
                code = 1
        if self.reloader is not None:
            await self.reloader.close()
        polls = [*self._device_tasks.values(), alarm_timer]
        self._device_tasks.clear()
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
        self.telemetry.flush()  # polls waiting for their batch
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
        self._availability_changed(self.availability.stop(now_ms()))
        self.health.publish(await self.buffer.stats(), False)  # the last word on the broker
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
        await self.status.close()
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


async def run_agent(
    cfg: AgentConfig, notifier: Notifier | None = None, config_path: str | None = None
) -> int:
    """Run the agent with SIGTERM/SIGINT (stop), SIGUSR1 (debug log on/off) and, with
    ``config_path``, SIGHUP (reload, :mod:`agent.reload`) handlers, telling systemd its
    state through ``notifier`` (default: from the environment,
    :class:`agent.sdnotify.Notifier`); return the exit code.

    ``READY=1`` goes out once the agent is built: config loaded, buffer open, outputs in
    their safe state; not waiting for the broker or the devices (case 052 E). A reload is
    framed by ``RELOADING=1`` and ``READY=1``, whatever its outcome.
    """
    notifier = notifier or Notifier()
    notifier.status(f"opening the buffer in {cfg.state_dir}")
    agent = Agent(cfg, config_path=config_path)
    supervisor = Supervisor(agent, notifier)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not agent.stop_event.is_set():
            supervisor.stopping()
        agent.stop_event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGUSR1, toggle_debug)
    if agent.reloader is not None:
        agent.reloader.on_begin = supervisor.reloading
        agent.reloader.on_end = supervisor.ready
        loop.add_signal_handler(signal.SIGHUP, agent.reloader.request)
    supervisor.ready()
    watch = asyncio.create_task(supervised("supervisor", supervisor.run), name="supervisor")
    try:
        return await agent.run()
    finally:
        if not agent.stop_event.is_set():  # a task failed: the agent stopped by itself
            supervisor.stopping()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        notifier.close()
