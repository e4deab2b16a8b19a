"""Drain the buffer to MQTT: QoS 1, oldest first, rows deleted only after PUBACK."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable

from agent.buffer import AsyncBuffer, Row, payload_with_seq
from agent.contract.topics import ONLINE
from agent.mqtt import MqttLink

log = logging.getLogger(__name__)

FRESH_MAX = 4096
"""Most freshly committed rows kept in memory for the publisher."""
REFUSED_RETRY_S = 60.0
"""A message the broker refused (MQTT 5 reason code) is offered again after this long."""
ALARMS_MAX = 10_000
"""Most alarm events kept in memory to go ahead of a backlog; more go in seq order."""
REFUSED_MAX = 1024
"""Most refused rows kept in memory for a retry; more wait in the buffer for a restart."""


class Publisher:
    """Moves rows from the buffer to the broker.

    At most ``window`` messages are unacknowledged at a time. Acknowledged seqs are deleted
    from the buffer in batches (one transaction per batch); a crash between PUBACK and that
    delete makes the message go out again after restart, with the same seq and body, which
    is the at-least-once contract of ``docs/mqtt.md``.
    """

    def __init__(
        self,
        buffer: AsyncBuffer,
        link: MqttLink,
        status_topic: str,
        window: int,
        drain_rate: int = 0,
    ) -> None:
        self.buffer = buffer
        self.link = link
        self.status_topic = status_topic
        self.window = window
        self.cursor = 0  # highest seq handed to the MQTT client
        self.inflight: dict[int, Row] = {}  # mid -> row
        self._refused: dict[int, tuple[Row, float]] = {}  # seq -> (row, next try)
        self._refused_topics: set[str] = set()
        self._acked: list[int] = []
        self._fresh: collections.deque[Row] = collections.deque()
        self._ack_failing = False
        self._caught_up = False  # True: the file holds nothing unsent beyond _fresh
        self._fetching = False  # True: run() waits for rows read back from the file
        self.last_offered = 0  # highest seq committed by this process
        self._wake = asyncio.Event()
        self._ack_event = asyncio.Event()
        self._status_mid: int | None = None
        self._status_acked = asyncio.Event()
        self.published = 0
        self.acked_total = 0
        self.drain_rate = drain_rate
        """Most backlog rows published per second (0: no limit)."""
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self._early: list[Row] = []  # committed at start, before the first connection
        self._connections = 0
        self._alarms: dict[int, Row] = {}  # alarm events not yet handed to the client
        self._ahead: set[int] = set()  # alarm events handed ahead of the cursor
        self.on_online: Callable[[], None] = lambda: None
        """Called after `online` was published on a new connection (retained states)."""
        self.on_other_puback: Callable[[int], None] = lambda mid: None
        """Called with the PUBACK of a publish that is not a buffered row (retained state)."""
        self.wire: Callable[[str, bytes], bytes] | None = None
        """(topic, payload with seq) → the payload as published (compression); None: as
        buffered. Deterministic, so that a resend of a seq is byte-identical."""
        link.on_connected = self.on_connected
        link.on_puback = self.on_puback

    def offer(self, rows: list[Row], dropped_upto: int = 0) -> None:
        """Rows were just committed: keep them in memory, so that a publisher that has no
        backlog sends them without reading them back from the buffer.

        ``dropped_upto``: the size cap deleted every row up to this seq; those not yet sent
        are skipped here too, so that what the platform misses is exactly what was counted
        as dropped.
        """
        if dropped_upto > self.cursor:
            # (the cap skips telemetry, never alarm events: those stay in _alarms)
            self.cursor = dropped_upto
            while self._fresh and self._fresh[0].seq <= dropped_upto:
                self._fresh.popleft()
        self.add_alarm_events(rows)
        if rows:
            self.last_offered = rows[-1].seq
        if not self._connections and not self.link.outage and len(self._early) < FRESH_MAX:
            # taken while the first connection attempt is under way: live, not backlog
            self._early.extend(r for r in rows if not r.prio)
        if (
            rows
            and not self._caught_up
            and self.link.connected.is_set()
            and rows[0].seq > self.cursor + 1
        ):
            # a backlog is draining: live rows go out now, ahead of it (live-first)
            self._send_ahead([r for r in rows if r.seq not in self._ahead])
            self._wake.set()
            return
        self._fresh.extend(rows)
        if len(self._fresh) > FRESH_MAX:
            self._fresh.clear()  # a backlog: the buffer file is read instead
            self._caught_up = False
        self._send_fresh_now()
        if self._fresh or not self._caught_up:  # rows wait, in memory or in the file
            self._wake.set()

    def _send_fresh_now(self) -> None:
        """What :meth:`run` would do next when it is idle and caught up: hand the fresh
        rows to the client now, in seq order, so that the task need not wake for them
        (one task step less per commit)."""
        if (
            self._caught_up
            and not self._fetching
            and not self._refused
            and self.link.connected.is_set()
            and len(self.inflight) < self.window
        ):
            rows = self._take_fresh(self.window - len(self.inflight))
            if rows:
                self._send(rows, advance=True)

    def rewind(self) -> None:
        """The buffer was replaced (an in-memory buffer moved to disk, where older unsent
        rows may wait): read it again from its oldest row. Rows already handed to the
        client (in flight, or acknowledged and not yet deleted) are skipped, not resent."""
        self._ahead |= {r.seq for r in self.inflight.values()} | set(self._acked)
        self.cursor = 0
        self._fresh.clear()
        self._caught_up = False
        self._wake.set()

    def restamped(self, bodies: dict[int, tuple[bytes, int]]) -> None:
        """Rows re-stamped in the buffer (seq → new body and time): the copies kept in memory
        for publishing take the new bodies too."""

        def swap(r: Row) -> Row:
            new = bodies.get(r.seq)
            return r if new is None else Row(r.seq, r.topic, new[0], new[1], r.prio)

        self._fresh = collections.deque(swap(r) for r in self._fresh)
        for seq in bodies.keys() & self._alarms.keys():
            self._alarms[seq] = swap(self._alarms[seq])

    def _take_fresh(self, room: int) -> list[Row] | None:
        fresh = self._fresh
        while fresh and fresh[0].seq <= self.cursor:
            fresh.popleft()
        if not fresh or fresh[0].seq != self.cursor + 1:
            return None  # older rows wait in the buffer file
        out: list[Row] = []
        while fresh and len(out) < room and fresh[0].seq == self.cursor + 1 + len(out):
            out.append(fresh.popleft())
        return out

    def add_alarm_events(self, rows: list[Row]) -> None:
        """Alarm events (``prio`` rows) to publish ahead of any backlog: at once when
        connected, else first thing after the next CONNACK. (The agent also passes the
        unsent ones found in the buffer at start.)"""
        fresh = [r for r in rows if r.prio]
        if not fresh:
            return
        for r in fresh:
            if len(self._alarms) < ALARMS_MAX:
                self._alarms[r.seq] = r
        if self.link.connected.is_set():
            self._send_alarm_events()

    def on_connected(self) -> None:
        """After every CONNACK, synchronously inside the client's CONNACK handling, so
        before the client resends its in-flight messages: first the alarm events not yet
        sent, then ``online`` (retained) and :attr:`on_online`, then (after the start's
        first attempt) the rows polled while it was under way, then the rest in seq
        order."""
        self._send_alarm_events()
        self.link.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self.on_online()
        self._connections += 1
        early, self._early = self._early, []
        if self._connections == 1 and self.link.failed_attempts == 0:
            # the first attempt after the start succeeded: what was polled meanwhile is
            # live, and goes ahead of a backlog left by the previous run
            self._send_ahead([r for r in early if r.seq > self.cursor])
        self._wake.set()

    def _send_alarm_events(self) -> None:
        """Hand every waiting alarm event to the client (whatever the window: they are
        few, and they go first)."""
        rows = [self._alarms.pop(seq) for seq in sorted(self._alarms)]
        self._send_ahead(rows)

    def _send_ahead(self, rows: list[Row]) -> None:
        """Publish rows ahead of the cursor (alarm events, live rows during a drain); the
        drain skips them when it gets there. Rows not sent (link down) wait in the
        buffer, or in memory for alarm events."""
        for i, row in enumerate(rows):
            if not self.link.connected.is_set():
                for r in rows[i:]:
                    if r.prio:
                        self._alarms[r.seq] = r
                return
            self._alarms.pop(row.seq, None)
            mid = self.link.publish(row.topic, self._payload(row), qos=1)
            self.inflight[mid] = row
            if row.seq > self.cursor:
                self._ahead.add(row.seq)
            self.published += 1

    def _payload(self, row: Row) -> bytes:
        payload = payload_with_seq(row.seq, row.body)
        return payload if self.wire is None else self.wire(row.topic, payload)

    def on_puback(self, mid: int, ok: bool, reason: str) -> None:
        """PUBACK for ``mid``; ``ok`` is False for an MQTT 5 failure reason code."""
        if mid == self._status_mid:
            self._status_acked.set()
            return
        was_full = len(self.inflight) >= self.window
        row = self.inflight.pop(mid, None)
        if row is None:
            self.on_other_puback(mid)
            return
        if ok:
            self._acked.append(row.seq)
            self.acked_total += 1
            self._ack_event.set()
        else:
            self._refuse(row, reason)
        if was_full:
            self._wake.set()

    def _refuse(self, row: Row, reason: str) -> None:
        """An MQTT 5 PUBACK with a failure reason code (e.g. 0x87 not authorized): the row
        stays in the buffer and is offered again after :data:`REFUSED_RETRY_S`, alone; the
        rows after it go on as usual."""
        level = logging.DEBUG if row.topic in self._refused_topics else logging.ERROR
        self._refused_topics.add(row.topic)
        log.log(
            level,
            "broker refused the message seq %d on %s: %s; it stays buffered and is offered "
            "again every %.0fs (check the broker's ACL for this topic)",
            row.seq,
            row.topic,
            reason,
            REFUSED_RETRY_S,
        )
        self._refused[row.seq] = (row, time.monotonic() + REFUSED_RETRY_S)
        while len(self._refused) > REFUSED_MAX:  # the rest wait in the file for a restart
            del self._refused[next(iter(self._refused))]

    def _due_refused(self, room: int) -> tuple[list[Row], float | None]:
        """Refused rows due for another try (up to ``room``), and the next due time."""
        now = time.monotonic()
        due = [s for s, (_, t) in self._refused.items() if t <= now][:room]
        rows = [self._refused.pop(s)[0] for s in due]
        nxt = min((t for _, t in self._refused.values()), default=None)
        return rows, nxt

    async def run(self) -> None:
        """Publish forever; cancel to stop."""
        while True:
            await self.link.connected.wait()
            room = self.window - len(self.inflight)
            self._wake.clear()
            if room <= 0:
                await self._wake.wait()
                continue
            retry, next_retry = self._due_refused(room) if self._refused else ([], None)
            if retry:
                self._send(retry, advance=False)
                continue
            rows = self._take_fresh(room)
            if rows is None and not (self._caught_up and not self._fresh):
                allowed = self._drain_allowance(room)
                if allowed == 0:
                    await asyncio.sleep(1.0 / self.drain_rate)
                    continue
                self._fetching = True
                try:
                    rows = await self.buffer.fetch(self.cursor, allowed)
                finally:
                    self._fetching = False
                self._caught_up = len(rows) < allowed
                self._tokens -= sum(1 for r in rows if r.seq not in self._ahead)
            if rows:
                self._send(rows, advance=True)
                continue
            # nothing to send: wait for new rows, an ack, or the next refused row's retry
            timeout = None if next_retry is None else max(0.0, next_retry - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _drain_allowance(self, room: int) -> int:
        """How many backlog rows may go now under :attr:`drain_rate` (a token bucket
        holding at most one second's worth)."""
        if self.drain_rate <= 0:
            return room
        now = time.monotonic()
        self._tokens = min(
            float(self.drain_rate), self._tokens + (now - self._tokens_at) * self.drain_rate
        )
        self._tokens_at = now
        return max(0, min(room, int(self._tokens)))

    def _send(self, rows: list[Row], advance: bool) -> None:
        for row in rows:
            if not self.link.connected.is_set():
                if advance:
                    self._caught_up = False  # the rest is read back from the file
                else:
                    self._refused[row.seq] = (row, time.monotonic())
                continue
            if advance and row.seq in self._ahead:  # an alarm event already sent ahead
                self._ahead.discard(row.seq)
                self.cursor = row.seq
                continue
            if row.prio:
                self._alarms.pop(row.seq, None)  # reached in seq order before its turn
            mid = self.link.publish(row.topic, self._payload(row), qos=1)
            self.inflight[mid] = row
            if advance:
                self.cursor = row.seq
            self.published += 1
        if self._ahead and advance:
            self._ahead = {s for s in self._ahead if s > self.cursor}

    def take_acked(self) -> list[int]:
        """Hand the acknowledged seqs to the buffer writer, which deletes them in its next
        commit (one transaction per polling cycle, acknowledgements included)."""
        out, self._acked = self._acked, []
        return out

    def return_acked(self, seqs: list[int]) -> None:
        """The commit that was to delete ``seqs`` failed: keep them for the next try."""
        self._acked = seqs + self._acked
        self._ack_event.set()

    async def run_acks(self, interval: float = 2.0) -> None:
        """Delete acknowledged rows that no commit took within ``interval`` (no polls, or
        long poll intervals), in batches; cancel to stop (call :meth:`flush_acks`)."""
        while True:
            await self._ack_event.wait()
            self._ack_event.clear()
            await asyncio.sleep(interval)
            await self.flush_acks()

    async def flush_acks(self) -> bool:
        """Delete every acknowledged row now; on a write error keep them for the next try.

        A failed delete is not fatal: the rows are already at the broker, and at worst they
        are sent once more after a restart (same seq).
        """
        if not self._acked:
            return True
        done, self._acked = self._acked, []
        try:
            await self.buffer.ack(done)
        except sqlite3.Error as exc:
            self._acked = done + self._acked
            if not self._ack_failing:
                log.error(
                    "cannot delete %d acknowledged message(s) from buffer %s: %s; retrying",
                    len(done),
                    self.buffer.sync.path,
                    exc,
                )
                self._ack_failing = True
            self._ack_event.set()
            return False
        if self._ack_failing:
            log.info("acknowledged messages are deleted from the buffer again")
            self._ack_failing = False
        return True

    async def drain(self, timeout: float) -> bool:
        """For a clean stop: wait until every committed row was published and acknowledged,
        or ``timeout`` passed, or the broker is unreachable. Return True when drained."""
        deadline = time.monotonic() + timeout
        while self.link.connected.is_set() and time.monotonic() < deadline:
            if not self.inflight and self.cursor >= self.last_offered:
                return True
            await asyncio.sleep(0.01)
        return not self.inflight and self.cursor >= self.last_offered

    async def publish_offline(self, payload: bytes, timeout: float) -> bool:
        """Publish the retained ``offline`` status and wait for its PUBACK."""
        if not self.link.connected.is_set():
            return False
        self._status_acked.clear()
        self._status_mid = self.link.publish(self.status_topic, payload, qos=1, retain=True)
        try:
            async with asyncio.timeout(timeout):
                await self._status_acked.wait()
        except TimeoutError:
            return False
        return True
