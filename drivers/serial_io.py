"""Opening a serial port for asyncio, shared by every serial driver.

pyserial does the port (device paths, ``/dev/serial/by-id/…`` names and URLs such as
``rfc2217://`` or ``spy://``); pymodbus's small asyncio serial transport drives it from
the event loop. Handlers without a file descriptor to watch (``rfc2217://``,
``loop://``) are polled every 2 ms instead of pymodbus's 0.5 ms.
"""

from __future__ import annotations

import asyncio


class PortQueue(asyncio.Protocol):
    """Puts every chunk received in :attr:`queue`; ``None`` when the port is gone."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def data_received(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)


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
