"""Text-line serial sensors: parsers (CSV, key=value, regex, NMEA), line assembly, and
the reader over a real pseudo-terminal (stream and request/response, garbage, a port
that vanishes and returns)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from drivers.base import PointResult
from drivers.serial_config import SerialLineDevice
from drivers.serial_io import PortQueue, char_time
from drivers.serial_line import (
    MATCH_SHARE,
    MATCH_TIMEOUT_S,
    LineAssembler,
    LineError,
    MatchTimeout,
    SerialLineReader,
    nmea_checksum,
    parse_line,
)
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    Subscriber,
    assert_all_delivered,
    start_line,
    wait_until,
    write_config,
)


def device(parser: dict[str, Any], points: list[dict[str, Any]], **kw: Any) -> SerialLineDevice:
    doc = {
        "driver": "serial_line",
        "id": "s",
        "serial_port": "/dev/null",
        "parser": parser,
        "points": points,
    }
    doc.update(kw)
    return SerialLineDevice.model_validate(doc)


def values(results: list[PointResult]) -> dict[str, Any]:
    return {r.point: (r.value if r.quality == "good" else r.quality) for r in results}


def test_line_assembler() -> None:
    asm = LineAssembler(b"\r\n", max_line=16)
    assert asm.feed(b"tail of an old line\r\nlev") == ([], [])  # first partial line dropped
    assert asm.feed(b"el=1.2") == ([], [])  # partial lines across reads are joined
    assert asm.feed(b"5\r\nlevel=1.3\r\n") == ([b"level=1.25", b"level=1.3"], [])
    lines, errors = asm.feed(b"x" * 40)
    assert lines == [] and errors and "longer than 16 bytes" in errors[0]
    assert asm.feed(b"yyy\r\nok=1\r\n") == ([b"ok=1"], []), (
        "the over-long line ends at its terminator"
    )


@pytest.mark.parametrize(
    ("terminator", "stream", "lines"),
    [
        (";", b"x;L=1;L=2;L=", [b"L=1", b"L=2"]),
        ("ETX", b"\x02old\x03\x02L=1\x03\x02L=2\x03", [b"\x02L=1", b"\x02L=2"]),
        ("EOT", b"a\x04L=1\x04", [b"L=1"]),
        ("CRLF", b"a\r\nL=1\rX\r\nL=2\r\n", [b"L=1\rX", b"L=2"]),
        ("CR", b"a\rL=1\r", [b"L=1"]),
        ("LF", b"a\nL=1\r\n", [b"L=1"]),
        ("NUL", b"a\x00L=1\x00", [b"L=1"]),
        ("\r\n", b"a\r\nL=1\r\n", [b"L=1"]),
        ("<END>", b"a<END>L=1<EN<END>L=2<END>", [b"L=1<EN", b"L=2"]),
        ("12345678", b"a12345678L=112345678", [b"L=1"]),
    ],
)
def test_terminator_is_any_short_text_or_a_control_character_by_name(
    terminator: str, stream: bytes, lines: list[bytes]
) -> None:
    dev = device({"kind": "kv", "pair_separator": "&"}, [{"name": "L"}], terminator=terminator)
    term = dev.terminator.encode()
    for cut in range(1, len(stream) + 1):  # every way the stream can fall into two reads
        asm = LineAssembler(term, dev.max_line)
        got = asm.feed(stream[:cut])[0] + asm.feed(stream[cut:])[0]
        assert got == lines, (cut, got)
    assert values(parse_line(lines[-1], dev)) == {"L": float(lines[-1][-1:])}


@pytest.mark.parametrize(
    ("terminator", "message"),
    [
        ("", "needs a terminator"),
        ("etx", "in capitals (ETX)"),
        ("\\r\\n", "backslash escape"),
        ("123456789", "at most 8"),
        ("\u00a7", "not ASCII"),
    ],
)
def test_bad_terminators_are_refused(terminator: str, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        device({"kind": "kv"}, [{"name": "L"}], terminator=terminator)


@pytest.mark.parametrize(
    ("parser", "points", "terminator"),
    [
        ({"kind": "csv", "delimiter": ";"}, [{"name": "a", "field": "1"}], ";"),
        ({"kind": "kv"}, [{"name": "a"}], ","),
        ({"kind": "kv", "key_separator": ":"}, [{"name": "a"}], ":"),
        ({"kind": "nmea"}, [{"name": "a", "field": "1"}], "*"),
    ],
)
def test_a_terminator_that_is_also_a_separator_is_refused(
    parser: dict[str, Any], points: list[dict[str, Any]], terminator: str
) -> None:
    with pytest.raises(ValidationError, match="would end a line at every"):
        device(parser, points, terminator=terminator)


def test_validate_names_the_line_of_a_bad_terminator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from agent.cli import EX_CONFIG, main

    monkeypatch.chdir(tmp_path)
    Path("agent.yaml").write_text(
        "gateway_id: gw\nstate_dir: state\nmqtt: {host: 127.0.0.1}\ndevices:\n"
        "  - id: s\n    driver: serial_line\n    serial_port: /dev/ttyUSB0\n"
        "    terminator: '\\r\\n'\n"
        "    parser: {kind: kv}\n    points: [{name: L}]\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["validate", "agent.yaml"])
    lines = result.output.splitlines()
    assert result.exit_code == EX_CONFIG, result.output
    assert lines[0].startswith("agent.yaml:8:17: devices[0].terminator: "), lines
    assert "CRLF" in lines[0]


@pytest.mark.parametrize("quiet", [False, True])
@pytest.mark.parametrize("cut", [None, 1, 33, 60])
def test_a_line_over_max_line_is_dropped_however_it_arrives(quiet: bool, cut: int | None) -> None:
    """A 60-byte line with ``max_line`` 32, in one read or two, as the first line after
    a quiet open or later: dropped and counted, never more than 32 + a terminator held."""
    long = b"9" * 60 + b"\n"
    asm = LineAssembler(b"\n", max_line=32)
    asm.reset()
    stream = (b"" if quiet else b"\n") + long + b"1.5\n"
    if quiet:
        asm.quiet_start()
    reads = [stream] if cut is None else [stream[: cut + (not quiet)], stream[cut + (not quiet) :]]
    got: list[bytes] = []
    errors: list[str] = []
    for data in reads:
        lines, errs = asm.feed(data)
        got += lines
        errors += errs
        assert len(asm.buf) <= asm.hold == 33
    assert got == [b"1.5"]
    assert asm.too_long == 1 and len(errors) == 1 and "longer than 32" in errors[0], errors
    assert asm.partial == (0 if quiet else 1)


def test_the_first_line_is_kept_only_after_a_quiet_start() -> None:
    asm = LineAssembler(b";", max_line=16)
    assert asm.feed(b"L=1;L=2;") == ([b"L=2"], []) and asm.partial == 1
    asm.reset()
    asm.quiet_start()
    assert asm.feed(b"L=3;L=4;") == ([b"L=3", b"L=4"], []) and asm.partial == 1
    asm.resync()  # bytes were lost: the line in progress is incomplete
    assert asm.feed(b"=5;L=6;") == ([b"L=6"], []) and asm.partial == 2


@pytest.mark.parametrize(
    ("baud", "fmt", "seconds"),
    [
        (9600, (8, "N", 1), 10 / 9600),
        (9600, (8, "E", 1), 11 / 9600),
        (1200, (7, "E", 2), 11 / 1200),
    ],
)
def test_char_time(baud: int, fmt: tuple[int, str, int], seconds: float) -> None:
    assert char_time(baud, *fmt) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("opened", "silent", "first", "count", "char_s", "quiet"),
    [
        (0.0, True, 0.300, 4, 10 / 9600, True),  # a line 0.3 s after opening
        (0.0, False, 0.300, 4, 10 / 9600, False),  # read before the opening's timer ran
        (0.0, True, 0.016, 16, 10 / 9600, False),  # 16 bytes held back 16 ms by an adapter
        (0.0, True, 0.050, 60, 10 / 9600, False),  # 60 bytes took 62 ms: under way at open
        (0.0, True, 0.070, 60, 10 / 9600, True),  # ... began 7.5 ms after opening
        (0.0, True, 0.004, 1, 10 / 115200, False),  # below the 5 ms floor
        (0.0, True, 0.006, 1, 10 / 115200, True),
        (0.0, True, 0.060, 1, 10 / 300, False),  # at 300 baud a character is 33 ms
        (0.0, True, 0.080, 1, 10 / 300, True),
        (None, True, 0.5, 1, 10 / 9600, False),  # opening time unknown
        (0.0, True, None, 0, 10 / 9600, False),  # nothing read yet
        (0.0, True, 0.300, 4, None, False),  # character time unknown
    ],
)
def test_quiet_before_first_byte(
    opened: float | None,
    silent: bool,
    first: float | None,
    count: int,
    char_s: float | None,
    quiet: bool,
) -> None:
    port = PortQueue(char_s=char_s)
    port.opened_at, port.silent, port.first_at, port.first_len = opened, silent, first, count
    assert port.quiet_before_first() is quiet


@pytest.mark.parametrize(("waiting", "silent"), [(0, True), (3, False), (None, False)])
def test_the_opening_timer_counts_bytes_a_polled_port_has_not_handed_over(
    waiting: int | None, silent: bool
) -> None:
    """A polled port (``rfc2217://``) reads in a task that may run after the timer: bytes
    waiting in it are no silence; a port that fails to say (closed) is none either."""

    class Port:  # stands for pyserial's port object, to inject the states
        @property
        def in_waiting(self) -> int:
            if waiting is None:
                raise OSError("port closed")
            return waiting

    class Transport(asyncio.Transport):
        sync_serial = Port()

    async def main() -> PortQueue:
        port = PortQueue(char_s=10 / 115200)
        port.connection_made(Transport())
        await asyncio.sleep(0.02)
        return port

    port = asyncio.run(main())
    assert port.silent is silent


def test_csv_columns() -> None:
    dev = device(
        {"kind": "csv", "columns": ["time", "level", None, "temp"]},
        [{"name": "level", "scale": 0.01, "decimals": 2}, {"name": "temp"}],
    )
    assert values(parse_line(b"12:00:01,123,x,21.5", dev)) == {"level": 1.23, "temp": 21.5}
    with pytest.raises(LineError, match="3 columns, expected 4"):
        parse_line(b"1,2,3", dev)
    numbered = device(
        {"kind": "csv", "delimiter": ";"}, [{"name": "v", "field": "2", "type": "int"}]
    )
    assert values(parse_line(b"a;42", numbered)) == {"v": 42}
    assert values(parse_line(b"a;4x2", numbered)) == {"v": "decode_error"}


def test_key_value_pairs() -> None:
    dev = device(
        {"kind": "kv"}, [{"name": "level", "field": "LVL"}, {"name": "rain", "field": "R"}]
    )
    assert values(parse_line(b"LVL=0.412, R=12.5", dev)) == {"level": 0.412, "rain": 12.5}
    assert values(parse_line(b"LVL=0.4", dev)) == {"level": 0.4, "rain": "decode_error"}
    with pytest.raises(LineError, match="is not key=value"):
        parse_line(b"LVL 0.4", dev)


def test_regex_groups() -> None:
    dev = device(
        {"kind": "regex", "pattern": r"CH4\s+(?P<ch4>[\d.]+)%LEL\s+T(?P<t>-?\d+)"},
        [{"name": "methane", "field": "ch4"}, {"name": "t", "type": "int"}],
    )
    assert values(parse_line(b"CH4 12.5%LEL T-3", dev)) == {"methane": 12.5, "t": -3}
    with pytest.raises(LineError, match="does not match"):
        parse_line(b"hello", dev)
    with pytest.raises(ValidationError, match="has no group 'x'"):
        device({"kind": "regex", "pattern": "(?P<a>.)"}, [{"name": "x"}])


EVIL = r"^(?P<tag>(\w|\w\w)+)=(?P<level>[-0-9.]+)$"
"""A pattern that reads ``level=2.5`` but backtracks without end (in ``re`` as in
``regex``) on a long word not followed by ``=``: the word can be cut into one- and
two-character pieces in exponentially many ways."""
EVIL_LINE = b"1" * 40 + b"!=1"


def test_a_backtracking_pattern_costs_a_line_error_in_bounded_time() -> None:
    dev = device({"kind": "regex", "pattern": EVIL}, [{"name": "level"}])
    assert values(parse_line(b"level=2.5", dev)) == {"level": 2.5}
    t = time.perf_counter()
    with pytest.raises(MatchTimeout, match="took over 50 ms"):
        parse_line(EVIL_LINE, dev)
    took = time.perf_counter() - t
    # the matcher's clock is not ours: its 50 ms may end a fraction of a ms early on ours
    assert MATCH_TIMEOUT_S - 0.005 <= took < MATCH_TIMEOUT_S + 0.1, took
    with pytest.raises(MatchTimeout):
        parse_line(EVIL_LINE, dev, timeout=0.005)


@pytest.mark.parametrize(
    ("pattern", "line"),
    [
        (r"CH4\s+(?P<ch4>[\d.]+)%LEL\s+T(?P<t>-?\d+)", "xx CH4 12.5%LEL T-3 yy"),
        (r"RAIN (?P<mm>[0-9.]+)mm", "RAIN 1.5mm RAIN 2.5mm"),
        (r"(?P<a>a*?)(?P<b>b+)?$", "aaab"),
        (r"(?i)level[:=]\s*(?P<v>\S+)", "LEVEL: 4.2 m"),
        (r"^(?P<x>\w+)(?:,(?P<y>[^,]*))?", "ü1,,3"),
        (r"(?P<v>(?:\d{1,3}(?:\.\d+)?))(?=\s*m\b)", "depth 12.75 m"),
        (r"(?P<q>(?P<r>x)|y)", "y"),
    ],
)
def test_regex_parser_keeps_the_results_of_python_re(pattern: str, line: str) -> None:
    groups = re.compile(pattern).groupindex
    dev = device({"kind": "regex", "pattern": pattern}, [{"name": n} for n in groups])
    from drivers.serial_line import parse_fields

    m = re.search(pattern, line)
    assert m is not None
    expected = {k: v for k, v in m.groupdict().items() if v is not None}
    assert parse_fields(line, dev.parser) == expected


def test_nmea_checksum() -> None:
    body = "WIXDR,C,21.5,C,T1,P,1.0132,B,P1"
    line = f"${body}*{nmea_checksum(body):02X}".encode()
    dev = device(
        {"kind": "nmea", "sentence": "WIXDR"},
        [{"name": "temp", "field": "2"}, {"name": "pressure", "field": "6"}],
    )
    assert values(parse_line(line, dev)) == {"temp": 21.5, "pressure": 1.0132}
    bad = line[:-2] + (b"00" if not line.endswith(b"00") else b"01")
    with pytest.raises(LineError, match="NMEA checksum error"):
        parse_line(bad, dev)
    with pytest.raises(LineError, match="without checksum"):
        parse_line(f"${body}".encode(), dev)
    # the GPGGA example of the NMEA 0183 standard's checksum rule
    assert nmea_checksum("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,") == 0x47


def pty_writer(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NOCTTY)


def run_reader(
    dev: SerialLineDevice, seconds: float, during: Any = None
) -> tuple[list[tuple[int, list[PointResult]]], SerialLineReader]:
    got: list[tuple[int, list[PointResult]]] = []

    async def main() -> SerialLineReader:
        reader = SerialLineReader(
            dev, lambda d, ts, rs: got.append((ts, rs)), lambda: time.time_ns() // 1_000_000
        )
        task = asyncio.create_task(reader.run())
        if during is not None:
            await asyncio.get_running_loop().run_in_executor(None, during)
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return reader

    reader = asyncio.run(main())
    return got, reader


def test_stream_over_a_pty_with_garbage_and_split_writes(tmp_path: Path) -> None:
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    proc = start_line(a, b)
    dev = device(
        {"kind": "kv"}, [{"name": "level", "field": "L"}], serial_port=b, terminator="\r\n"
    )

    def sensor() -> None:
        time.sleep(0.3)
        fd = pty_writer(a)
        for chunk in (
            b"L=0.10\r\n",  # the first line after a quiet open: kept
            b"L=0.2",
            b"0\r\nL=0.30\r\n",
            b"\xff\xfe\x00garbage\r\n",
            b"L=0.40\r\n",
        ):
            os.write(fd, chunk)
            time.sleep(0.05)
        os.close(fd)

    got, reader = run_reader(dev, 0.5, sensor)
    proc.terminate()
    proc.wait(5)
    assert [values(rs)["level"] for _, rs in got] == [0.1, 0.2, 0.3, 0.4]
    assert reader.errors == 1, "the garbage line is counted, not fatal"


def test_request_response_with_timeout(tmp_path: Path) -> None:
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    proc = start_line(a, b)
    dev = device(
        {"kind": "csv", "columns": ["id", "level"]},
        [{"name": "level"}],
        serial_port=b,
        request="R\r\n",
        poll_interval="200ms",
        timeout="100ms",
        terminator="\r\n",
    )
    answers = iter([b"7,1.5\r\n", None, b"7,1.7\r\n", b"junk\r\n"])
    stop = threading.Event()

    def sensor() -> None:
        fd = pty_writer(a)
        buf = b""
        while not stop.is_set():
            try:
                buf += os.read(fd, 64)
            except OSError:
                return
            while b"R\r\n" in buf:
                buf = buf.split(b"R\r\n", 1)[1]
                ans = next(answers, b"7,1.9\r\n")
                if ans is not None:
                    os.write(fd, ans)

    t = threading.Thread(target=sensor, daemon=True)
    t.start()
    got, _ = run_reader(dev, 1.0)
    stop.set()
    proc.terminate()
    proc.wait(5)
    seen = [values(rs)["level"] for _, rs in got]
    assert seen[:4] == [1.5, "timeout", 1.7, "frame_error"], seen
    assert all(v == 1.9 for v in seen[4:])


def sensor_writes(path: str, *reads: bytes, quiet: float = 0.3, gap: float = 0.05) -> Any:
    """A sensor at ``path`` that stays silent ``quiet`` seconds (the reader opens its end
    meanwhile), then writes each of ``reads`` in one write, ``gap`` seconds apart."""

    def sensor() -> None:
        time.sleep(quiet)
        fd = pty_writer(path)
        for data in reads:
            os.write(fd, data)
            time.sleep(gap)
        os.close(fd)

    return sensor


def test_acceptance_a_60_byte_line_in_one_write_with_max_line_32_is_dropped_and_counted(
    tmp_path: Path,
) -> None:
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    proc = start_line(a, b)
    dev = device({"kind": "csv"}, [{"name": "v", "field": "1"}], serial_port=b, max_line=32)
    garbage = b"9" * 60 + b"\n"  # a 60-digit number: would be a "good" 1e60
    got, reader = run_reader(
        dev, 0.4, sensor_writes(a, garbage, b"1.5\n", b"2.5\n" + garbage + b"3.5\n")
    )
    proc.terminate()
    proc.wait(5)
    assert [values(rs)["v"] for _, rs in got] == [1.5, 2.5, 3.5]
    assert reader.asm.too_long == 2 == reader.errors, "both dropped and counted"


def test_acceptance_semicolon_and_etx_ended_records_parse(tmp_path: Path) -> None:
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    proc = start_line(a, b)
    kv = {"kind": "kv", "pair_separator": " "}
    points = [{"name": "level", "field": "L"}, {"name": "temp", "field": "T"}]
    dev = device(kv, points, serial_port=b, terminator=";")
    got, reader = run_reader(dev, 0.4, sensor_writes(a, b"L=0.41 T=12;L=0.42 T=12.5;L=0.4", b"3;"))
    assert [values(rs) for _, rs in got] == [
        {"level": 0.41, "temp": 12.0},
        {"level": 0.42, "temp": 12.5},
        {"level": 0.43, "temp": "decode_error"},
    ]
    assert reader.errors == 0
    dev = device(kv, points, serial_port=b, terminator="ETX")
    got, reader = run_reader(dev, 0.4, sensor_writes(a, b"\x02L=1 T=2\x03\x02L=", b"3 T=4\x03"))
    proc.terminate()
    proc.wait(5)
    assert [values(rs) for _, rs in got] == [
        {"level": 1.0, "temp": 2.0},
        {"level": 3.0, "temp": 4.0},
    ]


def test_acceptance_the_first_line_after_a_quiet_open_is_published(tmp_path: Path) -> None:
    """At start and after a replug, the sensor's first line (the port silent before it)
    is a reading: none is lost."""
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    state: dict[str, Any] = {"proc": start_line(a, b)}
    dev = device({"kind": "kv"}, [{"name": "level", "field": "L"}], serial_port=b)

    def sensor() -> None:
        sensor_writes(a, b"L=1\n")()
        state["proc"].terminate()  # the adapter is pulled ...
        state["proc"].wait(5)
        time.sleep(1.2)
        state["proc"] = start_line(a, b)  # ... and plugged back: reopened within a second
        sensor_writes(a, b"L=2\n", quiet=1.5)()

    got, reader = run_reader(dev, 0.3, sensor)
    state["proc"].terminate()
    state["proc"].wait(5)
    assert [values(rs)["level"] for _, rs in got] == [1.0, 2.0]
    assert reader.errors == 0 and reader.in_progress == 0


STREAMER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
print("streaming", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:  # one line, a byte a millisecond
    os.write(fd, b"5")
    time.sleep(0.001)
os.write(fd, b"\\n")
time.sleep(0.2)
os.write(fd, b"7\\n")
time.sleep(0.2)
"""


def test_acceptance_a_line_in_progress_at_open_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The port opens while a line is arriving (a byte a millisecond, faster than the
    300 baud the device is set to, whose character time is 33 ms): its tail, which alone
    would read as a number, is dropped and said so; the next line is read."""
    import subprocess
    import sys

    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    proc = start_line(a, b)
    dev = device(
        {"kind": "csv"}, [{"name": "v", "field": "1"}], serial_port=b, baudrate=300, max_line=4096
    )
    streamer = subprocess.Popen(
        [sys.executable, "-c", STREAMER, a, "1.0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert streamer.stdout is not None and streamer.stdout.readline() == "streaming\n"
        time.sleep(0.3)  # the line is under way
        with caplog.at_level(logging.INFO, logger="drivers.serial_line"):
            got, reader = run_reader(dev, 1.5)
        assert streamer.wait(5) == 0
    finally:
        streamer.kill()
        proc.terminate()
        proc.wait(5)
    assert [values(rs)["v"] for _, rs in got] == [7.0]
    assert reader.in_progress == 1 and reader.errors == 0
    assert any("already arriving when" in r.getMessage() for r in caplog.records)


def test_a_burst_of_backtracking_lines_leaves_the_event_loop_its_turns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """200 lines on which the pattern backtracks without end, in one read: the loop's
    other tasks keep their turns (a ticker every 10 ms), the pattern's time is bounded by
    its share, the first line is logged (once), and a good line afterwards is read."""
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    proc = start_line(a, b)
    dev = device(
        {"kind": "regex", "pattern": EVIL}, [{"name": "level"}], serial_port=b, baudrate=115200
    )
    got: list[Any] = []
    ticks: list[float] = []

    async def main() -> tuple[SerialLineReader, float]:
        reader = SerialLineReader(dev, lambda d, ts, rs: got.append(rs), lambda: 0)
        task = asyncio.create_task(reader.run())
        await asyncio.sleep(0.3)
        fd = pty_writer(a)
        os.write(fd, (EVIL_LINE + b"\n") * 200)  # after a quiet open: 200 whole lines
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)
        os.write(fd, b"level=2.5\n")
        os.close(fd)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return reader, time.monotonic() - t0

    with caplog.at_level(logging.WARNING, logger="drivers.serial_line"):
        reader, elapsed = asyncio.run(main())
    proc.terminate()
    proc.wait(5)
    worst = max(b - a for a, b in itertools.pairwise(ticks))
    print(
        f"\nlongest loop stall {worst * 1000:.0f} ms; {reader.match_timeouts} line(s) timed "
        f"out, {reader.unmatched} dropped unmatched"
    )
    assert worst < MATCH_TIMEOUT_S + 0.1, f"the loop stood still for {worst:.3f} s"
    assert [values(rs) for rs in got] == [{"level": 2.5}], "the good line afterwards"
    assert reader.match_timeouts + reader.unmatched == 200 == reader.errors
    # the pattern's time: a full budget, then its share of the time passing
    spent = reader.match_timeouts * MATCH_TIMEOUT_S
    assert spent <= MATCH_TIMEOUT_S + MATCH_SHARE * elapsed + MATCH_TIMEOUT_S, spent
    errors = [r.getMessage() for r in caplog.records if "parse error" in r.getMessage()]
    assert len(errors) == 1 and "took over 50 ms" in errors[0], errors
    summary = [r.getMessage() for r in caplog.records if "line(s) dropped" in r.getMessage()]
    assert summary and f"{reader.match_timeouts} over the pattern's time limit" in summary[0]


def test_case_021_line_sensor_port_replugged(tmp_path: Path) -> None:
    """The USB adapter of a text-line sensor is pulled and plugged back under the same
    name: reading resumes without a restart."""
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    proc = start_line(a, b)
    dev = device({"kind": "kv"}, [{"name": "level", "field": "L"}], serial_port=b)
    state: dict[str, Any] = {"proc": proc}

    def sensor() -> None:
        for value, replug in ((1, False), (2, False), (3, True), (4, False), (5, False)):
            if replug:
                state["proc"].terminate()
                state["proc"].wait(5)
                time.sleep(1.5)
                state["proc"] = start_line(a, b)
                time.sleep(1.5)  # the reader reopens within a second
            fd = pty_writer(a)
            os.write(fd, f"L={value}\n".encode() * 2)
            os.close(fd)
            time.sleep(0.3)

    got, _ = run_reader(dev, 0.5, sensor)
    state["proc"].terminate()
    state["proc"].wait(5)
    seen = [values(rs)["level"] for _, rs in got]
    assert 1 in seen or 2 in seen
    assert 5.0 in seen, seen


def test_agent_publishes_a_line_sensor(tmp_path: Path, broker: Mosquitto) -> None:
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent-tty")
    proc = start_line(a, b)
    devices = (
        f"  - id: rain-1\n    driver: serial_line\n    serial_port: {b}\n"
        "    parser: {kind: regex, pattern: 'RAIN (?P<mm>[0-9.]+)mm'}\n"
        "    points: [{name: rain, field: mm, unit: mm}]\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    stop = threading.Event()

    def sensor() -> None:
        fd = pty_writer(a)
        i = 0
        while not stop.is_set():
            os.write(fd, f"RAIN {i / 10:.1f}mm\n".encode())
            i += 1
            time.sleep(0.1)
        os.close(fd)

    threading.Thread(target=sensor, daemon=True).start()
    wait_until(lambda: len(sub.telemetry()) >= 5, 15, "line readings")
    stop.set()
    assert agent.stop() == 0, agent.log()
    proc.terminate()
    proc.wait(5)
    assert_all_delivered(sub, tmp_path / "state")
    doc = sub.telemetry()[-1].json()
    assert doc["device"] == "rain-1" and doc["points"]["rain"]["unit"] == "mm"
    assert doc["points"]["rain"]["quality"] == "good"


def test_parser_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="no column 'lvl'"):
        device({"kind": "csv", "columns": ["a", "level"]}, [{"name": "x", "field": "lvl"}])
    with pytest.raises(ValidationError, match="column number"):
        device({"kind": "csv"}, [{"name": "level"}])
    with pytest.raises(ValidationError, match="two columns with one name"):
        device({"kind": "csv", "columns": ["a", "a"]}, [{"name": "a"}])
    with pytest.raises(ValidationError, match="must differ"):
        device({"kind": "kv", "pair_separator": "=", "key_separator": "="}, [{"name": "a"}])
