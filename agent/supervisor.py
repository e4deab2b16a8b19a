"""systemd supervision of the running agent: readiness, a status line, and a watchdog fed
only while the agent makes progress.

The watchdog (``WatchdogSec=`` in the unit; sd_watchdog_enabled(3), sd_notify(3)
``WATCHDOG=1``) is pinged by :meth:`Supervisor.run`, a task on the agent's own asyncio
loop, every quarter of the interval, and only when every check of :meth:`problems` passes:

- the loop runs (a loop blocked in a write, a long computation or a C call sends no
  ping, because the pinging task never gets to run);
- no bus is stuck inside a poll: each poll's requests end (reply, exception or timeout)
  within the longest device timeout of the bus plus a slack
  (:meth:`agent.poller.BusPoller.stuck`), so a driver stalled inside a read stops the
  pings while dead devices and a missing broker do not (case 052 B);
- the buffer commits: no single commit has been under way for more than half the
  watchdog interval (a disk that stops answering, a lock that is never given up). A
  commit that returns an error (a file locked by another program past SQLite's busy
  timeout, a full disk) is not a hang: the agent keeps the messages in memory, retries,
  and reports it after ``buffer.stall_after`` (health ``buffer_error``, a notice); a
  restart would only lose what waits in memory.

No ping means systemd kills and restarts the agent ``WatchdogSec`` after the last one
(systemd.service(5), ``WatchdogSec=``). A timer on another thread would go on pinging
while the loop hangs; that is what this design avoids (case 052).

The status line (``STATUS=``, shown by ``systemctl status``) says how many devices poll
and how many are offline, the messages pending in the buffer, and the uplink's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from agent import logs
from agent.buffer import BufferStats
from agent.sdnotify import Notifier

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger(__name__)

STATUS_EVERY_S = 2.0
"""How often the status line is brought up to date (it is sent only when it changed)."""
COMMIT_STUCK_S = 10.0
"""Without a watchdog: seconds without a successful commit attempt before the status
line says so (with one: half the watchdog interval)."""
PING_FLOOR_S = 0.01
"""The shortest pause between two pings, whatever ``WATCHDOG_USEC`` says."""


class Supervisor:
    """Tells systemd about one :class:`agent.app.Agent` through a :class:`Notifier`.

    Call :meth:`ready` once the agent is built (its config loaded, its buffer open, its
    outputs in their safe state), run :meth:`run` as a task, and :meth:`stopping` when the
    clean stop begins. A reload calls :meth:`reloading` and then :meth:`ready` again.
    """

    def __init__(self, agent: Agent, notifier: Notifier) -> None:
        self.agent = agent
        self.notifier = notifier
        usec = notifier.watchdog_usec
        self.watchdog_s = None if usec is None else usec / 1e6
        """The watchdog interval (s), or None: off."""
        self.ping_every = (
            STATUS_EVERY_S if self.watchdog_s is None else max(self.watchdog_s / 4, PING_FLOOR_S)
        )
        """Seconds between two checks (and pings, while they pass)."""
        self.commit_stuck_after = COMMIT_STUCK_S if self.watchdog_s is None else self.watchdog_s / 2
        """Seconds one commit may stay under way before the buffer counts as stuck
        (commits that fail and are retried are the buffer's ``stall_after`` report)."""
        self.pings = 0
        """``WATCHDOG=1`` sent so far."""
        self._failing: list[str] = []
        self._stats: BufferStats | None = None
        self._stats_task: asyncio.Future[BufferStats] | None = None
        self._connected_since: str | None = None
        self._last_status = 0.0
        if self.watchdog_s is not None:
            for poller in agent.pollers:
                if poller.stuck_after + self.ping_every > self.watchdog_s:
                    log.warning(
                        "bus %s: a stuck read is noticed after %.1f s, longer than the "
                        "watchdog allows (WatchdogSec=%g s): systemd restarts the agent "
                        "later than WatchdogSec after a hang; raise WatchdogSec above %.0f s",
                        poller.name,
                        poller.stuck_after,
                        self.watchdog_s,
                        poller.stuck_after + self.ping_every,
                    )

    def ready(self) -> None:
        """``READY=1`` with the status line (once per start, and after a reload)."""
        self.notifier.ready(self.status_text())

    def reloading(self) -> None:
        """``RELOADING=1``: a reload begins; call :meth:`ready` when it is over."""
        self.notifier.reloading()

    def stopping(self) -> None:
        """``STOPPING=1``: the clean stop begins."""
        self.notifier.stopping()

    def problems(self, now: float) -> list[str]:
        """What keeps the agent from progressing at monotonic time ``now`` (s): one text
        per stuck bus, and one for a buffer whose commit has been under way for more than
        :attr:`commit_stuck_after` seconds. Empty: all is moving."""
        out = [why for p in self.agent.pollers if (why := p.stuck(now)) is not None]
        since = self.agent.writer.attempt_since
        if since is not None and now - since > self.commit_stuck_after:
            out.append(
                f"buffer {self.agent.buffer.sync.path}: a commit has not returned for "
                f"{now - since:.0f} s"
            )
        return out

    def check(self, now: float) -> bool:
        """Check progress once: ping the watchdog when all moves, log the start and the
        end of a time without progress. Returns whether all moves."""
        problems = self.problems(now)
        if not problems:
            if self._failing:
                log.warning("the agent makes progress again; watchdog pings resume")
                self._failing = []
            self.notifier.watchdog()
            if self.notifier.watchdog_usec is not None:
                self.pings += 1
            return True
        if problems != self._failing:
            what = (
                f"systemd restarts it within WatchdogSec={self.watchdog_s:g} s"
                if self.watchdog_s is not None
                else "(no systemd watchdog to restart it)"
            )
            log.error("the agent makes no progress: %s; %s", "; ".join(problems), what)
        self._failing = problems
        return False

    def status_text(self) -> str:
        """One line for ``systemctl status``: devices, buffer, uplink (and what is stuck)."""
        a = self.agent
        n = len(a.cfg.devices)
        offline = a.availability.offline
        devices = f"polling {n} device{'s' if n != 1 else ''}"
        if offline:
            devices += f" ({offline} offline)"
        stats = self._poll_stats()
        pending = "pending messages unknown" if stats is None else f"{stats.pending} pending"
        where = "memory (the disk cannot be written)" if a.buffer.sync.memory else "buffer"
        buffer = f"{pending} in {where}"
        link = a.link
        url = f"{'mqtts' if link.tls is not None else 'mqtt'}://{link.cfg.host}:{link.port}"
        if link.connected.is_set():
            if self._connected_since is None:
                self._connected_since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            uplink = f"uplink {url} connected since {self._connected_since}"
        else:
            self._connected_since = None
            tries = link.failed_attempts
            if link.ever_connected:
                uplink = f"uplink {url} lost, reconnecting ({tries} failed attempts)"
            elif tries:
                uplink = f"uplink {url} not reached yet ({tries} failed attempts)"
            else:
                uplink = f"uplink {url} connecting"
        text = f"{devices}; {buffer}; {uplink}"
        if self._failing:
            text = f"NO PROGRESS: {'; '.join(self._failing)} | {text}"
        return text

    def _poll_stats(self) -> BufferStats | None:
        """The buffer's counters as last known, asking for new ones without waiting (the
        buffer's thread may be the thing that hangs)."""
        task = self._stats_task
        if task is not None and task.done():
            if not task.cancelled() and task.exception() is None:
                self._stats = task.result()
            task = None
        if task is None:
            self._stats_task = asyncio.ensure_future(self.agent.buffer.stats())
        return self._stats

    async def run(self) -> None:
        """Check progress every :attr:`ping_every` seconds (pinging while it passes) and
        keep the status line current; runs until cancelled."""
        try:
            while True:
                now = time.monotonic()
                self.check(now)
                if now - self._last_status >= STATUS_EVERY_S or self._failing:
                    self._last_status = now
                    self.notifier.status(self.status_text())
                logs.flush_suppressed()
                await asyncio.sleep(self.ping_every)
        finally:
            if self._stats_task is not None and not self._stats_task.done():
                self._stats_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._stats_task
