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
from drivers.serial_line import (
    MATCH_SHARE,
    MATCH_TIMEOUT_S,
    LineAssembler,
    LineError,
    MatchTimeout,
    SerialLineDevice,
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
    assert MATCH_TIMEOUT_S <= took < MATCH_TIMEOUT_S + 0.1, took
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
            b"=0.10\r\n",
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
    assert [values(rs)["level"] for _, rs in got] == [0.2, 0.3, 0.4]
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


def test_a_burst_of_backtracking_lines_leaves_the_event_loop_its_turns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """200 lines on which the pattern backtracks without end, in one read: the loop's
    other tasks keep their turns (a ticker every 10 ms), the pattern's time is bounded by
    its share, the first line is logged (once), and a good line afterwards is read."""
    a, b = str(tmp_path / "sensor"), str(tmp_path / "agent")
    proc = start_line(a, b)
    dev = device({"kind": "regex", "pattern": EVIL}, [{"name": "level"}], serial_port=b)
    got: list[Any] = []
    ticks: list[float] = []

    async def main() -> tuple[SerialLineReader, float]:
        reader = SerialLineReader(dev, lambda d, ts, rs: got.append(rs), lambda: 0)
        task = asyncio.create_task(reader.run())
        await asyncio.sleep(0.3)
        fd = pty_writer(a)
        os.write(fd, b"\n" + (EVIL_LINE + b"\n") * 200)
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
