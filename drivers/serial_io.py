"""Opening a serial port for asyncio, shared by every serial driver.

pyserial does the port (device paths, ``/dev/serial/by-id/…`` names and URLs such as
``rfc2217://`` or ``spy://``); pymodbus's small asyncio serial transport drives it from
the event loop. Handlers without a file descriptor to watch (``rfc2217://``,
``loop://``) are polled every 2 ms instead of pymodbus's 0.5 ms.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from drivers.stream import SmallReads

QUEUE_LIMIT = 65536
"""Most bytes a :class:`PortQueue` holds for its reader (64 KiB: over 5 s at 115200 baud)."""
GET_MAX = 8192
"""Most bytes :meth:`PortQueue.get` hands over at once (reads are at most 1 KiB each)."""
QUIET_FLOOR_S = 0.005
"""Shortest silence taken as a pause between lines, seconds: a character time at high
baud rates is shorter than the jitter of reads (a port served over TCP, a polled
``rfc2217://`` port read every 2 ms)."""


def char_time(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: int = 1) -> float:
    """Seconds one character takes on the line: a start bit, the data bits, a parity bit
    unless ``parity`` is ``N``, and the stop bits, at ``baudrate`` bits per second (10
    bits for 8N1: 1.04 ms at 9600 baud). Pure.

    Raises:
        ZeroDivisionError: ``baudrate`` is 0.
    """
    return (1 + bytesize + (parity != "N") + stopbits) / baudrate


class PortQueue(asyncio.Protocol):
    """Holds what the port received until its reader takes it, at most ``limit`` bytes.

    A reader that falls behind (a device that babbles faster than its lines can be
    parsed, or a request-mode reader between two requests) never makes the queue grow:
    the oldest bytes are thrown away, counted in :attr:`dropped`, and :meth:`take_lost`
    tells the reader that its stream has a hole (it must resynchronise: the line in
    progress is incomplete).

    It also tells whether the line was silent after opening before its first byte
    (:meth:`quiet_before_first`), given the line's character time ``char_s``.

    Args:
        limit: most bytes held, at least 1.
        char_s: seconds per character on the line (:func:`char_time`); None: not known,
            the first byte is never taken to follow a silence.
    """

    def __init__(self, limit: int = QUEUE_LIMIT, char_s: float | None = None) -> None:
        self.limit = max(1, limit)
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._closed = False
        self._ready = asyncio.Event()
        self._lost = 0
        self.dropped = 0
        """Bytes thrown away because the reader was behind (since the port opened)."""
        self.char_s = char_s
        self.opened_at: float | None = None
        """``time.monotonic()`` when the transport was connected (the port open)."""
        self.silent = False
        """Whether a timer set for ``max(char_s, QUIET_FLOOR_S)`` after opening ran before
        any byte was received."""
        self.first_at: float | None = None
        """``time.monotonic()`` of the first read after opening."""
        self.first_len = 0
        """Bytes of that first read."""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.opened_at = time.monotonic()
        if self.char_s is not None and self.first_at is None:
            port = getattr(transport, "sync_serial", None)
            self._timer = asyncio.get_running_loop().call_later(
                max(self.char_s, QUIET_FLOOR_S), self._silence, port
            )

    def _silence(self, port: Any) -> None:
        # a polled port (rfc2217://) reads from a task that may run after this timer:
        # bytes it has not yet handed over count too
        try:
            pending = int(getattr(port, "in_waiting", 0) or 0)
        except Exception:  # the port closed meanwhile (OSError, SerialException)
            pending = 1
        self.silent = self.first_at is None and pending == 0

    def data_received(self, data: bytes) -> None:
        if self._closed or not data:
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.first_len = len(data)
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
        if self._timer is not None:
            self._timer.cancel()
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

    def quiet_before_first(self) -> bool:
        """Whether the line was silent for at least one character time (``char_s``, at
        least :data:`QUIET_FLOOR_S`) after the port opened before its first byte came:
        then that byte starts a line rather than continuing one the port opened into.

        Two conditions, each guarding against a delay: the timer set at opening ran before
        any byte was received or was waiting in the port (asyncio handles the reads found
        ready before the timers due in the same turn, so bytes that came during a busy
        turn of the event loop do not pass for a silence); and the first read's ``n``
        bytes, which took at least ``n`` character times on the line, began that long after
        opening (so bytes held back on the way, as a USB adapter does for up to 16 ms, do
        not either). False before the first read or without ``char_s``.
        """
        if self.char_s is None or self.opened_at is None or self.first_at is None:
            return False
        began = self.first_at - self.first_len * self.char_s
        return self.silent and began - self.opened_at >= max(self.char_s, QUIET_FLOOR_S)

    def take_lost(self) -> int:
        """Bytes dropped since the last call (0: the stream is whole)."""
        lost, self._lost = self._lost, 0
        return lost


async def open_serial(
    protocol: asyncio.Protocol | SmallReads,
    port: str,
    baudrate: int,
    bytesize: int = 8,
    parity: str = "N",
    stopbits: int = 1,
) -> asyncio.Transport:
    """Open ``port`` with these settings and connect ``protocol`` to it (the transport
    calls its ``data_received`` with what each read brought, at most 1024 bytes).

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
