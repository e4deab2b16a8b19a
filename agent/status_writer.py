"""The daemon's side of ``edge-agent status`` and of the health message's metrics: collects
the facts from the parts the agent already has (link, publisher, buffer, availability,
pollers, alarms, GPIO, clock) and writes the state file (:mod:`agent.status`).

Bounded time on the loop: the snapshot is gathered on the loop from in-memory state only;
every filesystem access (the buffer's counters, sizes, free space, ``/proc``, ``/sys``,
``vcgencmd``, the file itself) runs on a thread, one at a time each, so a disk that
stops answering delays the file, never the loop (the file then goes stale, and
``status`` says the agent does not answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.buffer import BufferStats, write_replace
from agent.clock import boot_id, mono_ms
from agent.metrics import PollStats, RateMeter, SystemProbe, throttle_conditions
from agent.readings import now_ms
from agent.status import (
    EVERY_S,
    FILE_MODE,
    FORMAT,
    HEARTBEAT_S,
    SLOW_EVERY_S,
    STALE_S,
    PointsText,
    RawJson,
    alarm_item,
    buffer_section,
    choose_location,
    device_section,
    outputs_section,
    proc_start_ticks,
    raw_chunks,
    uplink_section,
    without_time,
)
from drivers.base import PointResult

if TYPE_CHECKING:
    from agent.app import Agent

WRITE_BATCH = 65536
"""Bytes of the state file written at a time (never the whole 600 kB of 10,000 points at
once: a buffer that size is a fresh mapping each second, and adds to the peak RSS)."""


def _batched(chunks: Iterable[str]) -> Iterator[bytes]:
    """``chunks`` encoded as UTF-8, in pieces of about :data:`WRITE_BATCH` bytes."""
    batch: list[bytes] = []
    size = 0
    for chunk in chunks:
        data = chunk.encode()
        batch.append(data)
        size += len(data)
        if size >= WRITE_BATCH:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


log = logging.getLogger(__name__)


class StatusWriter:
    """Keeps the state file of ``agent`` current and measures the health's metrics.

    Args:
        agent: the running agent (read only).
        path: where to write (default: :func:`agent.status.choose_location`).
    """

    def __init__(self, agent: Agent, path: Path | None = None) -> None:
        self.agent = agent
        cfg = agent.cfg
        state_dir = Path(cfg.state_dir)
        if path is None:
            self.path, self.in_ram = choose_location(state_dir)
        else:
            self.path, self.in_ram = path, True
        self.polls = PollStats([d.id for d in cfg.devices])
        self.rate = RateMeter()
        db = state_dir / "buffer.db"
        self.probe = SystemProbe(state_dir, [db, db.with_name("buffer.db-wal")])
        self.started_ms = now_ms()
        self._boot = boot_id()
        self._proc_start = proc_start_ticks(os.getpid())
        self._points = {d.id: PointsText({p.name: p.unit for p in d.points}) for d in cfg.devices}
        self._last: dict[str, RawJson | Sequence[PointResult]] = {}
        """Device → its last poll: the ``points`` text, or the results to format."""
        self._stats: BufferStats | None = None
        self._oldest: int | None = None
        self._query: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-file")
        self._writing: asyncio.Future[None] | None = None
        self._written_key: dict[str, Any] | None = None
        self._written_at = -1e9
        self._error: str | None = None
        self.writes = 0
        """State files written so far."""

    def devices_changed(self) -> None:
        """A config reload changed the agent's devices: a device kept keeps its figures,
        a new one starts without any, a removed one is forgotten."""
        devices = self.agent.cfg.devices
        old = self.polls.devices
        fresh = PollStats([d.id for d in devices if d.id not in old])
        self.polls.devices = {d.id: old.get(d.id) or fresh.devices[d.id] for d in devices}
        self._points = {d.id: PointsText({p.name: p.unit for p in d.points}) for d in devices}
        # a device kept keeps its last poll until the next one (its points as written then,
        # with the units of then, when the poll's text was joined at once)
        self._last = {d: last for d, last in self._last.items() if d in self._points}

    def on_poll(
        self,
        device: str,
        ts_ms: int,
        results: Sequence[PointResult],
        texts: Sequence[str] | None = None,
    ) -> None:
        """Every poll (or reading of a streaming sensor) of the agent; ``texts``: the JSON
        of its values (:func:`agent.contract.telemetry.value_texts`), when made.

        A poll with ``texts`` has its ``points`` text joined now (no Python code per point,
        and the results and texts are not kept: 10,000 points are 5 kB of text per 100);
        any other poll's results are kept until the next state file formats them."""
        self.polls.on_poll(device, ts_ms, results, time.monotonic())
        points = self._points.get(device)
        if points is not None:
            self._last[device] = points.render(results, texts) if texts is not None else results

    # -- facts ---------------------------------------------------------------------------

    def _overruns(self) -> dict[str, int]:
        return {st.device.id: st.overruns for p in self.agent.pollers for st in p.states}

    async def _query_buffer(self) -> None:
        buffer = self.agent.buffer
        try:
            self._stats = await buffer.stats()
            rows = await buffer.fetch(0, 1)
        except Exception:  # (the writer and health report the buffer's troubles)
            return
        self._oldest = rows[0].ts_ms if rows else None

    def _refresh(self, now: float) -> None:
        """Start the measurements that need a thread (one of each at a time)."""
        self.rate.sample(now, self.agent.publisher.published)
        self.probe.refresh(now)
        if self._query is None or self._query.done():
            self._query = asyncio.ensure_future(self._query_buffer())

    def health_fields(self) -> dict[str, Any]:
        """The health message's metrics (:class:`agent.contract.payloads.Health`):
        per-device poll errors and last good reading's age, poll overruns, the publish
        rate, reconnects, RSS, free disk, SoC temperature and throttling."""
        now = time.monotonic()
        agent = self.agent
        overruns = self._overruns()
        sample = self.probe.last
        throttled = None
        if sample.throttled is not None:
            throttled = {
                "flags": f"0x{sample.throttled:x}",
                **throttle_conditions(sample.throttled),
            }
        return {
            "devices": {
                dev: {
                    "poll_errors": d.poll_errors,
                    "errors_last_hour": d.errors_last_hour(now),
                    "last_good_age_s": self.polls.last_good_age(dev, now),
                    "overruns": overruns.get(dev, 0),
                }
                for dev, d in self.polls.devices.items()
            },
            "poll_overruns": sum(overruns.values()),
            "publish_rate": self.rate.rate(now, agent.publisher.published),
            "reconnects": max(0, agent.link.connects - 1),
            "rss_bytes": sample.rss_bytes,
            "disk_free_bytes": sample.disk_free_bytes,
            "soc_temp_c": sample.soc_temp_c,
            "throttled": throttled,
        }

    def _points_of(self, device: str) -> RawJson:
        last = self._last.get(device, ())
        return last if isinstance(last, RawJson) else self._points[device].render(last, None)

    def snapshot(self) -> dict[str, Any]:
        """The state file's document now (gathered from memory only)."""
        agent, cfg = self.agent, self.agent.cfg
        now = time.monotonic()
        link, pub = agent.link, agent.publisher
        stats = self._stats
        sample = self.probe.last
        stall = agent.writer.stalled
        error = agent.buffer_error
        if stall is not None:
            error = f"no commit has succeeded for {now - stall.since:.0f} s: {stall.error}"
        overruns = self._overruns()
        devices = []
        for d in cfg.devices:
            polls = self.polls.devices[d.id]
            avail = agent.availability.state(d.id)
            devices.append(
                device_section(
                    device=d.id,
                    driver=d.driver,
                    bus=d.bus,
                    online=None if avail is None else avail.online,
                    reason=None if avail is None else avail.reason,
                    error=None if avail is None else avail.error,
                    since_ms=None if avail is None else avail.since_ms,
                    last_poll_ms=polls.last_poll_ms,
                    last_good_ms=polls.last_good_ms,
                    last_good_age_s=self.polls.last_good_age(d.id, now),
                    points=self._points_of(d.id),
                    poll_errors=polls.poll_errors,
                    errors_last_hour=polls.errors_last_hour(now),
                    overruns=overruns.get(d.id, 0),
                )
            )
        alarms = [
            alarm_item(
                a.key, a.state.state, a.rule.severity, a.state.value, a.unit, a.state.raised_ms
            )
            for a in agent.alarms.alarms
            if a.on
        ]
        tls = link.tls_health()
        return {
            "format": FORMAT,
            "gateway": cfg.gateway_id,
            "version": __version__,
            "pid": os.getpid(),
            "proc_start": self._proc_start,
            "boot_id": self._boot,
            "started": self.started_ms,
            "ts": now_ms(),
            "mono_ms": mono_ms(),
            "every_s": EVERY_S if self.in_ram else SLOW_EVERY_S,
            "stale_after_s": STALE_S if self.in_ram else HEARTBEAT_S + 2 * SLOW_EVERY_S,
            "state_dir": str(Path(cfg.state_dir).absolute()),
            "locked": agent.locked,
            "uplink": uplink_section(
                connected=link.connected.is_set(),
                since_ms=link.since_ms or self.started_ms,
                host=link.cfg.host,
                port=link.port,
                tls=tls["tls"] is not None,
                tls_verify=tls.get("tls_verify"),
                client_id=link.client_id,
                reconnects=max(0, link.connects - 1),
                problem=link.problem,
                published=pub.published,
                acked=pub.acked_total,
                publish_rate=self.rate.rate(now, pub.published),
            ),
            "buffer": buffer_section(
                memory=agent.buffer.sync.memory,
                error=error,
                path=str(agent.buffer.sync.path),
                pending=stats.pending if stats else 0,
                oldest_ms=self._oldest,
                dropped=stats.dropped if stats else 0,
                last_seq=stats.last_seq if stats else 0,
                size_bytes=None if agent.buffer.sync.memory else sample.buffer_bytes,
                disk_free_bytes=sample.disk_free_bytes,
                write_bytes_per_hour=agent.health.disk_write_rate(),
                waiting=None if stall is None else agent.writer.waiting,
            ),
            "clock": {"synced": agent.clock.synced, "source": cfg.clock.sync},
            "system": {
                "rss_bytes": sample.rss_bytes,
                "soc_temp_c": sample.soc_temp_c,
                "throttled": sample.throttled,
            },
            "devices": devices,
            "alarms": alarms,
            "outputs": outputs_section(agent.gpio.available, agent.gpio.error, agent.gpio.states()),
        }

    # -- the file ------------------------------------------------------------------------

    def _write(self, doc: dict[str, Any]) -> None:
        write_replace(self.path, _batched(raw_chunks(doc)), sync=False, mode=FILE_MODE)

    def _written(self, fut: asyncio.Future[None]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is None:
            self.writes += 1
            if self._error is not None:
                log.info("state file %s is written again", self.path)
            self._error = None
            return
        text = f"{type(exc).__name__}: {exc}"
        if text != self._error:  # once per cause
            log.warning("cannot write the state file %s: %s", self.path, text)
        self._error = text

    def tick(self) -> None:
        """Refresh the measurements and write the file when due (never waits)."""
        now = time.monotonic()
        self._refresh(now)
        if self._writing is not None and not self._writing.done():
            return  # the last write still runs: this one is skipped
        doc = self.snapshot()
        if not self.in_ram:
            key = without_time(doc)
            since = now - self._written_at
            changed = key != self._written_key
            if since < HEARTBEAT_S and (not changed or since < SLOW_EVERY_S):
                return
            self._written_key = key
        self._written_at = now
        loop = asyncio.get_running_loop()
        self._writing = loop.run_in_executor(self._pool, self._write, doc)
        self._writing.add_done_callback(self._written)

    async def run(self) -> None:
        """Write the state file every :data:`agent.status.EVERY_S` until cancelled."""
        where = "RAM" if self.in_ram else "the state_dir (written on a change, every 5 s at most)"
        log.info("state for edge-agent status: %s (%s)", self.path, where)
        while True:
            self.tick()
            await asyncio.sleep(EVERY_S)

    async def close(self, timeout: float = 1.0) -> None:
        """The agent stops: remove the state file (``status`` then says it is stopped)."""
        loop = asyncio.get_running_loop()

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

        with contextlib.suppress(Exception):  # (a write that failed was logged)
            if self._writing is not None:
                await asyncio.wait_for(asyncio.shield(self._writing), timeout)
            await asyncio.wait_for(loop.run_in_executor(self._pool, remove), timeout)
        if self._query is not None:
            self._query.cancel()
            await asyncio.gather(self._query, return_exceptions=True)
        self._pool.shutdown(wait=False)
        self.probe.close()
