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

from drivers.modbus.line import FrameError, check_reply

log = logging.getLogger(__name__)

MAX_ADU = 254
"""Largest unit id + PDU of a Modbus TCP frame (MBAP length field at most 254)."""


class _MbapProtocol(asyncio.Protocol):
    """Collects received bytes; wakes the waiting request."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: Exception | None = None
        self.closed = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


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
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout):
            transport, proto = await loop.create_connection(_MbapProtocol, self.host, self.port)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport, self._proto = transport, proto

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = self._proto = None

    async def transact(self, request: bytes, timeout: float) -> bytes:
        """Send ``request`` (unit id + PDU) and return the checked reply's data
        (:func:`drivers.modbus.line.check_reply`).

        Raises:
            ExceptionReply: a Modbus exception reply.
            FrameError: a reply that does not fit the request (the connection is closed
                if the MBAP framing itself is broken).
            TimeoutError: no reply within ``timeout`` seconds (the connection stays).
            ConnectionError: not connected, or the connection is gone.
        """
        proto, transport = self._proto, self._transport
        if proto is None or transport is None or proto.closed:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        self._tid = tid = (self._tid + 1) & 0xFFFF
        transport.write(struct.pack(">HHH", tid, 0, len(request)) + request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self._frame(proto, deadline)
            got = (frame[0] << 8) | frame[1]
            if got != tid:
                self.stale += 1
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
            if proto.closed:
                raise ConnectionError(
                    f"connection to {self.host}:{self.port} closed"
                    + (f": {proto.lost}" if proto.lost else " by the peer")
                )
            loop = asyncio.get_running_loop()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError()
            proto.waiter = loop.create_future()
            try:
                async with asyncio.timeout(remaining):
                    await proto.waiter
            finally:
                proto.waiter = None
