"""The buffer writer: every message the gateway makes goes into the buffer through it, in
one transaction per polling cycle (acknowledged rows deleted in the same transaction)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.buffer import AsyncBuffer, Restamp, Row

log = logging.getLogger(__name__)

ERROR_MAX = 200
"""Characters of a commit's error text kept for health and notices."""
STALL_LOG_EVERY_S = 60.0
"""While the buffer stays unwritable, the log repeats how much waits in memory this often."""


@dataclass(frozen=True, slots=True)
class Stall:
    """The buffer cannot be written: no commit has succeeded since ``since`` (monotonic
    seconds: the start of the first commit attempt that did not succeed)."""

    since: float
    error: str
    """Why: SQLite's message for the last failed commit (e.g. ``database is locked``), or
    that a commit has not returned (a disk that stops answering)."""


class BufferWriter:
    """Collects polls and commits everything that is pending in one transaction.

    Polls arrive synchronously from bus tasks; a commit covers all polls that arrived while
    the previous commit ran (one transaction per cycle under load, per poll when idle).
    A failed commit (disk full, I/O error, the file locked by another process) is retried
    every second with the polls kept in memory, up to ``max_pending`` messages (beyond that
    the oldest are dropped and counted in :attr:`lost`).

    When no commit has succeeded for ``stall_after`` seconds (counted from the start of the
    first attempt that did not succeed, so a commit that hangs counts too), the buffer is
    :attr:`stalled`: :meth:`check_stall` (called every second by :meth:`watch`) logs how
    many messages wait in memory and calls :attr:`on_stall`; the next successful commit
    logs the recovery and calls :attr:`on_resume`.

    Attributes:
        on_commit: called with the committed rows and the buffer's ``dropped_upto`` after
            every successful commit (the publisher takes fresh rows from there instead of
            reading them back, and forgets rows the size cap deleted).
        handed_upto: the highest seq already given to the MQTT client (not counted as
            dropped when the size cap deletes it).
    """

    def __init__(
        self,
        buffer: AsyncBuffer,
        max_pending: int = 100_000,
        commit_every: float = 0.0,
        stall_after: float = 30.0,
    ) -> None:
        self.buffer = buffer
        self.stall_after = stall_after
        """Seconds without a successful commit before the buffer counts as stalled
        (``buffer.stall_after``)."""
        self.stalled: Stall | None = None
        """The current stall, once reported (None: the buffer is being written)."""
        self.on_stall: Callable[[Stall, int], None] = lambda stall, waiting: None
        """Called once per stall with the messages waiting in memory."""
        self.on_resume: Callable[[Stall, float, int], None] = lambda stall, secs, n: None
        """Called at the first successful commit after a stall: how long no commit had
        succeeded (s) and how many messages that commit wrote."""
        self._unsaved_since: float | None = None
        self._attempt_since: float | None = None
        self._error: str | None = None
        self._inflight: list[tuple[str, bytes, int, int, int | None]] = []
        self._stall_logged_at = 0.0
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

    @property
    def unsaved_since(self) -> float | None:
        """Monotonic time (s) of the start of the first commit attempt that has not
        succeeded (one under way, failed or hung), or None after a successful commit."""
        return self._unsaved_since

    @property
    def attempt_since(self) -> float | None:
        """Monotonic time (s) at which the commit under way began, or None when none is
        under way. A commit that returns an error (a locked file, a full disk) ends its
        attempt; one that does not return keeps this time."""
        return self._attempt_since

    @property
    def waiting(self) -> int:
        """Messages in memory not yet committed (queued, or in the commit under way)."""
        return len(self.pending) + len(self._inflight)

    def _readings_waiting(self) -> tuple[int, int]:
        readings = sum(1 for m in (*self._inflight, *self.pending) if not m[3])
        return readings, self.waiting - readings

    def check_stall(self, now: float) -> None:
        """Report a stall once no commit has succeeded for :attr:`stall_after` (``now``:
        monotonic seconds); while it lasts, repeat the log line every
        :data:`STALL_LOG_EVERY_S`."""
        since = self._unsaved_since
        if since is None or now - since < self.stall_after:
            return
        error = self._error or f"a commit has not returned for {now - since:.0f} s"
        first = self.stalled is None
        if not first and now - self._stall_logged_at < STALL_LOG_EVERY_S:
            return
        self._stall_logged_at = now
        readings, others = self._readings_waiting()
        log.error(
            "buffer %s %s: no commit has succeeded for %.0f s (%s); %d reading(s) and %d "
            "other message(s) wait in memory (at most %d, then the oldest readings are lost)",
            self.buffer.sync.path,
            "stalled" if first else "still stalled",
            now - since,
            error,
            readings,
            others,
            self.max_pending,
        )
        if first:
            self.stalled = Stall(since, error)
            self.on_stall(self.stalled, self.waiting)
        elif self.stalled is not None and self.stalled.error != error:
            self.stalled = Stall(since, error)

    async def watch(self) -> None:
        """Check for a stall every second (a task of the agent's life)."""
        while True:
            await asyncio.sleep(1.0)
            self.check_stall(time.monotonic())

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
        started = time.monotonic()
        if self._unsaved_since is None:
            self._unsaved_since = started
        self._inflight = batch
        self._attempt_since = started
        try:
            seqs = await self.buffer.append_many(
                batch, self.handed_upto(), state, alarms, restamp, acked
            )
        except sqlite3.Error as exc:
            self.return_acked(acked)
            self.pending = batch + self.pending
            self.state = {**state, **self.state}
            self.alarms = {**alarms, **self.alarms}
            self._error = (str(exc) or type(exc).__name__)[:ERROR_MAX]
            if not self._failing:
                log.error(
                    "cannot write buffer %s: %s; keeping %d message(s) in memory and retrying",
                    self.buffer.sync.path,
                    exc,
                    len(self.pending),
                )
                self._failing = True
            return False
        finally:
            self._inflight = []
            self._attempt_since = None
        stall, since = self.stalled, self._unsaved_since
        self._unsaved_since = self._error = self.stalled = None
        if stall is not None:
            secs = time.monotonic() - stall.since
            log.warning(
                "buffer %s written again after %.0f s without a commit: %d message(s) that "
                "waited in memory committed",
                self.buffer.sync.path,
                secs,
                len(batch),
            )
            self.on_resume(stall, secs, len(batch))
        elif self._failing:
            log.info(
                "buffer %s is writable again (after %.0f s)",
                self.buffer.sync.path,
                started - (since if since is not None else started),
            )
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
