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
  count (reads) or echoed fields (writes), CRC (RTU, 6.2.2 of the same spec) or LRC
  (ASCII, 6.2.1); each failure raises :class:`FrameError` (:class:`CrcError` for a bad
  CRC/LRC) with the bytes received;
- resynchronisation: when the bytes received do not start with the reply, the reply is
  looked for inside them (:func:`find_reply`, :func:`find_ascii_reply`): the first
  whole frame that answers this very request (same unit id, same function code or its
  exception code, the byte count this request implies or the echoed fields, a valid
  CRC/LRC) is used and the bytes before it are counted as garbage; a frame answering
  another request (another unit, a late reply) is never taken. After stray bytes the
  reader waits for the reply until the response timeout, not only until the next
  silence (a device may answer several character times after its adapter's noise);
- every request and its outcome is counted per line (:class:`LineCounters`);
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
from dataclasses import dataclass
from typing import NamedTuple

from drivers.serial_io import open_serial
from drivers.stream import SmallReads

log = logging.getLogger(__name__)

READ_FUNCTIONS = {"coil": 1, "discrete_input": 2, "holding": 3, "input": 4}


class FrameError(Exception):
    """A reply arrived but cannot be used (bad CRC/LRC, garbage, wrong unit id, function
    code or byte count, a bad echo). The message says what and shows the bytes."""


class CrcError(FrameError):
    """The reply's CRC (RTU, Modbus over Serial Line V1.02, 6.2.2) or LRC (ASCII, 6.2.1)
    does not match its content: a reply corrupted on the line."""


@dataclass(slots=True)
class LineCounters:
    """What happened on one bus (a line or a TCP connection) since the bus was made; the
    agent reports them in its health message, ``read`` prints them.

    Attributes:
        requests: requests sent (retries and collision resends included).
        timeouts: requests that got no reply within their timeout.
        crc_errors: replies refused for a bad CRC (RTU) or LRC (ASCII).
        garbage_bytes: bytes received that were not part of a reply used: skipped
            before a reply (resynchronisation), arrived between two requests, in a
            refused reply, or in a frame answering another request.
        frame_errors: replies refused for anything but the CRC/LRC (garbled, wrong byte
            count, a frame answering another request and nothing else, a flood).
        retries: requests sent again within a poll after a timeout, CRC or frame error.
    """

    requests: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    garbage_bytes: int = 0
    frame_errors: int = 0
    retries: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name, in the order above."""
        return {
            "requests": self.requests,
            "timeouts": self.timeouts,
            "crc_errors": self.crc_errors,
            "garbage_bytes": self.garbage_bytes,
            "frame_errors": self.frame_errors,
            "retries": self.retries,
        }

    def count_failure(self, exc: BaseException) -> None:
        """Count a failed request by its error: TimeoutError, CrcError or FrameError."""
        if isinstance(exc, TimeoutError):
            self.timeouts += 1
        elif isinstance(exc, CrcError):
            self.crc_errors += 1
        elif isinstance(exc, FrameError):
            self.frame_errors += 1


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


def reply_size(request: bytes) -> int:
    """Length of the RTU reply (unit id to CRC) that answers ``request`` (unit id + PDU)
    normally: 5 + the byte count for reads (FC 1–4: 2 per register, 1 per 8 bits), 8 for
    writes (FC 5, 6, 15, 16 echo address and value or quantity); an exception reply has 5
    (Modbus Application Protocol V1.1b3, 6.1–6.12 and 7). Pure."""
    fc = request[1]
    if fc in (1, 2, 3, 4):
        count = (request[4] << 8) | request[5]
        return 5 + (2 * count if fc in (3, 4) else -(-count // 8))
    return 8


def _answer_size(request: bytes, size: int, buf: bytes | bytearray, k: int) -> int | None:
    """Length of the frame that answers ``request`` if one starts at ``buf[k]``, judged
    from its head only: ``None`` when it cannot (another unit, function code, byte count
    or echoed field), 0 when too few bytes have come to tell."""
    n = len(buf)
    if k + 1 >= n:
        return 0
    fc = request[1]
    got = buf[k + 1]
    if got == fc | 0x80:
        return 5
    if got != fc:
        return None
    if fc in (1, 2, 3, 4):
        if k + 2 >= n:
            return 0
        return size if buf[k + 2] == size - 5 else None
    head = bytes(buf[k + 2 : k + 6])
    return size if request[2 : 2 + len(head)] == head else None


class Found(NamedTuple):
    """Where :func:`find_reply` found the reply."""

    at: int
    """Offset of the reply's first byte in the buffer; -1 when there is none (yet)."""
    length: int
    """Its length with the CRC (0 when none)."""
    resume: int
    """The first offset not yet ruled out: search again from here when more bytes come."""


def find_reply(request: bytes, buf: bytes | bytearray, start: int = 0) -> Found:
    """The first whole RTU frame in ``buf`` (from offset ``start``) that answers
    ``request`` (unit id + PDU, no CRC): the same unit id; the same function code or its
    exception code (``fc | 0x80``, 5 bytes); for a read the byte count the request implies,
    for a write the echoed address and value or quantity; and a valid CRC (Modbus over
    Serial Line V1.02, 2.5.1.2 frame and 6.2.2 CRC). A frame that answers another request
    is never returned. Pure; each offset costs a byte comparison, and a CRC only when a
    whole frame with the right head is there.
    """
    unit = request[:1]
    size = reply_size(request)
    n = len(buf)
    undecided = -1
    k = start
    while (k := buf.find(unit, k)) >= 0:
        length = _answer_size(request, size, buf, k)
        if length is not None:
            if length == 0 or k + length > n:
                if undecided < 0:
                    undecided = k
            elif crc16(bytes(buf[k : k + length - 2])) == buf[k + length - 2 : k + length]:
                return Found(k, length, k)
        k += 1
    return Found(-1, 0, n if undecided < 0 else undecided)


def _fits(request: bytes, adu: bytes) -> bool:
    """Whether ``adu`` (unit id + PDU) answers ``request``, normally or with an exception."""
    try:
        check_reply(request, adu)
    except ExceptionReply:
        return True
    except FrameError:
        return False
    return True


def find_ascii_reply(
    request: bytes, buf: bytes | bytearray, start: int = 0
) -> tuple[int, int, bytes | None]:
    """The first whole ASCII frame in ``buf`` (from ``start``) that answers ``request``:
    ``:`` + hex + CR LF with a valid LRC (Modbus over Serial Line V1.02, 2.5.2.1 and
    6.2.1) whose unit id, function code and byte count (or echoed fields) fit the request.

    Returns ``(at, end, adu)``: the frame is ``buf[at:end]`` and ``adu`` its unit id + PDU;
    with no such frame ``(-1, resume, None)``, ``resume`` being where the first line not
    yet ended starts (search again from there). Pure.
    """
    k = start
    while True:
        nl = buf.find(b"\n", k)
        if nl < 0:
            return -1, k, None
        line = bytes(buf[k:nl])
        colon = line.rfind(b":")  # a frame holds no ':' after its first byte
        if colon >= 0:
            text = line[colon + 1 :].rstrip(b"\r")
            try:
                raw = bytes.fromhex(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raw = b""
            if len(raw) >= 3 and lrc(raw[:-1]) == raw[-1] and _fits(request, raw[:-1]):
                return k + colon, nl + 1, raw[:-1]
        k = nl + 1


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
        raise CrcError(
            f"LRC error in ASCII reply: frame says {raw[-1]:02X}, computed "
            f"{lrc(raw[:-1]):02X}: {frame!r}"
        )
    return raw[:-1]


# -- the line -------------------------------------------------------------------------------

RX_LIMIT = 4096
"""Most received bytes a line holds at once. A reply is far shorter: an RTU ADU has at most
256 bytes, an ASCII frame 513 characters (Modbus over Serial Line V1.02, 2.5.1.1 and
2.5.2.1); more than this is a device (or a serial device server) that babbles."""


class _LineProtocol(SmallReads):
    """Collects received bytes and the time of the last one, at most ``limit`` bytes.

    Past the limit (a flood), what was held is thrown away and counted; on a TCP
    connection (``drop_on_flood``) the connection is closed as well, and :attr:`flooded`
    says why: the bus's reconnect starts it again in step.
    """

    def __init__(self, limit: int = RX_LIMIT, drop_on_flood: bool = False) -> None:
        super().__init__()
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
        self._echo_extra_logged = False
        self.counters = LineCounters()
        """Requests and their outcomes on this line (see :class:`LineCounters`)."""
        self.noisy = 0
        """Requests not sent because the line never fell silent."""
        self.last_error = ""
        """Why the last :meth:`connect` failed."""

    @property
    def requests(self) -> int:
        """Requests sent (``counters.requests``)."""
        return self.counters.requests

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
                self.counters.garbage_bytes += n
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
            self.counters.garbage_bytes += len(p.buf) + p.overflow
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
            self.counters.garbage_bytes += n
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
                try:
                    return await self._transact(request, timeout)
                except _Collision as exc:
                    log.info("%s: %s; sending the request once more", self.endpoint, exc)
                    try:
                        return await self._transact(request, timeout)
                    except _Collision as again:
                        raise FrameError(str(again)) from None
            except (TimeoutError, FrameError) as exc:
                self.counters.count_failure(exc)
                raise

    async def _transact(self, request: bytes, timeout: float) -> bytes:
        p = self._port()
        await self._wait_quiet(p, timeout)
        frame = ascii_frame(request) if self.framing == "ascii" else request + crc16(request)
        assert p.transport is not None
        p.transport.write(frame)  # type: ignore[attr-defined]
        self.counters.requests += 1
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
        """Read the RTU reply to ``request``: the frame at the front of the input (the
        healthy path: one head check per arrival and one CRC), or else the frame found
        inside it by :func:`find_reply`. Frames answering other requests at the front are
        thrown away; after garbage the reply is awaited until ``deadline``, unless at
        least a whole reply's worth of bytes came and the line fell silent (a garbled
        reply: no other follows)."""
        size = reply_size(request)
        silence = max(self.frame_gap, 0.02)
        strays: list[bytes] = []
        unit = request[0]
        front = True  # the front of the input may still be the reply, or a stray frame
        resume = 1
        at = length = -1
        buf = p.buf
        while True:
            n = len(buf)
            if n and front:
                head = _answer_size(request, size, buf, 0) if buf[0] == unit else None
                if head == 0 or (head and n < head):  # it may still be the reply
                    if not await self._wait_data(p, deadline):
                        break
                    continue
                if head and crc16(bytes(buf[: head - 2])) == buf[head - 2 : head]:
                    at, length = 0, head  # the healthy path
                    break
                other = _frame_size(buf)
                if other and n >= other:
                    front = False
                    if crc16(bytes(buf[: other - 2])) == buf[other - 2 : other]:
                        # a whole frame answering another request (a late reply): skip it
                        strays.append(bytes(buf[:other]))
                        log.debug("%s: discarded a frame: %s", self.endpoint, _hex(strays[-1]))
                        self.counters.garbage_bytes += other
                        del buf[:other]
                        front, resume = True, 1
                        continue
                elif not other and n >= 3:
                    front = False
            if n:
                found = find_reply(request, buf, resume)
                if found.at >= 0:
                    at, length = found.at, found.length
                    break
                resume = max(found.resume, 1)
                if n >= size and found.resume >= n and not front:
                    # a garbled reply, or garbage as long as one: it ends with silence
                    if not await self._wait_data(p, min(deadline, p.last_rx + silence)):
                        break
                    continue
            if not await self._wait_data(p, deadline):
                break
        if at >= 0:
            if at >= len(frame) and buf.startswith(frame) and not self._echo_extra_logged:
                log.warning(
                    "%s: received our own request back before the reply: this adapter echoes "
                    "what it sends; set local_echo: true for this bus (the reply is used, the "
                    "echo counted as garbage)",
                    self.endpoint,
                )
                self._echo_extra_logged = True
            if at:
                log.debug(
                    "%s: %d byte(s) of garbage before the reply from unit %d: %s",
                    self.endpoint,
                    at,
                    request[0],
                    _hex(buf[:at]),
                )
                self.counters.garbage_bytes += at
            body = bytes(buf[at : at + length - 2])
            del buf[: at + length]
            return check_reply(request, body)
        received = bytes(buf)
        self.counters.garbage_bytes += len(received)
        p.clear()
        raise _rtu_failure(request, frame, received, strays)

    async def _ascii_reply(self, p: _LineProtocol, request: bytes, deadline: float) -> bytes:
        """Read the ASCII reply to ``request``: the first frame that answers it
        (:func:`find_ascii_reply`), the bytes before it counted as garbage; a frame of this
        unit with a bad LRC ends the wait (a reply corrupted on the line)."""
        resume = 0
        unit_hex = f":{request[0]:02X}".encode()
        at, end, adu = -1, 0, None
        while True:
            if b"\n" in p.buf[resume:]:
                at, end, adu = find_ascii_reply(request, p.buf, resume)
                if adu is not None:
                    break
                if unit_hex in p.buf[resume:end]:  # this unit's frame, spoilt: no other comes
                    break
                resume = end
            if not await self._wait_data(p, deadline):
                break
        if adu is not None:
            self.counters.garbage_bytes += at
            del p.buf[:end]
            return check_reply(request, adu)
        buf = bytes(p.buf)
        self.counters.garbage_bytes += len(buf)
        p.clear()
        if not buf:
            raise TimeoutError(f"no reply from unit {request[0]}")
        if b"\n" not in buf:
            raise FrameError(f"incomplete ASCII reply within the timeout: {buf!r}")
        if buf.startswith(ascii_frame(request)):
            raise FrameError(
                "received our own request back: this adapter echoes what it sends; set "
                "local_echo: true for this bus"
            )
        lines = buf.split(b"\n")[:-1]
        mine = [ln for ln in lines if unit_hex in ln]
        line = (mine or lines)[0] + b"\n"
        spoilt = line[line.rfind(b":") :] if mine else line
        check_reply(request, parse_ascii(spoilt))  # raises: nothing in it answers
        raise FrameError(f"no ASCII reply to the request from unit {request[0]}: {buf!r}")


def _rtu_failure(request: bytes, frame: bytes, buf: bytes, strays: list[bytes]) -> Exception:
    """The error that says why no reply to ``request`` could be taken from ``buf`` (what
    came after the request, less the whole frames ``strays`` that answer other requests).
    """
    unit = request[0]
    if not buf and strays:
        stray = strays[-1]
        if stray[0] != unit:
            return FrameError(
                f"no reply from unit {unit}; a frame from unit {stray[0]} came instead (a late "
                f"reply, or two devices with one unit id?): {_hex(stray)}"
            )
        try:
            check_reply(request, stray[:-2])
            why = "it answers another request"
        except (FrameError, ExceptionReply) as exc:
            why = str(exc)
        return FrameError(
            f"no reply to this request from unit {unit}; a frame that does not fit it came "
            f"instead ({why}; a late reply?): {_hex(stray)}"
        )
    if not buf:
        return TimeoutError(f"no reply from unit {unit}")
    if buf.startswith(frame):
        return FrameError(
            f"received our own request back ({_hex(frame)}): this adapter echoes what it "
            "sends; set local_echo: true for this bus"
        )
    size = reply_size(request)
    k = 0
    while (k := buf.find(request[:1], k)) >= 0:
        length = _answer_size(request, size, buf, k)
        if length and k + length <= len(buf):
            body, crc = buf[k : k + length - 2], buf[k + length - 2 : k + length]
            before = f" after {k} byte(s) of garbage" if k else ""
            return CrcError(
                f"CRC error in reply from unit {unit}{before}: frame says "
                f"{crc.hex().upper()}, computed {crc16(body).hex().upper()}: {_hex(buf)}; "
                "nothing used"
            )
        if length:
            return FrameError(
                f"incomplete reply from unit {unit}: {len(buf) - k} of {length} bytes within "
                f"the timeout{f' after {k} byte(s) of garbage' if k else ''}: {_hex(buf)}"
            )
        k += 1
    hint = ""
    if len(buf) >= 5 and buf[0] == unit:
        try:
            check_reply(request, buf[:-2])
        except (FrameError, ExceptionReply) as exc:
            hint = f"{exc}: "
    return FrameError(f"garbled reply from unit {unit}: {hint}{_hex(buf)}; nothing used")


def _frame_size(buf: bytearray) -> int:
    """Length of the RTU reply frame (of any unit, any request) that starts ``buf``, judged
    from its function code and byte count; 0 when that is no reply's head or too few bytes
    have come to tell."""
    if len(buf) < 3:
        return 0
    fc = buf[1]
    if fc & 0x80:
        return 5
    if fc in (1, 2, 3, 4):
        return 5 + buf[2]
    if fc in (5, 6, 15, 16):
        return 8
    return 0


class _Collision(Exception):
    """The echo of a request came back different."""


__all__ = [
    "CrcError",
    "ExceptionReply",
    "Found",
    "FrameError",
    "LineCounters",
    "SerialLine",
    "ascii_frame",
    "char_time",
    "check_reply",
    "crc16",
    "data_to_values",
    "find_ascii_reply",
    "find_reply",
    "lrc",
    "min_frame_gap",
    "parse_ascii",
    "read_pdu",
    "reply_length",
    "reply_size",
    "write_pdu",
]
