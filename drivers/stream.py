"""Stream protocols that read a socket in small pieces.

asyncio's selector transports read a plain :class:`asyncio.Protocol` with
``sock.recv(262144)``: every read allocates a 256 KiB bytes object and shrinks it to the
few bytes that came. Above glibc's mmap threshold that is an ``mmap``/``munmap`` pair per
read: 10 µs against 1 µs for ``recv(4096)``, measured on the x86-64 guest of
``docs/benchmarks.md`` (Python 3.11.7, a 106-byte Modbus reply on a socket pair), and one
such read comes with every reply a bus takes. A :class:`asyncio.BufferedProtocol` gives the
transport its own buffer instead (``recv_into``; Python docs, "Buffered Streaming
Protocols"), which also bounds what one read can bring to the buffer's size.
"""

from __future__ import annotations

import asyncio

READ_SIZE = 4096
"""Bytes one read of the socket may bring (a Modbus ADU has at most 260 on TCP, 256 on a
serial line; Modbus Messaging on TCP/IP Implementation Guide V1.0b, 3.1.3 and Modbus over
Serial Line V1.02, 2.5.1.1)."""


class SmallReads(asyncio.BufferedProtocol):
    """A stream protocol whose subclasses implement ``data_received(data: bytes)`` as for
    :class:`asyncio.Protocol`; the transport reads into one buffer of ``READ_SIZE`` bytes
    kept for the connection's life."""

    def __init__(self) -> None:
        self._rx = memoryview(bytearray(READ_SIZE))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rx

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._rx[:nbytes]))

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError
