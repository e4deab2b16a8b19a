"""Serial sensors that print text lines: water-level, rain and gas sensors with an ASCII
output instead of Modbus.

Pure parts (tested alone): :func:`parse_terminator` reads the configured line end (1 to
8 ASCII characters, or a control character by its ASCII name such as ``ETX``);
:class:`LineAssembler` cuts a byte stream into lines (partial lines across reads are
joined; the first line after opening is dropped unless the port was silent before it; an
over-long line is an error however it arrives, never a crash), and :func:`parse_line`
turns one line into point values with the configured parser: delimited columns (CSV),
``key=value`` pairs, a regular expression with named groups, or an NMEA 0183-style
sentence whose checksum is checked (``$…*hh``: XOR of the bytes between ``$`` and ``*``,
NMEA 0183 v4.10 §5.3).

A ``regex`` pattern is the user's and the line the device's: the pattern runs on the
``regex`` package (the syntax and results of Python's ``re``) with a time limit per line,
:data:`MATCH_TIMEOUT_S`, so that a pattern that backtracks catastrophically on some line
(``(a|aa)+b``, ``(\\w|\\w\\w)+=``) costs a line error, never the event loop.

:class:`SerialLineReader` owns the port: it opens it (a device path, a
``/dev/serial/by-id/…`` name or a pyserial URL), reads lines, optionally sends a request
and waits for the answer, and reopens the port when it disappears and comes back. The
first line after opening is read when the line was silent for a character time before
its first byte (:meth:`drivers.serial_io.PortQueue.quiet_before_first`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from drivers.base import PointResult
from drivers.codec import non_finite_quality
from drivers.names import short_repr
from drivers.serial_io import PortQueue, char_time, open_serial

if TYPE_CHECKING:
    from drivers.serial_config import LineParser, LinePoint, SerialLineDevice

log = logging.getLogger(__name__)

MATCH_TIMEOUT_S = 0.05
"""Longest a ``regex`` parser's pattern may take on one line; a line that takes longer is
a line error (:class:`MatchTimeout`)."""
MATCH_SHARE = 0.2
"""Most of the time a reader may spend matching its pattern, as a share of the time
passing (a budget of at most :data:`MATCH_TIMEOUT_S`, refilled at this rate): one line
that runs out of time spends it, and the lines that come while it is spent are dropped
unmatched and counted."""
STEP_S = 0.02
"""A burst of lines is handled in slices of about this long at most, other tasks of the
event loop running in between."""


class LineError(ValueError):
    """A line that cannot be used; the message says why and shows the text."""


class MatchTimeout(LineError):
    """A ``regex`` parser's pattern took longer than its time limit on a line."""


@functools.lru_cache(maxsize=32)
def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by the ``regex`` package (``re`` syntax; imported here, so
    that only configs with a regex parser load it).

    Raises:
        ValueError: the pattern does not compile (the message says why).
    """
    import regex

    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"pattern does not compile: {exc}") from None


# fmt: off
_C0_NAMES = (
    "NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "BEL", "BS", "HT", "LF", "VT", "FF",
    "CR", "SO", "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM",
    "SUB", "ESC", "FS", "GS", "RS", "US",
)
# fmt: on
CONTROL_NAMES: dict[str, str] = {name: chr(code) for code, name in enumerate(_C0_NAMES)} | {
    "DEL": "\x7f",
    "CRLF": "\r\n",
}
"""The ASCII control characters by name (ANSI X3.4-1986; RFC 20 §5.2), and ``CRLF``."""
TERMINATOR_MAX = 8
"""Longest line terminator, bytes."""
_ESCAPE_RE = re.compile(r"\\[0abfnrtvxu]")


def parse_terminator(value: str) -> str:
    """The characters that end a line: ``value`` itself (1 to :data:`TERMINATOR_MAX` ASCII
    characters, matched as bytes whatever the line's encoding), or the control character
    ``value`` names in capitals (:data:`CONTROL_NAMES`: ``ETX`` → ``"\\x03"``).

    Raises:
        ValueError: empty, longer than 8, not ASCII, a name not in capitals (``etx``:
            refused rather than taken as three letters), or holding a backslash escape
            written literally (``'\\r\\n'`` in single quotes in YAML is four characters).
    """
    if value in CONTROL_NAMES:
        return CONTROL_NAMES[value]
    if value.upper() in CONTROL_NAMES:
        raise ValueError(
            f"terminator {value!r}: write the name in capitals ({value.upper()}) for the "
            "control character; names of control characters are not taken as text"
        )
    if not value:
        raise ValueError("a line needs a terminator: e.g. '\\n', ';' or a name such as ETX")
    if _ESCAPE_RE.search(value):
        raise ValueError(
            f"terminator {short_repr(value)} holds a backslash escape as plain characters "
            '(YAML reads escapes only in double quotes): write "\\r\\n" in double quotes, '
            "or a name such as CRLF, CR, LF or ETX"
        )
    if not value.isascii():
        raise ValueError(
            f"terminator {short_repr(value)} is not ASCII: use ASCII characters or the name "
            "of a control character (ETX, STX, EOT, CR, LF, CRLF, NUL, …)"
        )
    if len(value) > TERMINATOR_MAX:
        raise ValueError(
            f"terminator {short_repr(value)} is {len(value)} characters long: at most "
            f"{TERMINATOR_MAX}"
        )
    return value


class LineAssembler:
    """Cuts received bytes into lines, holding at most ``max_line`` bytes plus a
    terminator between reads, however the bytes arrive.

    ``feed(data)`` returns ``(lines, errors)``: complete lines without the terminator (with
    terminator ``\\n``, a ``\\r`` before it goes too), and a message per over-long line.
    A line longer than ``max_line`` bytes is dropped whole, up to its terminator, and
    counted in :attr:`too_long`, whether it arrives in pieces or in one read, and whichever
    line it is (the first after opening too): a line is copied out of a read only once it
    is known to fit, and what is held between reads never exceeds :attr:`hold` bytes (a
    line of 10 MB costs no more memory than one of ``max_line``).

    The first line after a (re)open is dropped (counted in :attr:`partial`): it may be the
    tail of a line that started before, unless the reader knows the port was silent before
    its first byte (:meth:`quiet_start`); :meth:`resync` drops the line in progress after
    bytes were lost in between.
    """

    def __init__(self, terminator: bytes, max_line: int) -> None:
        if not terminator:
            raise ValueError("a line needs a terminator")
        self.terminator = terminator
        self.max_line = max_line
        self.hold = max_line + len(terminator) - 1 + (terminator == b"\n")
        """Most bytes held between reads: a line of ``max_line`` bytes (and a ``\\r``
        before a ``\\n`` terminator) whose terminator has partly arrived."""
        self.buf = bytearray()
        self.synced = False
        self.discarding = False
        self.too_long = 0
        """Over-long lines dropped (since creation)."""
        self.partial = 0
        """First lines dropped after an open or a hole in the stream: perhaps partial."""

    def reset(self) -> None:
        """After reopening the port: drop what was pending and resynchronise (the first
        line is dropped unless :meth:`quiet_start` follows)."""
        self.buf.clear()
        self.synced = False
        self.discarding = False

    def quiet_start(self) -> None:
        """The port was silent for at least a character time before its first byte after
        opening: the first line is whole, keep it (if it fits)."""
        if not self.buf and not self.discarding:
            self.synced = True

    def clear(self) -> None:
        """Drop the line in progress and stay in step (request mode: the next line is the
        answer to the next request)."""
        self.buf.clear()
        self.discarding = False

    def resync(self) -> None:
        """Bytes were lost between two reads: the line in progress is incomplete, drop it
        up to the next terminator."""
        self.buf.clear()
        self.discarding = False
        self.synced = False

    def feed(self, data: bytes) -> tuple[list[bytes], list[str]]:
        lines: list[bytes] = []
        errors: list[str] = []
        buf = self.buf
        term = self.terminator
        lt = len(term)
        pos = 0
        if buf and lt > 1:
            # a terminator that began in the bytes held from the last read
            k0 = max(0, len(buf) - (lt - 1))
            k = (bytes(buf[k0:]) + data[: lt - 1]).find(term)
            if 0 <= k < len(buf) - k0:
                pos = k0 + k + lt - len(buf)
                del buf[k0 + k :]
                self._end(b"", 0, 0, lines, errors)
        strip_cr = term == b"\n"
        while (end := data.find(term, pos)) >= 0:
            if end - pos <= self.max_line and self.synced and not buf and not self.discarding:
                line = data[pos:end]  # the common case: a whole line that fits, in this read
                lines.append(line[:-1] if strip_cr and line.endswith(b"\r") else line)
            else:
                self._end(data, pos, end, lines, errors)
            pos = end + lt
        rest = len(data) - pos
        if not self.discarding and len(buf) + rest > self.hold:
            if self.synced:
                self.too_long += 1
                errors.append(
                    f"line longer than {self.max_line} bytes, dropped: "
                    f"{(bytes(buf[:60]) + data[pos : pos + 60])[:60]!r}…"
                )
            self.discarding = True
        if self.discarding:
            # keep only what could be the start of a terminator split across reads
            keep = lt - 1
            tail = bytes(buf[-keep:]) + data[max(pos, len(data) - keep) :] if keep else b""
            buf[:] = tail[len(tail) - keep :]
        else:
            buf += data[pos:]
        return lines, errors

    def _end(self, data: bytes, pos: int, end: int, lines: list[bytes], errors: list[str]) -> None:
        """A terminator: the line is the held bytes and ``data[pos:end]``."""
        buf = self.buf
        size = len(buf) + end - pos
        if self.discarding:
            self.discarding = False  # the end of the over-long line: in step now
            self.partial += not self.synced
            self.synced = True
        elif not self.synced:
            self.synced = True  # the first (possibly partial) line
            self.partial += 1
        elif size > self.max_line + 1:
            self.too_long += 1
            start = (bytes(buf[:60]) + data[pos : pos + 60])[:60]
            errors.append(f"line of {size} bytes, longer than {self.max_line}, dropped: {start!r}…")
        else:
            line = bytes(buf) + data[pos:end] if buf else data[pos:end]
            if self.terminator == b"\n" and line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line:
                self.too_long += 1
                errors.append(
                    f"line of {len(line)} bytes, longer than {self.max_line}, dropped: "
                    f"{line[:60]!r}…"
                )
            else:
                lines.append(line)
        buf.clear()


def nmea_checksum(body: str) -> int:
    """XOR of the characters between ``$`` (or ``!``) and ``*`` (NMEA 0183 §5.3)."""
    c = 0
    for ch in body.encode("ascii", "replace"):
        c ^= ch
    return c


def parse_fields(text: str, parser: LineParser, timeout: float = MATCH_TIMEOUT_S) -> dict[str, str]:
    """The fields of one line by name (csv: column names or 1-based numbers; kv: keys;
    regex: groups, the pattern searched for at most ``timeout`` seconds; nmea: 1-based
    field numbers after the sentence id). Pure.

    Raises:
        LineError: the line does not fit the parser (message with the text);
            :class:`MatchTimeout` when the pattern took longer than ``timeout``.
    """
    kind = parser.kind
    if kind == "csv":
        cols = [c.strip() for c in text.split(parser.delimiter)]
        names = parser.columns or [str(i + 1) for i in range(len(cols))]
        if parser.columns is not None and len(cols) != len(parser.columns):
            raise LineError(f"{len(cols)} columns, expected {len(parser.columns)}: {text!r}")
        return {n: v for n, v in zip(names, cols, strict=False) if n is not None}
    if kind == "kv":
        out: dict[str, str] = {}
        for pair in text.split(parser.pair_separator):
            if not pair.strip():
                continue
            key, sep, value = pair.partition(parser.key_separator)
            if not sep:
                raise LineError(f"{pair.strip()!r} is not key{parser.key_separator}value: {text!r}")
            out[key.strip()] = value.strip()
        return out
    if kind == "regex":
        try:
            m = compile_pattern(parser.pattern or "").search(text, timeout=timeout)
        except TimeoutError:
            raise MatchTimeout(
                f"the pattern took over {timeout * 1000:.0f} ms on this line and was "
                "stopped (a repeated group whose branches can match the same text, such as "
                f"(a|aa)+, backtracks without end on some lines): {text[:80]!r}"
            ) from None
        if m is None:
            raise LineError(f"line does not match the pattern: {text!r}")
        return {k: v for k, v in m.groupdict().items() if v is not None}
    # nmea
    if not text.startswith(("$", "!")):
        raise LineError(f"not an NMEA sentence (no '$'): {text!r}")
    body, star, check = text[1:].partition("*")
    if not star:
        raise LineError(f"NMEA sentence without checksum: {text!r}")
    try:
        given = int(check.strip()[:2], 16)
    except ValueError:
        raise LineError(f"NMEA checksum {check!r} is not hex: {text!r}") from None
    if given != nmea_checksum(body):
        raise LineError(
            f"NMEA checksum error: sentence says {given:02X}, computed "
            f"{nmea_checksum(body):02X}: {text!r}"
        )
    fields = body.split(",")
    if parser.sentence is not None and fields[0] != parser.sentence:
        raise LineError(f"sentence {fields[0]!r}, not {parser.sentence!r}")
    return {str(i): v for i, v in enumerate(fields) if i > 0}


INT_LIMIT = 2**63
"""Largest magnitude of an ``int`` field (a 64-bit counter); beyond it: ``decode_error``."""


def to_results(fields: dict[str, str], points: Sequence[LinePoint]) -> list[PointResult]:
    """One result per point from the fields of a line; a missing, unreadable or
    out-of-range field gives that point quality ``decode_error``, a NaN or infinite one
    quality ``nan``/``inf`` (JSON has no such numbers, RFC 8259 section 6). Pure."""
    out: list[PointResult] = []
    for p in points:
        key = p.field or p.name
        raw = fields.get(key)
        if raw is None or raw == "":
            out.append(PointResult(p.name, None, "decode_error", f"no field {key!r} in the line"))
            continue
        if p.type == "str":
            out.append(PointResult(p.name, raw))
            continue
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        try:
            number: float | int = float(raw) if p.type == "float" else int(raw, 10)
            if isinstance(number, int) and not -INT_LIMIT <= number <= INT_LIMIT:
                raise OverflowError
            if p.scale != 1 or p.offset != 0:
                number = number * p.scale + p.offset
            if p.decimals is not None:
                number = round(float(number), p.decimals)
        except ValueError:
            out.append(
                PointResult(
                    p.name, None, "decode_error", f"field {key!r} = {shown!r} is not a {p.type}"
                )
            )
            continue
        except OverflowError:
            out.append(
                PointResult(p.name, None, "decode_error", f"field {key!r} = {shown!r} is too large")
            )
            continue
        bad = non_finite_quality(number) if isinstance(number, float) else None
        if bad is not None:
            out.append(PointResult(p.name, None, bad, f"field {key!r} = {shown!r}"))
            continue
        out.append(PointResult(p.name, number))
    return out


def parse_line(
    line: bytes, dev: SerialLineDevice, timeout: float = MATCH_TIMEOUT_S
) -> list[PointResult]:
    """Decode and parse one line into one result per point (a regex parser's pattern
    searched for at most ``timeout`` seconds). With terminator ETX, a leading STX (the
    start of an STX … ETX frame) is removed first; white space around the text always.

    Raises:
        LineError: undecodable bytes, or a line that does not fit the parser
            (:class:`MatchTimeout`: the pattern took too long).
    """
    if dev.terminator == "\x03" and line.startswith(b"\x02"):
        line = line[1:]
    try:
        text = line.decode(dev.encoding).strip()
    except UnicodeDecodeError:
        raise LineError(f"not {dev.encoding} text: {line[:80]!r}") from None
    if not text:
        raise LineError("empty line")
    return to_results(parse_fields(text, dev.parser, timeout), dev.points)


# -- the port ----------------------------------------------------------------------------------

Sink = Callable[[Any, int, list[PointResult]], None]
"""Receives (device, acquisition time in UTC ms, one result per point)."""


class SerialLineReader:
    """Reads one line-protocol sensor until cancelled.

    Every parsed line is one reading (stream mode); with ``request`` set, the request is
    sent every ``poll_interval`` and the answer line is the reading (a missing answer
    gives quality ``timeout`` for every point, a garbled one ``frame_error``). Parse errors
    are counted in :attr:`errors` and logged with the raw text at most once per
    :data:`LOG_EVERY_S`. A vanished port is reopened every second until it is back, by
    the same path (use ``/dev/serial/by-id/…`` to survive renumbering).

    The time lines cost is bounded: a regex parser's pattern gets at most
    :data:`MATCH_TIMEOUT_S` per line and :data:`MATCH_SHARE` of the time in all (lines
    beyond that are dropped unmatched, counted), and the lines of one read are handled in
    slices of :data:`STEP_S`, yielding to the event loop's other tasks in between.

    Args:
        dev: the device config.
        sink: called with each reading.
        now_ms: wall clock in UTC ms (for the reading's time stamp).
    """

    LOG_EVERY_S = 10.0

    def __init__(self, dev: SerialLineDevice, sink: Sink, now_ms: Callable[[], int]) -> None:
        self.dev = dev
        self.sink = sink
        self.now_ms = now_ms
        self.asm = LineAssembler(dev.terminator.encode(), dev.max_line)
        self.errors = 0
        """Lines (and holes in the stream) that gave no reading: garbled, unparsable,
        over-long (:attr:`LineAssembler.too_long`)."""
        self.lines = 0
        self.dropped_bytes = 0
        """Bytes thrown away because the device sent faster than they were read."""
        self.in_progress = 0
        """First lines dropped because bytes were already arriving as the port opened."""
        self.match_timeouts = 0
        """Lines on which the regex parser's pattern ran out of time (in :attr:`errors`)."""
        self.unmatched = 0
        """Lines dropped unmatched: the pattern had used its share of time (in
        :attr:`errors`)."""
        self._budget = MATCH_TIMEOUT_S
        self._budget_at = time.monotonic()
        self._logged_at = -1e9
        self._suppressed = 0
        self._transport: Any = None

    def _error(self, msg: str) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY_S:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning("device %s: parse error: %s%s", self.dev.id, msg, more)
            self._logged_at = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    async def _open(self) -> PortQueue | None:
        d = self.dev
        port = PortQueue(char_s=char_time(d.baudrate, d.bytesize, d.parity, d.stopbits))
        try:
            self._transport = await open_serial(
                port, d.serial_port, d.baudrate, d.bytesize, d.parity, d.stopbits
            )
        except Exception as exc:  # OSError, termios.error, SerialException…
            log.debug("open %s: %s", d.serial_port, exc)
            return None
        self.asm.reset()
        return port

    def _bad(self, quality: str, error: str) -> list[PointResult]:
        return [PointResult(p.name, None, quality, error) for p in self.dev.points]

    async def run(self) -> None:
        d = self.dev
        announced = False
        try:
            while True:
                port = await self._open()
                if port is None:
                    if not announced:
                        log.warning(
                            "device %s: cannot open %s; retrying every second",
                            d.id,
                            d.serial_port,
                        )
                        announced = True
                    if d.request is not None:
                        self.sink(
                            d,
                            self.now_ms(),
                            self._bad("no_connection", f"{d.serial_port} is not open"),
                        )
                    await asyncio.sleep(1.0)
                    continue
                log.info("device %s: %s open", d.id, d.serial_port)
                announced = False
                if d.request is None:
                    await self._stream(port)
                else:
                    await self._poll(port)
                log.warning(
                    "device %s: %s went away; reopening when it is back", d.id, d.serial_port
                )
                self._close()
        finally:
            self._close()
            if self.errors or self.dropped_bytes:
                why = f"{self.asm.too_long} over-long"
                if d.parser.kind == "regex":
                    why += (
                        f", {self.match_timeouts} over the pattern's time limit, "
                        f"{self.unmatched} unmatched for lack of time"
                    )
                log.warning(
                    "device %s: %d reading(s) from lines; %d line(s) dropped (%s), "
                    "%d byte(s) dropped unread",
                    d.id,
                    self.lines,
                    self.errors,
                    why,
                    self.dropped_bytes,
                )

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _take(self, port: PortQueue, data: bytes) -> tuple[list[bytes], list[str]]:
        """Cut ``data`` into lines, first resynchronising if the queue had to drop bytes."""
        lost = port.take_lost()
        if lost:
            self.dropped_bytes += lost
            self.asm.resync()
            self._error(f"{lost} byte(s) dropped: the device sends faster than it is read")
        return self.asm.feed(data)

    async def _stream(self, port: PortQueue) -> None:
        d = self.dev
        first = True
        watch: int | None = None  # asm.partial before the first line after opening
        while True:
            data = await port.get()
            if data is None:
                return
            ts = self.now_ms()
            if first:
                first = False
                watch = self.asm.partial
                if port.quiet_before_first():
                    self.asm.quiet_start()
            lines, errors = self._take(port, data)
            if watch is not None and self.asm.synced:
                if self.asm.partial > watch:
                    self.in_progress += 1
                    log.info(
                        "device %s: the first line after opening was dropped: it was already "
                        "arriving when %s opened",
                        d.id,
                        d.serial_port,
                    )
                watch = None
            for e in errors:
                self._error(e)
            step = time.monotonic()
            for line in lines:
                self._handle(line, ts)
                if time.monotonic() - step >= STEP_S:
                    # the other tasks' turn: a short sleep rather than sleep(0), after which
                    # this task would run again before a task that was woken meanwhile
                    await asyncio.sleep(0.001)
                    step = time.monotonic()

    def _handle(self, line: bytes, ts: int) -> bool:
        if self.dev.parser.kind != "regex":
            return self._parse(line, ts, MATCH_TIMEOUT_S)
        now = time.monotonic()
        self._budget = min(MATCH_TIMEOUT_S, self._budget + (now - self._budget_at) * MATCH_SHARE)
        self._budget_at = now
        if self._budget < MATCH_TIMEOUT_S / 50:
            self.unmatched += 1
            self._error(
                f"line dropped unmatched: the pattern used its share of time "
                f"({MATCH_SHARE:.0%}) on the lines before: {line[:80]!r}"
            )
            return False
        try:
            return self._parse(line, ts, min(MATCH_TIMEOUT_S, self._budget))
        finally:
            self._budget -= time.monotonic() - now

    def _parse(self, line: bytes, ts: int, timeout: float) -> bool:
        try:
            results = parse_line(line, self.dev, timeout)
        except MatchTimeout as exc:
            self.match_timeouts += 1
            self._error(str(exc))
            return False
        except LineError as exc:
            self._error(str(exc))
            return False
        self.lines += 1
        self.sink(self.dev, ts, results)
        return True

    async def _poll(self, port: PortQueue) -> None:
        d = self.dev
        assert d.request is not None
        request = d.request.encode(d.encoding)
        next_due = time.monotonic()
        self.asm.synced = True  # in request mode every line is an answer
        while True:
            delay = next_due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_due += d.poll_interval
            if not port.discard():  # drop what came unasked
                return
            self.asm.clear()
            ts = self.now_ms()
            self._transport.write(request)
            deadline = time.monotonic() + d.timeout
            answered = False
            while not answered:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.sink(
                        d, ts, self._bad("timeout", f"no answer to {d.request!r} in {d.timeout:g}s")
                    )
                    break
                try:
                    async with asyncio.timeout(left):
                        data = await port.get()
                except TimeoutError:
                    continue
                if data is None:
                    return
                lines, errors = self._take(port, data)
                for e in errors:
                    self._error(e)
                if errors and not lines:  # an answer too long to be one
                    answered = True
                    self.sink(d, ts, self._bad("frame_error", f"garbled answer: {errors[0]}"))
                for line in lines[:1]:
                    answered = True
                    if not self._handle(line, ts):
                        self.sink(d, ts, self._bad("frame_error", f"garbled answer: {line[:80]!r}"))
