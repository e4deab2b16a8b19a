"""Serial sensors that print text lines: water-level, rain and gas sensors with an ASCII
output instead of Modbus.

Pure parts (tested alone): :class:`LineAssembler` cuts a byte stream into lines (partial
lines across reads are joined; the first partial line after opening is dropped; an
over-long line is an error, never a crash), and :func:`parse_line` turns one line into
point values with the configured parser: delimited columns (CSV), ``key=value`` pairs, a
regular expression with named groups, or an NMEA 0183-style sentence whose checksum is
checked (``$…*hh``: XOR of the bytes between ``$`` and ``*``, NMEA 0183 v4.10 §5.3).

:class:`SerialLineReader` owns the port: it opens it (a device path, a
``/dev/serial/by-id/…`` name or a pyserial URL), reads lines, optionally sends a request
and waits for the answer, and reopens the port when it disappears and comes back.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from drivers.base import PointResult
from drivers.common import Duration, StrictModel, at_least
from drivers.names import DisplayName, Name
from drivers.serial_io import PortQueue, open_serial

log = logging.getLogger(__name__)


class LineError(ValueError):
    """A line that cannot be used; the message says why and shows the text."""


class LinePoint(StrictModel):
    """One value taken from each line."""

    name: Name
    field: str | None = Field(
        default=None,
        description="Column name (csv, with 'columns'), key (kv), group (regex) or field "
        "number counted from 1 after the sentence id (nmea); default: the point name",
    )
    type: Literal["float", "int", "str"] = "float"
    scale: float = 1.0
    offset: float = 0.0
    decimals: int | None = Field(default=None, ge=0, le=9)
    unit: str | None = None
    description: str | None = None


class LineParser(StrictModel):
    """How a line is read."""

    kind: Literal["csv", "kv", "regex", "nmea"]
    delimiter: str = Field(default=",", min_length=1, description="csv: column separator")
    columns: list[str | None] | None = Field(
        default=None, description="csv: a name per column (null: unused); else numbers 1.."
    )
    pair_separator: str = Field(default=",", min_length=1, description="kv: between pairs")
    key_separator: str = Field(default="=", min_length=1, description="kv: key from value")
    pattern: str | None = Field(default=None, description="regex: with (?P<name>…) groups")
    sentence: str | None = Field(
        default=None, description="nmea: only this sentence id, e.g. 'WIXDR' or 'GPGGA'"
    )

    @model_validator(mode="after")
    def _check(self) -> LineParser:
        if self.kind == "regex":
            if not self.pattern:
                raise ValueError("a regex parser needs 'pattern' with named groups")
            try:
                rx = re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern does not compile: {exc}") from None
            if not rx.groupindex:
                raise ValueError("the pattern has no named group (?P<name>…)")
        return self


class SerialLineDevice(StrictModel):
    """A sensor on a serial port that prints (or answers with) text lines."""

    driver: Literal["serial_line"]
    id: Name
    name: DisplayName | None = Field(
        default=None, description="Text for people (any Unicode); in payloads, never in topics"
    )
    serial_port: str = Field(min_length=1, description="Device, /dev/serial/by-id/… or URL")
    baudrate: int = Field(default=9600, ge=50, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    terminator: Literal["\n", "\r\n", "\r"] = Field(
        default="\n", description="Line end: '\\n', '\\r\\n' or '\\r'"
    )
    max_line: int = Field(default=512, ge=8, le=65536, description="Longest line, bytes")
    encoding: str = "ascii"
    parser: LineParser
    request: str | None = Field(
        default=None, description="Request/response mode: send this text, read one line"
    )
    poll_interval: Annotated[Duration, at_least("50ms")] = Field(
        default=1.0, description="Request mode: how often to ask"
    )
    timeout: Annotated[Duration, at_least("10ms")] = Field(
        default=1.0, description="Request mode: how long to wait for the answer"
    )
    points: list[LinePoint] = Field(min_length=1)
    profile: None = None

    @model_validator(mode="after")
    def _check(self) -> SerialLineDevice:
        names = [p.name for p in self.points]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"point name(s) used twice: {', '.join(dup)}")
        p = self.parser
        if p.kind == "regex":
            groups = set(re.compile(p.pattern or "").groupindex)
            for pt in self.points:
                if (pt.field or pt.name) not in groups:
                    raise ValueError(
                        f"point {pt.name!r}: the pattern has no group {pt.field or pt.name!r} "
                        f"(groups: {', '.join(sorted(groups))})"
                    )
        if p.kind == "csv":
            cols = {c for c in (p.columns or []) if c is not None}
            for pt in self.points:
                key = pt.field or pt.name
                if p.columns is not None and key not in cols:
                    raise ValueError(
                        f"point {pt.name!r}: no column {key!r} (columns: {', '.join(sorted(cols))})"
                    )
                if p.columns is None and not key.isdigit():
                    raise ValueError(
                        f"point {pt.name!r}: without 'columns', give 'field' as a column number "
                        "counted from 1"
                    )
            if p.columns is not None and len(cols) != len([c for c in p.columns if c]):
                raise ValueError("two columns with one name")
        if p.kind == "kv" and p.pair_separator == p.key_separator:
            raise ValueError("pair_separator and key_separator must differ")
        if p.kind == "nmea":
            for pt in self.points:
                if not (pt.field or "").isdigit():
                    raise ValueError(
                        f"point {pt.name!r}: give 'field', the number of the field after the "
                        "sentence id (1 = first)"
                    )
        return self

    @property
    def bus(self) -> str:
        """The port: one reader per port."""
        return f"serial:{self.serial_port}"


# -- pure parts --------------------------------------------------------------------------------


class LineAssembler:
    """Cuts received bytes into lines.

    ``feed(data)`` returns ``(lines, errors)``: complete lines without the terminator, and
    a message per over-long line (the bytes of which are dropped up to the next
    terminator). The first partial line after a (re)open is dropped: it may be the tail
    of a line that started before.
    """

    def __init__(self, terminator: bytes, max_line: int) -> None:
        self.terminator = terminator
        self.max_line = max_line
        self.buf = bytearray()
        self.synced = False
        self.discarding = False

    def reset(self) -> None:
        """After reopening the port: drop what was pending and resynchronise."""
        self.buf.clear()
        self.synced = False
        self.discarding = False

    def feed(self, data: bytes) -> tuple[list[bytes], list[str]]:
        self.buf += data
        lines: list[bytes] = []
        errors: list[str] = []
        term = self.terminator
        while True:
            end = self.buf.find(term)
            if end < 0:
                if len(self.buf) > self.max_line and not self.discarding:
                    errors.append(
                        f"line longer than {self.max_line} bytes, dropped: "
                        f"{bytes(self.buf[:60])!r}…"
                    )
                    self.discarding = True
                if self.discarding:
                    self.buf.clear()
                break
            line = bytes(self.buf[:end])
            del self.buf[: end + len(term)]
            if not self.synced:
                self.synced = True  # the first (possibly partial) line
                continue
            if self.discarding:
                self.discarding = False  # the end of the over-long line
                continue
            if term == b"\n" and line.endswith(b"\r"):
                line = line[:-1]
            lines.append(line)
        return lines, errors


def nmea_checksum(body: str) -> int:
    """XOR of the characters between ``$`` (or ``!``) and ``*`` (NMEA 0183 §5.3)."""
    c = 0
    for ch in body.encode("ascii", "replace"):
        c ^= ch
    return c


def parse_fields(text: str, parser: LineParser) -> dict[str, str]:
    """The fields of one line by name (csv: column names or 1-based numbers; kv: keys;
    regex: groups; nmea: 1-based field numbers after the sentence id). Pure.

    Raises:
        LineError: the line does not fit the parser (message with the text).
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
        m = re.search(parser.pattern or "", text)
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


def to_results(fields: dict[str, str], points: Sequence[LinePoint]) -> list[PointResult]:
    """One result per point from the fields of a line; a missing or unreadable field gives
    that point quality ``decode_error``. Pure."""
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
        try:
            number = float(raw) if p.type == "float" else int(raw, 10)
        except ValueError:
            out.append(
                PointResult(
                    p.name, None, "decode_error", f"field {key!r} = {raw!r} is not a {p.type}"
                )
            )
            continue
        if p.scale != 1 or p.offset != 0:
            number = number * p.scale + p.offset
        if p.decimals is not None:
            number = round(float(number), p.decimals)
        out.append(PointResult(p.name, number))
    return out


def parse_line(line: bytes, dev: SerialLineDevice) -> list[PointResult]:
    """Decode and parse one line into one result per point.

    Raises:
        LineError: undecodable bytes, or a line that does not fit the parser.
    """
    try:
        text = line.decode(dev.encoding).strip()
    except UnicodeDecodeError:
        raise LineError(f"not {dev.encoding} text: {line[:80]!r}") from None
    if not text:
        raise LineError("empty line")
    return to_results(parse_fields(text, dev.parser), dev.points)


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
        self.lines = 0
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
        port = PortQueue()
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

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def _stream(self, port: PortQueue) -> None:
        while True:
            data = await port.queue.get()
            if data is None:
                return
            ts = self.now_ms()
            lines, errors = self.asm.feed(data)
            for e in errors:
                self._error(e)
            for line in lines:
                self._handle(line, ts)

    def _handle(self, line: bytes, ts: int) -> bool:
        try:
            results = parse_line(line, self.dev)
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
            while not port.queue.empty():  # drop what came unasked
                if port.queue.get_nowait() is None:
                    return
            self.asm.buf.clear()
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
                        data = await port.queue.get()
                except TimeoutError:
                    continue
                if data is None:
                    return
                lines, errors = self.asm.feed(data)
                for e in errors:
                    self._error(e)
                for line in lines[:1]:
                    answered = True
                    if not self._handle(line, ts):
                        self.sink(d, ts, self._bad("frame_error", f"garbled answer: {line[:80]!r}"))
