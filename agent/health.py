"""The gateway's health message (``{prefix}/{gateway_id}/health``, retained; its fields are
:class:`agent.contract.payloads.Health`, documented in ``docs/mqtt.md``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agent.buffer import BufferStats
from agent.contract import payloads
from agent.contract.topics import health_topic
from agent.readings import now_ms

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger(__name__)

HEALTH_S = 30.0
"""How often the health message is published."""
HEALTH_DRAINING_S = 2.0
"""How often while a backlog drains (its progress is the pending count)."""
STATS_WAIT_S = 10.0
"""Longest wait for the buffer's counters before health uses the last ones known."""


def disk_write_bytes() -> int | None:
    """Bytes this process caused to be written to storage (``write_bytes`` of
    ``/proc/self/io``, proc(5)), or None where it cannot be read."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Health:
    """Publishes the health message every :data:`HEALTH_S`, every
    :data:`HEALTH_DRAINING_S` while a backlog drains, and at once when :attr:`now` is set
    (a connect, an alarm or availability change, the clock's trust)."""

    def __init__(self, agent: Agent, prefix: str) -> None:
        self.agent = agent
        self.topic = health_topic(prefix, agent.cfg.gateway_id)
        self.now = asyncio.Event()
        """Set to publish at once."""
        self.stats: BufferStats | None = None
        """The buffer's counters last known."""
        self._stats_task: asyncio.Future[BufferStats] | None = None
        self._started = time.monotonic()
        self._start_bytes: int | None = None

    def start(self, stats: BufferStats) -> None:
        """The agent runs: written bytes are counted from now; ``stats``: the buffer's."""
        self._start_bytes = disk_write_bytes()
        self._started = time.monotonic()
        self.stats = stats

    def disk_write_rate(self) -> int | None:
        """Bytes per hour this process caused to be written to storage since the start;
        None in the first minute (a rate over the first seconds says nothing about SD
        wear) or where /proc/self/io cannot be read."""
        elapsed = time.monotonic() - self._started
        written = disk_write_bytes()
        if written is None or self._start_bytes is None or elapsed < 60:
            return None
        return round((written - self._start_bytes) / (elapsed / 3600))

    async def run(self) -> None:
        """Publish until cancelled; the TLS notices (``cert_expiring``) go out first."""
        agent = self.agent
        while True:
            for kind, message, fields in agent.link.tls_notices():
                log.warning("%s", message)
                agent.notice(kind, message, **fields)
            stats = await self._buffer_stats()
            draining = stats.pending > agent.cfg.mqtt.max_inflight
            self.publish(stats, draining)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEALTH_DRAINING_S if draining else HEALTH_S):
                    await self.now.wait()
            self.now.clear()

    async def _buffer_stats(self) -> BufferStats:
        """The buffer's counters; the last ones known when its thread does not answer
        within :data:`STATS_WAIT_S` (a commit hanging on a disk that stopped answering),
        so that health still goes out. One query at a time is outstanding."""
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.ensure_future(self.agent.buffer.stats())
        if self.stats is None:
            self.stats = await self._stats_task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STATS_WAIT_S):
                self.stats = await asyncio.shield(self._stats_task)
        return self.stats

    def publish(self, stats: BufferStats, draining: bool) -> None:
        """The health message now, retained (when connected)."""
        agent = self.agent
        if not agent.link.connected.is_set():
            return
        stall = agent.writer.stalled
        buffer_error = agent.buffer_error
        if stall is not None:
            secs = time.monotonic() - stall.since
            buffer_error = f"no commit has succeeded for {secs:.0f} s: {stall.error}"
        body = payloads.health(
            payloads.Health(
                gateway=agent.cfg.gateway_id,
                ts_ms=now_ms(),
                pending=stats.pending,
                last_seq=stats.last_seq,
                dropped=stats.dropped,
                published=agent.publisher.published,
                acked=agent.publisher.acked_total,
                draining=draining,
                disk_write_bytes_per_hour=self.disk_write_rate(),
                gpio=agent.gpio.outputs_state() or "none",
                gpio_factory=agent.gpio.factory_name or None,
                alarms_active=sum(1 for a in agent.alarms.alarms if a.on),
                devices_offline=agent.availability.offline,
                buffer="memory" if agent.buffer.sync.memory else "disk",
                clock="synced" if agent.clock.synced else "unsynced",
                buffer_error=buffer_error,
                buffer_waiting=None if stall is None else agent.writer.waiting,
                buses={poller.name: poller.bus.counters.as_dict() for poller in agent.pollers},
                broker=agent.link.address,
                **agent.link.tls_health(),
                **agent.status.health_fields(),
            )
        )
        agent.link.publish(self.topic, body, qos=1, retain=True)
