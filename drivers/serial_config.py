"""Config models of text-line sensors on a serial port (``driver: serial_line``); the
reader is :mod:`drivers.serial_line`."""

from __future__ import annotations

import codecs
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from drivers.common import DisplayName, Duration, Name, StrictModel, at_least
from drivers.names import short_repr
from drivers.serial_line import compile_pattern, parse_terminator


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
            rx = compile_pattern(self.pattern)
            if not rx.groupindex:
                raise ValueError("the pattern has no named group (?P<name>…)")
        return self


def _text_encoding(value: str) -> str:
    """``value`` if it names a text encoding known to Python (bytes <-> str, such as
    ``ascii``, ``utf-8``, ``latin-1``); codecs that turn bytes into bytes or str into str
    (``hex``, ``base64``, ``zlib_codec``, ``uu``, ``rot13``) are refused."""
    try:
        info = codecs.lookup(value)
    except (LookupError, ValueError):
        raise ValueError(
            f"no text encoding {short_repr(value)}: use e.g. ascii, utf-8 or latin-1"
        ) from None
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(
            f"{short_repr(value)} is a codec that does not turn bytes into text: use a text "
            "encoding such as ascii, utf-8 or latin-1"
        )
    return value


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
    terminator: Annotated[str, AfterValidator(parse_terminator)] = Field(
        default="\n",
        description="Line end: 1 to 8 ASCII characters ('\\n', '\\r\\n', ';') or a "
        "control character by its ASCII name (ETX, CR, LF, CRLF, EOT, NUL, …)",
    )
    max_line: int = Field(default=512, ge=8, le=65536, description="Longest line, bytes")
    encoding: Annotated[str, AfterValidator(_text_encoding)] = Field(
        default="ascii", description="Text encoding of the lines (Python codec name)"
    )
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
        if self.request is not None:
            try:
                self.request.encode(self.encoding)
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"request {short_repr(self.request)}: character {exc.start + 1} "
                    f"(U+{ord(self.request[exc.start]):04X}) cannot be written in "
                    f"{self.encoding}; change the request or the encoding"
                ) from None
        names = [p.name for p in self.points]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"point name(s) used twice: {', '.join(dup)}")
        p = self.parser
        if p.kind == "regex":
            groups = set(compile_pattern(p.pattern or "").groupindex)
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
        marks = {
            "csv": {"delimiter": p.delimiter},
            "kv": {"pair_separator": p.pair_separator, "key_separator": p.key_separator},
            "nmea": {"'$'": "$", "'!'": "!", "','": ",", "'*'": "*"},
        }.get(p.kind, {})
        for what, mark in marks.items():
            if self.terminator in mark:
                raise ValueError(
                    f"terminator {self.terminator!r} would end a line at every "
                    f"{what} ({mark!r}) of the {p.kind} parser: choose another terminator"
                )
        if p.kind == "nmea":
            for pt in self.points:
                if not (pt.field or "").isdigit():
                    raise ValueError(
                        f"point {pt.name!r}: give 'field', the number of the field after the "
                        "sentence id (1 = first)"
                    )
        return self

    __plain_computed__: ClassVar[tuple[str, ...]] = ("bus",)

    @property
    def bus(self) -> str:
        """The port: one reader per port."""
        return f"serial:{self.serial_port}"


# -- pure parts --------------------------------------------------------------------------------
