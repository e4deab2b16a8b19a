"""Modbus RTU and ASCII framing on a half-duplex line: a serial port (RS-485 adapter, or a
pyserial URL) or a TCP connection to a serial device server (RTU over TCP).

This module owns the line discipline that a master on a shared RS-485 line must keep, and
that a generic client leaves to chance:

- one request at a time, each started only after the line has been silent for the
  inter-frame gap (3.5 character times, or 1.75 ms above 19200 baud: Modbus over Serial
  Line V1.02, 2.5.1.1), which may be configured longer for slow devices;
- whatever arrived between two requests (a late reply, noise) is discarded before the next
  request is sent, so a late reply is never taken for the next one (case 019);
- every reply is checked in full before any of it is used: unit id, function code, byte
  count, CRC (RTU, 6.2.2 of the same spec) or LRC (ASCII, 6.2.1) and the frame's position
  (garbage before the frame is an error, never a shifted frame); each failure raises
  :class:`FrameError` with the bytes received;
- two-wire adapters that echo the request (``local_echo``): the echo is consumed and
  compared, and the response timeout starts after it; a corrupted echo is a collision and
  the request is sent once more; an adapter that does not echo after all is noticed rather
  than losing reply bytes to a blind skip (case 036).

PDUs are those of the Modbus Application Protocol V1.1b3 (clause 6); the CRC is pymodbus's.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Sequence

from drivers.serial_io import open_serial

log = logging.getLogger(__name__)

READ_FUNCTIONS = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}


class FrameError(Exception):
    """A reply arrived but cannot be used (bad CRC/LRC, garbage, wrong unit id, function
    code or byte count, a bad echo). The message says what and shows the bytes."""


class ExceptionReply(Exception):
    """The device answered with a Modbus exception (``code``, Modbus Application Protocol
    V1.1b3, clause 7)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exception {code}")
        self.code = code


# -- pure helpers ---------------------------------------------------------------------------


def char_time(baudrate: int, parity: str = "N", stopbits: int = 1, bytesize: int = 8) -> float:
    """Seconds on the wire per character: start bit + data bits + parity bit + stop bits
    (Modbus over Serial Line V1.02, 2.5.1)."""
    return (1 + bytesize + (0 if parity == "N" else 1) + stopbits) / baudrate


def min_frame_gap(baudrate: int, parity: str = "N", stopbits: int = 1, bytesize: int = 8) -> float:
    """The smallest silence between two RTU frames, in seconds: 3.5 character times, or a
    fixed 1.75 ms above 19200 baud (Modbus over Serial Line V1.02, 2.5.1.1)."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * char_time(baudrate, parity, stopbits, bytesize)


def crc16(data: bytes) -> bytes:
    """The two CRC bytes of an RTU frame, low byte first, as sent on the wire (Modbus over
    Serial Line V1.02, 6.2.2). pymodbus computes it; imported here so that an agent
    without serial lines never loads pymodbus."""
    from pymodbus.framer.rtu import FramerRTU

    return int(FramerRTU.compute_CRC(data)).to_bytes(2, "big")


def lrc(data: bytes) -> int:
    """Longitudinal redundancy check of an ASCII frame's binary content: the two's
    complement of the 8-bit sum (Modbus over Serial Line V1.02, 6.2.1)."""
    return -sum(data) & 0xFF


def read_pdu(table: str, start: int, count: int) -> bytes:
    """The request PDU reading ``count`` registers or bits of ``table`` from ``start``
    (function codes 1–4, Modbus Application Protocol V1.1b3, 6.1–6.4)."""
    return struct.pack(">BHH", READ_FUNCTIONS[table], start, count)


def write_pdu(table: str, address: int, values: Sequence[int] | Sequence[bool]) -> bytes:
    """The request PDU writing ``values`` at ``address``: function code 5 (one coil), 15
    (coils), 6 (one holding register) or 16 (holding registers) (Modbus Application
    Protocol V1.1b3, 6.5, 6.6, 6.11, 6.12).

    Raises:
        ValueError: a table that cannot be written, or no values.
    """
    if not values:
        raise ValueError("nothing to write")
    if table == "coil":
        if len(values) == 1:
            return struct.pack(">BHH", 5, address, 0xFF00 if values[0] else 0)
        packed = bytearray(-(-len(values) // 8))
        for i, v in enumerate(values):
            if v:
                packed[i // 8] |= 1 << (i % 8)
        return struct.pack(">BHHB", 15, address, len(values), len(packed)) + bytes(packed)
    if table == "holding":
        if len(values) == 1:
            return struct.pack(">BHH", 6, address, int(values[0]) & 0xFFFF)
        words = b"".join(struct.pack(">H", int(v) & 0xFFFF) for v in values)
        return struct.pack(">BHHB", 16, address, len(values), len(words)) + words
    raise ValueError(f"table {table!r} is read-only: only coils and holding registers are written")


def reply_length(request: bytes, reply_head: bytes) -> int | None:
    """Length of the RTU reply (unit id to CRC) to ``request`` (unit id + PDU, no CRC),
    judged from its first bytes; ``None`` while that cannot be told yet, or when the head
    does not belong to the request (then only silence ends the reply)."""
    if len(reply_head) < 2:
        return None
    unit, fc = request[0], request[1]
    if reply_head[0] != unit:
        return None
    if reply_head[1] == fc | 0x80:
        return 5
    if reply_head[1] != fc:
        return None
    if fc in (1, 2, 3, 4):
        return 5 + reply_head[2] if len(reply_head) >= 3 else None
    return 8  # 5, 6, 15, 16 answer with 4 bytes of PDU data


def _hex(data: bytes | bytearray) -> str:
    text = bytes(data[:64]).hex(" ").upper()
    return text + (" …" if len(data) > 64 else "")


def check_reply(request: bytes, adu: bytes) -> bytes:
    """Check a reply's unit id, function code and byte count against the request and
    return the PDU data of a read (the register bytes or bit bytes) or of a write.

    ``request`` and ``adu`` are unit id + PDU, without CRC/LRC (already checked). Pure.

    Raises:
        ExceptionReply: a Modbus exception reply to this request.
        FrameError: anything that does not fit the request.
    """
    unit, fc = request[0], request[1]
    if len(adu) < 2:
        raise FrameError(f"reply too short: {_hex(adu)}")
    if adu[0] != unit:
        raise FrameError(f"reply from unit {adu[0]}, asked unit {unit}: {_hex(adu)}")
    if adu[1] == fc | 0x80:
        if len(adu) != 3:
            raise FrameError(f"exception reply of {len(adu)} bytes: {_hex(adu)}")
        raise ExceptionReply(adu[2])
    if adu[1] != fc:
        raise FrameError(f"reply with function code {adu[1]}, asked function code {fc}")
    if fc in (1, 2, 3, 4):
        count = struct.unpack(">H", request[4:6])[0]
        expected = 2 * count if fc in (3, 4) else -(-count // 8)
        what = "registers" if fc in (3, 4) else "bits"
        if len(adu) < 3 or adu[2] != expected or len(adu) != 3 + adu[2]:
            got = adu[2] if len(adu) >= 3 else "no"
            kind = "garbled"
            if len(adu) >= 3 and len(adu) == 3 + adu[2]:
                kind = "long" if adu[2] > expected else "short"
            raise FrameError(
                f"{kind} reply: byte count {got} in reply from unit {unit}, expected "
                f"{expected} for {count} {what}: nothing of it is used"
            )
        return bytes(adu[3:])
    if adu[1:6] != request[1:6]:
        raise FrameError(f"write confirmation does not match the request: {_hex(adu)}")
    return bytes(adu[2:])


def data_to_values(fc: int, count: int, data: bytes) -> list[int] | list[bool]:
    """Registers (big-endian words, FC 3/4) or bits (LSB first, FC 1/2) of a read reply
    (Modbus Application Protocol V1.1b3, 6.1–6.4)."""
    if fc in (3, 4):
        return list(struct.unpack(f">{count}H", data))
    return [bool(data[i // 8] >> (i % 8) & 1) for i in range(count)]


def ascii_frame(adu: bytes) -> bytes:
    """``:`` + hex(unit id, PDU, LRC) + CR LF (Modbus over Serial Line V1.02, 2.5.2.1)."""
    return b":" + (adu + bytes([lrc(adu)])).hex().upper().encode() + b"\r\n"


def parse_ascii(frame: bytes) -> bytes:
    """The binary ADU (unit id + PDU) of an ASCII frame after checking its LRC. Pure.

    Raises:
        FrameError: no ``:`` at the start (garbage before the frame), bad hex, bad LRC.
    """
    text = frame.rstrip(b"\r\n")
    start = text.find(b":")
    if start != 0:
        where = f"{start} byte(s) before ':'" if start > 0 else "no ':'"
        raise FrameError(f"garbled ASCII reply ({where}): {frame!r}")
    try:
        raw = bytes.fromhex(text[1:].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise FrameError(f"ASCII reply is not hex: {frame!r}") from None
    if len(raw) < 3:
        raise FrameError(f"ASCII reply too short: {frame!r}")
    if lrc(raw[:-1]) != raw[-1]:
        raise FrameError(
            f"LRC error in ASCII reply: frame says {raw[-1]:02X}, computed "
            f"{lrc(raw[:-1]):02X}: {frame!r}"
        )
    return raw[:-1]


# -- the line -------------------------------------------------------------------------------

HINT_SPAN = 300
"""How far into a garbled reply a whole reply is looked for (to say "garbage before a
reply"): a little more than the longest RTU frame."""


RX_LIMIT = 4096
"""Most received bytes a line holds at once. A reply is far shorter: an RTU ADU has at most
256 bytes, an ASCII frame 513 characters (Modbus over Serial Line V1.02, 2.5.1.1 and
2.5.2.1); more than this is a device (or a serial device server) that babbles."""


class _LineProtocol(asyncio.Protocol):
    """Collects received bytes and the time of the last one, at most ``limit`` bytes.

    Past the limit (a flood), what was held is thrown away and counted; on a TCP
    connection (``drop_on_flood``) the connection is closed as well, and :attr:`flooded`
    says why: the bus's reconnect starts it again in step.
    """

    def __init__(self, limit: int = RX_LIMIT, drop_on_flood: bool = False) -> None:
        self.buf = bytearray()
        self.last_rx = 0.0
        self.event = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None
        self.lost = False
        self.limit = limit
        self.drop_on_flood = drop_on_flood
        self.overflow = 0
        """Bytes thrown away since the last :meth:`clear` because the limit was passed."""
        self.discarded = 0
        """Every byte thrown away on this connection (floods and strays)."""
        self.flooded = ""
        """Why the connection was closed by this side (empty: it was not)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        if self.flooded:
            return
        if len(self.buf) + len(data) > self.limit:
            n = len(self.buf) + len(data)
            self.overflow += n
            self.discarded += n
            self.buf.clear()
            if self.drop_on_flood:
                self.flooded = (
                    f"more than {self.limit} bytes arrived unasked or in one reply (a flood); "
                    "connection closed, it is opened again for the next poll"
                )
                if self.transport is not None:
                    self.transport.close()
        else:
            self.buf += data
        self.event.set()

    def clear(self) -> int:
        """Throw away what is held (bytes nobody asked for); return how many."""
        n = len(self.buf)
        self.discarded += n
        self.buf.clear()
        self.overflow = 0
        return n

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.event.set()


class SerialLine:
    """A half-duplex Modbus line, RTU or ASCII framed, on a serial port or a TCP stream.

    Args:
        endpoint: serial device or pyserial URL, or ``host:port`` when ``tcp`` is true.
        framing: ``rtu`` or ``ascii``.
        baudrate, parity, stopbits, bytesize: serial settings (on TCP, they only size the
            default gap, when given).
        frame_gap: silence kept before each request, seconds; at least :func:`min_frame_gap`
            on a serial port.
        local_echo: the adapter echoes each request back (two-wire RS-485).
        connect_pause: silence after opening before the first request, seconds.
        tcp: ``endpoint`` is a serial device server's TCP port (RTU/ASCII over TCP).
    """

    def __init__(
        self,
        endpoint: str,
        framing: str = "rtu",
        baudrate: int = 9600,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
        frame_gap: float | None = None,
        local_echo: bool = False,
        connect_pause: float = 0.0,
        tcp: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.framing = framing
        self.tcp = tcp
        self.settings = (baudrate, parity, stopbits, bytesize)
        self.char_time = 0.0 if tcp else char_time(baudrate, parity, stopbits, bytesize)
        floor = 0.0 if tcp else min_frame_gap(baudrate, parity, stopbits, bytesize)
        self.frame_gap = max(floor, frame_gap or 0.0)
        self.local_echo = local_echo
        self.connect_pause = connect_pause
        self._proto: _LineProtocol | None = None
        self._quiet_from = 0.0
        self._lock = asyncio.Lock()
        self._echo_missing_logged = False
        self.requests = 0
        """Requests sent (for diagnostics and tests)."""
        self.stray = 0
        """Bytes that arrived unasked between two requests and were thrown away."""
        self.noisy = 0
        """Requests not sent because the line never fell silent."""
        self.last_error = ""
        """Why the last :meth:`connect` failed."""

    @property
    def connected(self) -> bool:
        """True while the port (or TCP connection) is open."""
        p = self._proto
        return p is not None and not p.lost and not p.flooded and p.transport is not None

    async def connect(self) -> bool:
        """Open the port or connection; return whether it is open. Never raises."""
        self.close()
        proto = _LineProtocol(drop_on_flood=self.tcp)
        loop = asyncio.get_running_loop()
        try:
            if self.tcp:
                host, _, port = self.endpoint.rpartition(":")
                async with asyncio.timeout(5):
                    await loop.create_connection(lambda: proto, host, int(port))
            else:
                baudrate, parity, stopbits, bytesize = self.settings
                transport = await open_serial(
                    proto, self.endpoint, baudrate, bytesize, parity, stopbits
                )
                proto.transport = transport  # connection_made comes a loop turn later
        except Exception as exc:  # OSError, termios.error (bad settings), ValueError, ...
            self.last_error = str(exc) or type(exc).__name__
            if not self.tcp and type(exc).__name__ == "error":  # termios.error
                b, par, stop, size = self.settings
                self.last_error += f" (the port refuses settings {b} {size}{par}{stop})"
            log.debug("open %s failed: %s", self.endpoint, exc)
            return False
        self.last_error = ""
        self._proto = proto
        self._quiet_from = time.monotonic() + self.connect_pause
        return True

    def close(self) -> None:
        """Close the port or connection (idempotent)."""
        p, self._proto = self._proto, None
        if p is not None and p.transport is not None and not p.lost:
            p.transport.close()

    def _port(self) -> _LineProtocol:
        p = self._proto
        if p is None or p.lost or p.transport is None:
            raise ConnectionError(f"{self.endpoint} is not open")
        return p

    async def _wait_quiet(self, p: _LineProtocol, timeout: float) -> None:
        """Wait until the line has been silent for the frame gap, then drop what arrived
        since the last exchange (late replies, noise).

        Raises:
            FrameError: the line did not fall silent within ``timeout`` seconds after any
                pause it owes (a device that keeps sending): no request is sent into it.
            ConnectionError: the connection is gone (or was dropped for a flood).
        """
        give_up = max(self._quiet_from, time.monotonic()) + timeout
        while True:
            self._check_open(p)
            ready = max(self._quiet_from, p.last_rx + self.frame_gap)
            now = time.monotonic()
            delay = ready - now
            if delay <= 0:
                break
            if ready > give_up:
                n = len(p.buf) + p.overflow
                self.noisy += 1
                shown = _hex(p.buf)
                p.clear()
                raise FrameError(
                    f"the line was never silent for {self.frame_gap * 1000:.1f} ms within "
                    f"{timeout:g} s ({n} byte(s) arrived unasked: {shown}): a device keeps "
                    "sending; no request sent"
                )
            await asyncio.sleep(min(delay, max(give_up - now, 0.001)))
        if p.buf or p.overflow:
            log.debug("%s: discarded %d stray byte(s): %s", self.endpoint, len(p.buf), _hex(p.buf))
            self.stray += len(p.buf) + p.overflow
            p.clear()

    def _check_open(self, p: _LineProtocol) -> None:
        if p.flooded:
            raise FrameError(f"{self.endpoint}: {p.flooded}")
        if p.lost:
            raise ConnectionError(f"{self.endpoint} closed")

    async def _wait_data(self, p: _LineProtocol, deadline: float) -> bool:
        """Wait for more bytes until ``deadline``; False when none came.

        Raises:
            FrameError: more bytes came than any reply has (:data:`RX_LIMIT`).
            ConnectionError: the port or connection is gone.
        """
        if p.flooded:
            raise FrameError(f"{self.endpoint}: {p.flooded}")
        remaining = deadline - time.monotonic()
        if remaining <= 0 or p.lost:
            return False
        p.event.clear()
        try:
            async with asyncio.timeout(remaining):
                await p.event.wait()
        except TimeoutError:
            return False
        self._check_open(p)
        if p.overflow:
            n = p.overflow
            p.clear()
            raise FrameError(
                f"{n} bytes arrived for one reply, more than {p.limit}: a device babbles; "
                "nothing used"
            )
        return True

    async def transact(self, request: bytes, timeout: float) -> bytes:
        """Send one request (unit id + PDU) and return the checked reply's PDU data.

        ``timeout`` counts from the end of the request's transmission (from the end of its
        echo with ``local_echo``). A corrupted echo (collision) is retried once.

        Raises:
            TimeoutError: no reply.
            ExceptionReply, FrameError: see :func:`check_reply`.
            ConnectionError: the port or connection is gone.
        """
        async with self._lock:
            try:
                return await self._transact(request, timeout)
            except _Collision as exc:
                log.info("%s: %s; sending the request once more", self.endpoint, exc)
                try:
                    return await self._transact(request, timeout)
                except _Collision as again:
                    raise FrameError(str(again)) from None

    async def _transact(self, request: bytes, timeout: float) -> bytes:
        p = self._port()
        await self._wait_quiet(p, timeout)
        frame = ascii_frame(request) if self.framing == "ascii" else request + crc16(request)
        assert p.transport is not None
        p.transport.write(frame)  # type: ignore[attr-defined]
        self.requests += 1
        sent = time.monotonic()
        tx_end = sent + len(frame) * self.char_time
        self._quiet_from = tx_end
        try:
            deadline = tx_end + timeout
            if self.local_echo:
                deadline = await self._consume_echo(p, frame, deadline, timeout)
            if self.framing == "ascii":
                return await self._ascii_reply(p, request, deadline)
            return await self._rtu_reply(p, request, frame, deadline)
        finally:
            self._quiet_from = max(self._quiet_from, time.monotonic())

    async def _consume_echo(
        self, p: _LineProtocol, frame: bytes, deadline: float, timeout: float
    ) -> float:
        """Take the echo of ``frame`` off the input; return the reply's deadline."""
        n = len(frame)
        while len(p.buf) < n and frame.startswith(bytes(p.buf)):
            if not await self._wait_data(p, deadline):
                break
        if bytes(p.buf[:n]) == frame:
            del p.buf[:n]
            return time.monotonic() + timeout
        if not p.buf:
            raise TimeoutError("no reply, and no echo of the request either (is local_echo right?)")
        # the bytes differ from the request: a corrupted echo, or no echo at all
        if await self._is_whole_reply(p, frame, deadline):
            if not self._echo_missing_logged:
                log.warning(
                    "%s: local_echo is set but the adapter did not echo the request; the "
                    "bytes are read as the reply (set local_echo: false)",
                    self.endpoint,
                )
                self._echo_missing_logged = True
            return deadline
        raise _Collision(
            f"echo differs from the request (bus collision?): sent {_hex(frame)}, "
            f"got {_hex(p.buf[:n])}"
        )

    async def _is_whole_reply(self, p: _LineProtocol, frame: bytes, deadline: float) -> bool:
        """Whether the input holds (or completes to) a well-formed reply to ``frame``."""
        if self.framing == "ascii":
            while b"\n" not in p.buf:
                if not await self._wait_data(p, deadline):
                    return False
            try:
                parse_ascii(bytes(p.buf[: p.buf.find(b"\n") + 1]))
            except FrameError:
                return False
            return True
        request = frame[:-2]
        while len(p.buf) < 3:
            if not await self._wait_data(p, deadline):
                return False
        need = reply_length(request, bytes(p.buf[:3]))
        if need is None:
            return False
        while len(p.buf) < need:
            if not await self._wait_data(p, deadline):
                return False
        return crc16(bytes(p.buf[: need - 2])) == bytes(p.buf[need - 2 : need])

    async def _rtu_reply(
        self, p: _LineProtocol, request: bytes, frame: bytes, deadline: float
    ) -> bytes:
        silence = max(self.frame_gap, 0.02)
        unit = request[0]
        stray: bytes = b""
        while True:
            need = reply_length(request, bytes(p.buf[:3]))
            if need is not None and len(p.buf) >= need:
                break
            other = _whole_frame(p.buf) if need is None and p.buf and p.buf[0] != unit else 0
            if other:
                # a whole frame from another unit: a late reply to an earlier request
                stray = bytes(p.buf[:other])
                log.debug("%s: discarded a late frame: %s", self.endpoint, _hex(stray))
                del p.buf[:other]
                continue
            if need is None and len(p.buf) >= 2:
                # not the head of a reply to this request: take what comes until silence
                wait_until = min(deadline, p.last_rx + silence)
                if not await self._wait_data(p, wait_until):
                    break
                continue
            if not await self._wait_data(p, deadline):
                break
        buf = bytes(p.buf)
        if not buf and stray:
            raise FrameError(
                f"no reply from unit {unit}; a frame from unit {stray[0]} came instead (a late "
                f"reply, or two devices with one unit id?): {_hex(stray)}"
            )
        if not buf:
            raise TimeoutError(f"no reply from unit {unit}")
        if buf.startswith(frame):
            raise FrameError(
                f"received our own request back ({_hex(frame)}): this adapter echoes what it "
                "sends; set local_echo: true for this bus"
            )
        if need is None:
            hint = ""
            for k in range(1, min(len(buf) - 1, HINT_SPAN)):
                n = reply_length(request, buf[k : k + 3])
                if (
                    n is not None
                    and len(buf) >= k + n
                    and crc16(buf[k : k + n - 2]) == buf[k + n - 2 : k + n]
                ):
                    hint = f"{k} byte(s) of garbage before a reply: "
                    break
            if not hint and len(buf) >= 2 and buf[0] == unit:
                try:
                    check_reply(request, buf[:-2])
                except (FrameError, ExceptionReply) as exc:
                    hint = f"{exc}: "
            raise FrameError(f"garbled reply from unit {unit}: {hint}{_hex(buf)}; nothing used")
        if len(buf) < need:
            raise FrameError(
                f"incomplete reply from unit {unit}: {len(buf)} of {need} bytes within the "
                f"timeout: {_hex(buf)}"
            )
        body, crc = buf[: need - 2], buf[need - 2 : need]
        if crc16(body) != crc:
            raise FrameError(
                f"CRC error in reply from unit {unit}: frame says {crc.hex().upper()}, "
                f"computed {crc16(body).hex().upper()}: {_hex(buf[:need])}; nothing used"
            )
        return check_reply(request, body)

    async def _ascii_reply(self, p: _LineProtocol, request: bytes, deadline: float) -> bytes:
        while b"\n" not in p.buf:
            if not await self._wait_data(p, deadline):
                break
        buf = bytes(p.buf)
        if not buf:
            raise TimeoutError(f"no reply from unit {request[0]}")
        end = buf.find(b"\n")
        if end < 0:
            raise FrameError(f"incomplete ASCII reply within the timeout: {buf!r}")
        if buf.startswith(ascii_frame(request)):
            raise FrameError(
                "received our own request back: this adapter echoes what it sends; set "
                "local_echo: true for this bus"
            )
        return check_reply(request, parse_ascii(buf[: end + 1]))


def _whole_frame(buf: bytearray) -> int:
    """Length of the CRC-valid RTU reply frame (of any unit) at the start of ``buf``, or 0."""
    if len(buf) < 5:
        return 0
    fc = buf[1]
    if fc & 0x80:
        n = 5
    elif fc in (1, 2, 3, 4):
        n = 5 + buf[2]
    elif fc in (5, 6, 15, 16):
        n = 8
    else:
        return 0
    if len(buf) < n or crc16(bytes(buf[: n - 2])) != bytes(buf[n - 2 : n]):
        return 0
    return n


class _Collision(Exception):
    """The echo of a request came back different."""


__all__ = [
    "ExceptionReply",
    "FrameError",
    "SerialLine",
    "ascii_frame",
    "char_time",
    "check_reply",
    "crc16",
    "data_to_values",
    "lrc",
    "min_frame_gap",
    "parse_ascii",
    "read_pdu",
    "reply_length",
    "write_pdu",
]
