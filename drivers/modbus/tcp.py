"""Modbus TCP (MBAP framing): a lean asyncio client for the polling path.

One connection per endpoint, one request at a time (the bus task owns it). The MBAP header
(Modbus Messaging on TCP/IP Implementation Guide V1.0b, 3.1.3) carries a transaction id:
each request gets the next one, and a reply with another id — the late answer to a request
that timed out, typically from a slow unit behind a TCP-to-RS-485 gateway — is discarded,
never taken for the answer to the current request. A timeout keeps the connection (the
other units behind a gateway still answer on it); a reply that breaks the MBAP framing
closes it, so that the next request starts in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time

from drivers.modbus.line import FrameError, LineCounters, check_reply
from drivers.stream import SmallReads

log = logging.getLogger(__name__)

MAX_ADU = 254
"""Largest unit id + PDU of a Modbus TCP frame (MBAP length field at most 254)."""


RX_LIMIT = 4 * (6 + MAX_ADU)
"""Most received bytes held on a connection: a reply and a few late ones. More is a peer
that floods, and the connection is dropped (the bus task opens it again)."""
LOG_EVERY_S = 10.0
"""A flood is logged at most this often per connection."""
MAX_STALE = 8
"""Replies with another transaction id taken for one request before the connection is
dropped as out of step (a late reply or two is normal behind a gateway; a stream is not)."""


class _MbapProtocol(SmallReads):
    """Collects received bytes (at most :data:`RX_LIMIT`); wakes the waiting request."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: Exception | None = None
        self.closed = False
        self.transport: asyncio.BaseTransport | None = None
        self.flooded = ""
        """Why this side dropped the connection (empty: it did not)."""
        self.discarded = 0
        """Bytes thrown away by a flood."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.flooded:
            self.discarded += len(data)
            return
        if len(self.buf) + len(data) > RX_LIMIT:
            self.discarded += len(self.buf) + len(data)
            self.buf.clear()
            self.flooded = (
                f"more than {RX_LIMIT} bytes arrived that no request asked for (a flood); "
                "connection closed, it is opened again for the next poll"
            )
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        else:
            self.buf += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class MbapClient:
    """A Modbus TCP connection to ``host:port``.

    Args:
        host, port: the endpoint.
        timeout: seconds to wait for a connection.
    """

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._proto: _MbapProtocol | None = None
        self._tid = 0
        self.stale = 0
        """Replies discarded because their transaction id was not the current one."""
        self.floods = 0
        """Connections dropped because the peer sent more than :data:`RX_LIMIT` bytes."""
        self.counters = LineCounters()
        """Requests and their outcomes on this connection's endpoint (no CRC on TCP:
        ``crc_errors`` stays 0; ``garbage_bytes`` are replies to other transactions and
        flooded bytes)."""
        self._flood_logged = -1e9

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.closed

    async def connect(self) -> None:
        """Open the connection (TCP_NODELAY: a request is one small segment).

        Raises:
            OSError: refused, unreachable; TimeoutError: no answer within ``timeout``.
        """
        if self.connected:
            return
        old = self._proto
        if old is not None and old.flooded:  # dropped between two requests
            self._note_flood(old.flooded)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout):
            transport, proto = await loop.create_connection(_MbapProtocol, self.host, self.port)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport, self._proto = transport, proto

    def _note_flood(self, why: str) -> None:
        self.floods += 1
        if self._proto is not None:
            self.counters.garbage_bytes += self._proto.discarded
            self._proto.discarded = 0
        now = time.monotonic()
        if now - self._flood_logged >= LOG_EVERY_S:
            log.warning("%s:%s: %s (%d time(s) so far)", self.host, self.port, why, self.floods)
            self._flood_logged = now

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = self._proto = None

    async def transact(self, request: bytes, timeout: float) -> bytes:
        """Send ``request`` (unit id + PDU) and return the checked reply's data
        (:func:`drivers.modbus.line.check_reply`).

        Bytes no request asked for are bounded: past :data:`RX_LIMIT` held bytes, or more
        than :data:`MAX_STALE` replies to other requests, the connection is closed (the bus
        task opens it again with its backoff) and the request fails with FrameError.

        Raises:
            ExceptionReply: a Modbus exception reply.
            FrameError: a reply that does not fit the request (the connection is closed
                if the MBAP framing itself is broken, or the peer floods).
            TimeoutError: no reply within ``timeout`` seconds (the connection stays).
            ConnectionError: not connected, or the connection is gone.
        """
        proto, transport = self._proto, self._transport
        if proto is None or transport is None or proto.closed:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        try:
            return await self._transact(proto, transport, request, timeout)
        except (TimeoutError, FrameError) as exc:
            self.counters.count_failure(exc)
            raise

    async def _transact(
        self, proto: _MbapProtocol, transport: asyncio.Transport, request: bytes, timeout: float
    ) -> bytes:
        self._tid = tid = (self._tid + 1) & 0xFFFF
        transport.write(struct.pack(">HHH", tid, 0, len(request)) + request)
        self.counters.requests += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stale = 0
        while True:
            frame = await self._frame(proto, deadline)
            got = (frame[0] << 8) | frame[1]
            if got != tid:
                self.stale += 1
                self.counters.garbage_bytes += len(frame)
                stale += 1
                if stale > MAX_STALE:
                    self.close()
                    raise FrameError(
                        f"more than {MAX_STALE} replies with other transaction ids than "
                        f"{tid} (last {got}): the peer is out of step; connection closed"
                    )
                log.debug(
                    "%s:%s: discarded a late reply (transaction %d)", self.host, self.port, got
                )
                continue
            return check_reply(request, frame[6:])

    async def _frame(self, proto: _MbapProtocol, deadline: float) -> bytes:
        """The next whole MBAP frame from the stream."""
        buf = proto.buf
        while True:
            if len(buf) >= 6:
                proto_id, length = struct.unpack_from(">HH", buf, 2)
                if proto_id != 0 or not 2 <= length <= MAX_ADU:
                    bad = bytes(buf[:12]).hex(" ")
                    self.close()
                    raise FrameError(
                        f"not a Modbus TCP reply (protocol id {proto_id}, length {length}): "
                        f"{bad}; connection closed to get back in step"
                    )
                if len(buf) >= 6 + length:
                    frame = bytes(buf[: 6 + length])
                    del buf[: 6 + length]
                    return frame
            if proto.flooded:
                self._note_flood(proto.flooded)
                self.close()
                raise FrameError(f"{self.host}:{self.port}: {proto.flooded}")
            if proto.closed:
                raise ConnectionError(
                    f"connection to {self.host}:{self.port} closed"
                    + (f": {proto.lost}" if proto.lost else " by the peer")
                )
            loop = asyncio.get_running_loop()
            if deadline <= loop.time():
                raise TimeoutError()
            # a timer on the waiter rather than asyncio.timeout(): the same TimeoutError
            # for this await, one object less per reply on the polling path
            waiter = proto.waiter = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                proto.waiter = None
