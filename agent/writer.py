"""The buffer writer: every message the gateway makes goes into the buffer through it, in
one transaction per polling cycle (acknowledged rows deleted in the same transaction)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable

from agent.buffer import AsyncBuffer, Restamp, Row

log = logging.getLogger(__name__)


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
