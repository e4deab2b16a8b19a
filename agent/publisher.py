"""Drain the buffer to MQTT: QoS 1, oldest first, rows deleted only after PUBACK."""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import time

from agent.buffer import AsyncBuffer, Row, payload_with_seq
from agent.mqtt import MqttLink
from agent.topics import ONLINE

log = logging.getLogger(__name__)

FRESH_MAX = 4096
"""Most freshly committed rows kept in memory for the publisher."""


class Publisher:
    """Moves rows from the buffer to the broker.

    At most ``window`` messages are unacknowledged at a time. Acknowledged seqs are deleted
    from the buffer in batches (one transaction per batch); a crash between PUBACK and that
    delete makes the message go out again after restart, with the same seq and body, which
    is the at-least-once contract of ``docs/mqtt.md``.
    """

    def __init__(self, buffer: AsyncBuffer, link: MqttLink, status_topic: str, window: int) -> None:
        self.buffer = buffer
        self.link = link
        self.status_topic = status_topic
        self.window = window
        self.cursor = 0  # highest seq handed to the MQTT client
        self.inflight: dict[int, int] = {}  # mid -> seq
        self._acked: list[int] = []
        self._fresh: collections.deque[Row] = collections.deque()
        self._ack_failing = False
        self._caught_up = False  # True: the file holds nothing unsent beyond _fresh
        self.last_offered = 0  # highest seq committed by this process
        self._wake = asyncio.Event()
        self._ack_event = asyncio.Event()
        self._status_mid: int | None = None
        self._status_acked = asyncio.Event()
        self.published = 0
        self.acked_total = 0
        link.on_connected = self.on_connected
        link.on_puback = self.on_puback

    def offer(self, rows: list[Row]) -> None:
        """Rows were just committed: keep them in memory, so that a publisher that has no
        backlog sends them without reading them back from the buffer."""
        self._fresh.extend(rows)
        if rows:
            self.last_offered = rows[-1].seq
        if len(self._fresh) > FRESH_MAX:
            self._fresh.clear()  # a backlog: the buffer file is read instead
            self._caught_up = False
        self._wake.set()

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

    def on_connected(self) -> None:
        """Announce ``online`` (retained) after every CONNACK."""
        self.link.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self._wake.set()

    def on_puback(self, mid: int, ok: bool, reason: str) -> None:
        """PUBACK for ``mid``; ``ok`` is False for an MQTT 5 failure reason code."""
        if mid == self._status_mid:
            self._status_acked.set()
            return
        was_full = len(self.inflight) >= self.window
        seq = self.inflight.pop(mid, None)
        if seq is None:
            return
        if ok:
            self._acked.append(seq)
            self.acked_total += 1
        else:
            log.error("broker refused message seq %d: %s; it stays buffered", seq, reason)
            self.cursor = min(self.cursor, seq - 1)
            self._caught_up = False
            was_full = True
        self._ack_event.set()
        if was_full:
            self._wake.set()

    async def run(self) -> None:
        """Publish forever; cancel to stop."""
        while True:
            await self.link.connected.wait()
            room = self.window - len(self.inflight)
            if room <= 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()
            rows = self._take_fresh(room)
            if rows is None:
                if self._caught_up and not self._fresh:
                    await self._wake.wait()  # nothing in the file beyond what was sent
                    continue
                rows = await self.buffer.fetch(self.cursor, room)
                self._caught_up = len(rows) < room
                if not rows:
                    await self._wake.wait()
                    continue
            for row in rows:
                if not self.link.connected.is_set():
                    self._caught_up = False  # the rest is read back from the file
                    break
                mid = self.link.publish(row.topic, payload_with_seq(row.seq, row.body), qos=1)
                self.inflight[mid] = row.seq
                self.cursor = row.seq
                self.published += 1

    async def run_acks(self, interval: float = 0.5) -> None:
        """Delete acknowledged rows in batches; cancel to stop (call :meth:`flush_acks`)."""
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
            await asyncio.wait_for(self._status_acked.wait(), timeout)
        except TimeoutError:
            return False
        return True
