"""Opening a serial port for asyncio, shared by every serial driver.

pyserial does the port (device paths, ``/dev/serial/by-id/…`` names and URLs such as
``rfc2217://`` or ``spy://``); pymodbus's small asyncio serial transport drives it from
the event loop. Handlers without a file descriptor to watch (``rfc2217://``,
``loop://``) are polled every 2 ms instead of pymodbus's 0.5 ms.
"""

from __future__ import annotations

import asyncio
from collections import deque

QUEUE_LIMIT = 65536
"""Most bytes a :class:`PortQueue` holds for its reader (64 KiB: over 5 s at 115200 baud)."""
GET_MAX = 8192
"""Most bytes :meth:`PortQueue.get` hands over at once (reads are at most 1 KiB each)."""


class PortQueue(asyncio.Protocol):
    """Holds what the port received until its reader takes it, at most ``limit`` bytes.

    A reader that falls behind (a device that babbles faster than its lines can be
    parsed, or a request-mode reader between two requests) never makes the queue grow:
    the oldest bytes are thrown away, counted in :attr:`dropped`, and :meth:`take_lost`
    tells the reader that its stream has a hole (it must resynchronise: the line in
    progress is incomplete).

    Args:
        limit: most bytes held, at least 1.
    """

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self.limit = max(1, limit)
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._closed = False
        self._ready = asyncio.Event()
        self._lost = 0
        self.dropped = 0
        """Bytes thrown away because the reader was behind (since the port opened)."""

    def data_received(self, data: bytes) -> None:
        if self._closed or not data:
            return
        if len(data) > self.limit:  # keep the newest bytes
            self._note_lost(len(data) - self.limit)
            data = data[-self.limit :]
        while self._chunks and self._size + len(data) > self.limit:
            old = self._chunks.popleft()
            self._size -= len(old)
            self._note_lost(len(old))
        self._chunks.append(data)
        self._size += len(data)
        self._ready.set()

    def _note_lost(self, n: int) -> None:
        self.dropped += n
        self._lost += n

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._ready.set()

    @property
    def queued(self) -> int:
        """Bytes waiting for the reader."""
        return self._size

    async def get(self) -> bytes | None:
        """What was received first, in order: whole reads up to :data:`GET_MAX` bytes
        together (so that one turn of the event loop handles a bounded amount), waiting for
        the first byte; ``None`` once the port is gone and all of it was taken."""
        while not self._chunks:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        parts = [self._chunks.popleft()]
        n = len(parts[0])
        while self._chunks and n + len(self._chunks[0]) <= GET_MAX:
            parts.append(self._chunks.popleft())
            n += len(parts[-1])
        self._size -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def discard(self) -> bool:
        """Throw away what is waiting (bytes nobody asked for); return False when the port
        is gone."""
        self._chunks.clear()
        self._size = 0
        self._lost = 0
        return not self._closed

    def take_lost(self) -> int:
        """Bytes dropped since the last call (0: the stream is whole)."""
        lost, self._lost = self._lost, 0
        return lost


async def open_serial(
    protocol: asyncio.Protocol,
    port: str,
    baudrate: int,
    bytesize: int = 8,
    parity: str = "N",
    stopbits: int = 1,
) -> asyncio.Transport:
    """Open ``port`` with these settings and connect ``protocol`` to it.

    Raises:
        OSError, ValueError, termios.error: the port is missing, busy or refuses the
        settings (callers report and retry).
    """
    from pymodbus.transport.serialtransport import SerialTransport, create_serial_connection

    transport, _ = await create_serial_connection(
        asyncio.get_running_loop(),
        lambda: protocol,
        port,
        baudrate=baudrate,
        bytesize=bytesize,
        parity=parity,
        stopbits=stopbits,
        timeout=0,
    )
    assert isinstance(transport, SerialTransport)
    try:
        transport.sync_serial.fileno()
    except Exception:  # rfc2217:// and loop:// have no descriptor to watch
        transport.force_poll = True
        transport._poll_wait_time = 0.002  # 500 wake-ups/s rather than 2000
    return transport
