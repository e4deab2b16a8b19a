"""The RS-485 line discipline against a scripted line (tests/line_peer.py) on a pty pair:
inter-frame gap and no overlap with a dead device, precise errors for spoilt replies
without losing step, late replies, local echo, ASCII framing, RTU over TCP."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from agent.app import make_bus
from agent.poller import BusPoller
from drivers.base import PointResult
from drivers.modbus.config import ModbusPoint, ModbusRtuDevice, ModbusRtuOverTcpDevice
from drivers.modbus.driver import LineBus, ModbusRtuBus, plan_blocks
from drivers.modbus.line import (
    FrameError,
    SerialLine,
    ascii_frame,
    check_reply,
    crc16,
    min_frame_gap,
    parse_ascii,
)
from tests.line_peer import LinePeer


def rtu_device(port: str, unit: int, **extra: Any) -> ModbusRtuDevice:
    doc = {
        "id": f"u{unit}",
        "driver": "modbus_rtu",
        "serial_port": port,
        "unit_id": unit,
        "points": [{"name": "level", "address": 0}, {"name": "temp", "address": 1}],
    }
    doc.update(extra)
    return ModbusRtuDevice.model_validate(doc)


TWO = plan_blocks([ModbusPoint(name="a", address=0), ModbusPoint(name="b", address=1)])


async def _read(bus: LineBus, unit: int, timeout: float = 0.3) -> list[PointResult]:
    return await bus.read_device(unit, TWO, timeout)


def test_case_016_dead_device_on_the_line_keeps_others_on_time(line: tuple[str, str]) -> None:
    """Four devices at 9600 baud on one line, unit 2 powered off: units 1, 3 and 4 keep
    their 500 ms interval within unit 2's 300 ms timeout; at the line, requests never
    overlap, each starts at least 3.5 character times after the previous reply, and none
    follows unit 2's unanswered request before its timeout ran out."""
    line_end, agent_end = line
    peer = LinePeer(baudrate=9600, registers={u: {0: 100 * u, 1: u} for u in (1, 3, 4)})
    peer.serve_pty(line_end)
    devices = [
        rtu_device(agent_end, u, poll_interval="500ms", timeout="300ms") for u in (1, 2, 3, 4)
    ]
    polls: list[tuple[int, float, list[PointResult]]] = []

    async def run() -> None:
        bus = make_bus(list(devices))
        poller = BusPoller(
            devices[0].bus,
            bus,
            devices,
            lambda d, ts, rs: polls.append((d.unit_id, time.monotonic(), rs)),
        )
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(6.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    peer.stop()
    gap = min_frame_gap(9600)
    assert 0.0036 < gap < 0.0037  # 3.5 characters of 10 bits (8N1) at 9600 baud
    reqs = peer.requests
    assert not any(r.busy for r in reqs), "a request arrived while a reply was on the line"
    for prev, nxt in itertools.pairwise(reqs):
        if prev.t_reply_end is not None:
            assert nxt.t_start - prev.t_reply_end >= gap, (prev, nxt)
        else:  # unit 2 never answers: the line is held for its whole timeout
            assert prev.unit == 2
            assert nxt.t_start - prev.t_start >= 0.3, (prev, nxt)
    # the live units: every poll good, on their interval (+ at most the dead one's timeout)
    for unit in (1, 3, 4):
        mine = [(t, rs) for u, t, rs in polls if u == unit]
        assert len(mine) >= 11, (unit, len(mine))
        assert all(r.quality == "good" for _, rs in mine for r in rs)
        assert {r.value for _, rs in mine for r in rs if r.point == "level"} == {100 * unit}
        times = [t for t, _ in mine]
        spacing = [b - a for a, b in itertools.pairwise(times)]
        assert max(spacing) <= 0.5 + 0.3 + 0.05, spacing
        asked = [r.t_start for r in reqs if r.unit == unit]
        assert max(b - a for a, b in itertools.pairwise(asked)) <= 0.85
    answered = [(p, n) for p, n in itertools.pairwise(reqs) if p.t_reply_end is not None]
    worst = max(
        b - a for u in (1, 3, 4) for a, b in itertools.pairwise([t for v, t, _ in polls if v == u])
    )
    print(
        f"\ncase 016: {len(reqs)} requests in 6 s, none overlapping; smallest gap after a "
        f"reply {min(n.t_start - p.t_reply_end for p, n in answered) * 1000:.2f} ms "
        f"(floor {gap * 1000:.2f} ms); longest interval of a live unit {worst * 1000:.0f} ms "
        f"(500 + 300); unit 2 asked {sum(r.unit == 2 for r in reqs)} times"
    )
    # the dead unit: a bad-quality poll every interval, no values, asked less and less
    dead = [rs for u, _, rs in polls if u == 2]
    assert len(dead) >= 11
    assert all(r.quality == "timeout" and r.value is None for rs in dead for r in rs)
    assert 3 <= sum(r.unit == 2 for r in reqs) <= 6, "backoff after 3 failed polls"
    # request order 1, (2), 3, 4 kept within each cycle
    order = [r.unit for r in reqs if r.unit != 2]
    assert order[:9] == [1, 3, 4] * 3


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("crc", "CRC error in reply from unit 1: frame says"),
        ("byte_count", "byte count 6 in reply from unit 1, expected 4 for 2 registers"),
        ("other_unit", "a frame from unit 2 came instead"),
    ],
)
def test_spoilt_reply_is_a_precise_error_and_the_line_stays_in_step(
    line: tuple[str, str], fault: str, message: str
) -> None:
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 234, 1: 300}, 3: {0: 7, 1: 8}}, faults={1: [fault]})
    peer.serve_pty(line_end)

    async def run() -> list[list[PointResult]]:
        bus = ModbusRtuBus(agent_end, 9600, timeout=0.3)
        assert await bus.connect()
        out = [await _read(bus, u) for u in (1, 3, 1)]
        bus.close()
        return out

    first, other, again = asyncio.run(run())
    peer.stop()
    assert [r.quality for r in first] == ["frame_error", "frame_error"]
    assert all(r.value is None for r in first)
    assert message in (first[0].error or ""), first[0].error
    assert [(r.value, r.quality) for r in other] == [(7, "good"), (8, "good")]
    assert [(r.value, r.quality) for r in again] == [(234, "good"), (300, "good")]


def test_case_019_late_rtu_reply_is_not_taken_for_the_next_request(
    line: tuple[str, str],
) -> None:
    """Unit 1 answers after its timeout; the late frame reaches the agent while it waits
    for unit 3's reply and is thrown away: unit 3 gets its own values, unit 1 its own at
    the next poll. A late reply of another length to the same unit is not taken either:
    the reply that follows it, to the request asked, is."""
    line_end, agent_end = line
    peer = LinePeer(
        registers={1: {0: 0x0140, 1: 1, 10: 0x0BB8}, 3: {0: 7, 1: 8}},
        faults={1: ["late:0.45"]},
    )
    peer.serve_pty(line_end)
    pressure = plan_blocks([ModbusPoint(name="pressure", address=10)])

    async def run() -> list[list[PointResult]]:
        bus = ModbusRtuBus(agent_end, 9600, timeout=0.3)
        assert await bus.connect()
        out = [await _read(bus, 1), await _read(bus, 3), await _read(bus, 1)]
        peer.faults[1] = ["late:0.45"]
        out.append(await _read(bus, 1))
        out.append(await bus.read_device(1, pressure, 0.3))  # the late 2-register reply comes
        out.append(await bus.read_device(1, pressure, 0.3))
        bus.close()
        return out

    late, three, one, late2, after_late, pressure_ok = asyncio.run(run())
    peer.stop()
    assert [r.quality for r in late] == ["timeout", "timeout"]
    assert [r.value for r in three] == [7, 8]
    assert [r.value for r in one] == [0x0140, 1]
    assert [r.quality for r in late2] == ["timeout", "timeout"]
    assert (after_late[0].value, after_late[0].quality) == (3000, "good"), after_late
    assert pressure_ok[0].value == 3000 and pressure_ok[0].quality == "good"


@pytest.mark.parametrize(
    ("echo", "local_echo", "faults", "expect"),
    [
        (True, True, [], "values"),  # run 1
        (True, False, [], "values; received our own request back"),  # run 2
        (False, True, [], "values"),  # run 3: no echo after all, nothing eaten
        (True, True, ["bad_echo"], "values after one retry"),  # run 4
        (True, True, ["bad_echo", "bad_echo"], "echo differs from the request"),
    ],
)
def test_case_036_local_echo(
    line: tuple[str, str],
    echo: bool,
    local_echo: bool,
    faults: list[str],
    expect: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 0x00EA, 1: 0x012C}}, faults={1: list(faults)}, echo=echo)
    peer.serve_pty(line_end)
    points = [
        ModbusPoint(name="level_m", address=0, scale=0.01),
        ModbusPoint(name="water_temp_c", address=1, scale=0.1),
    ]

    async def run() -> list[PointResult]:
        bus = ModbusRtuBus(agent_end, 9600, timeout=0.3, local_echo=local_echo)
        assert await bus.connect()
        results = await bus.read_device(1, plan_blocks(points))
        bus.close()
        return results

    with caplog.at_level(logging.INFO):
        results = asyncio.run(run())
    peer.stop()
    # the request on the wire: 01 03 00 00 00 02 C4 0B
    assert crc16(bytes.fromhex("010300000002")) == bytes.fromhex("C40B")
    if expect.startswith("values"):
        assert [(r.value, r.quality) for r in results] == [(2.34, "good"), (30.0, "good")]
        assert len(peer.requests) == (2 if "retry" in expect else 1)
        if not echo:
            assert "did not echo the request" in caplog.text
        if echo and not local_echo:  # the reply is found after the echo, which is reported
            assert "received our own request back before the reply" in caplog.text
    else:
        assert [r.value for r in results] == [None, None]
        assert all(r.quality == "frame_error" for r in results)
        assert expect in (results[0].error or ""), results[0].error
    if "bad_echo" in faults:
        assert "echo differs from the request (bus collision?)" in caplog.text


def test_ascii_framing(line: tuple[str, str]) -> None:
    line_end, agent_end = line
    peer = LinePeer(framing="ascii", registers={1: {0: 0x077A, 1: 0x429B}})
    peer.serve_pty(line_end)
    points = [ModbusPoint(name="level", address=0, type="float32", byte_order="CDAB")]

    async def run() -> list[PointResult]:
        bus = ModbusRtuBus(agent_end, 9600, timeout=0.5, framing="ascii")
        assert await bus.connect()
        results = await bus.read_device(1, plan_blocks(points))
        bus.close()
        return results

    (r,) = asyncio.run(run())
    peer.stop()
    assert (r.value, r.quality) == (77.51460266113281, "good")
    # the frame of the spec's example (Modbus over Serial Line V1.02, 2.5.2.1 / 6.2.1)
    assert ascii_frame(bytes.fromhex("0103000000 02".replace(" ", ""))) == b":010300000002FA\r\n"
    with pytest.raises(FrameError, match="LRC error"):
        parse_ascii(b":010300000002FB\r\n")
    with pytest.raises(FrameError, match="1 byte"):
        parse_ascii(b"x:010300000002FA\r\n")


def test_rtu_over_tcp_shares_one_converter(tmp_path: Path) -> None:
    """Two units behind a serial device server's raw TCP port: one connection, one
    request at a time, RTU frames with CRC."""
    peer = LinePeer(registers={1: {0: 11, 1: 12}, 2: {0: 21, 1: 22}})
    peer.serve_tcp()
    devices = [
        ModbusRtuOverTcpDevice.model_validate(
            {
                "id": f"d{u}",
                "driver": "modbus_rtu_over_tcp",
                "host": "127.0.0.1",
                "port": peer.port,
                "unit_id": u,
                "frame_gap": "20ms",
                "points": [{"name": "a", "address": 0}, {"name": "b", "address": 1}],
            }
        )
        for u in (1, 2)
    ]

    async def run() -> list[list[PointResult]]:
        bus = make_bus(list(devices))
        assert bus.name == f"rtu+tcp://127.0.0.1:{peer.port}"
        assert await bus.connect()
        out = [await bus.read_device(u, TWO, 0.3) for u in (1, 2, 1)]
        bus.close()
        return out

    results = asyncio.run(run())
    peer.stop()
    assert [[r.value for r in rs] for rs in results] == [[11, 12], [21, 22], [11, 12]]
    reqs = peer.requests
    for prev, nxt in itertools.pairwise(reqs):
        assert prev.t_reply_end is not None
        assert nxt.t_start - prev.t_reply_end >= 0.02, "the configured frame_gap is kept"


def test_refused_bridge_is_remembered(line: tuple[str, str]) -> None:
    """Registers 0 and 2 exist, 1 does not; with max_gap 1 the first poll asks 0..2, gets
    exception 2, reads the points singly, and from then on never bridges again."""
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 5, 2: 6}})
    peer.serve_pty(line_end)
    dev = ModbusRtuDevice.model_validate(
        {
            "id": "d",
            "driver": "modbus_rtu",
            "serial_port": agent_end,
            "poll_interval": "100ms",
            "timeout": "300ms",
            "max_gap": 1,
            "points": [{"name": "a", "address": 0}, {"name": "c", "address": 2}],
        }
    )
    polls: list[list[PointResult]] = []

    async def run() -> None:
        five = asyncio.Event()

        def sink(d: object, ts: int, rs: list[PointResult]) -> None:
            polls.append(rs)
            if len(polls) == 5:
                five.set()

        poller = BusPoller(dev.bus, make_bus([dev]), [dev], sink)
        task = asyncio.create_task(poller.run())
        await asyncio.wait_for(five.wait(), 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    peer.stop()
    assert all(sorted((r.point, r.value) for r in rs) == [("a", 5), ("c", 6)] for rs in polls)
    asked = [(r.address, r.count) for r in peer.requests]
    assert asked[:3] == [(0, 3), (0, 1), (2, 1)]
    assert (0, 3) not in asked[3:]
    assert asked[3:9] == [(0, 1), (2, 1)] * 3


def test_frame_gap_floor_is_checked() -> None:
    with pytest.raises(
        ValueError, match=r"shorter than 3.5 character times at 9600 baud \(3.65ms\)"
    ):
        rtu_device("/dev/ttyUSB0", 1, frame_gap="2ms")
    assert rtu_device("/dev/ttyUSB0", 1, frame_gap="20ms").frame_gap == 0.02
    assert min_frame_gap(115200) == 0.00175
    line = SerialLine("/dev/null", baudrate=9600, frame_gap=None)
    assert line.frame_gap == min_frame_gap(9600)


def test_reply_checks_are_pure() -> None:
    req = bytes.fromhex("010300000002")
    assert check_reply(req, bytes.fromhex("01030400EA012C")) == bytes.fromhex("00EA012C")
    with pytest.raises(FrameError, match="function code 4, asked function code 3"):
        check_reply(req, bytes.fromhex("01040400EA012C"))
    with pytest.raises(FrameError, match="reply from unit 2, asked unit 1"):
        check_reply(req, bytes.fromhex("02030400EA012C"))


def test_pyserial_url_spy(line: tuple[str, str], tmp_path: Path) -> None:
    """A pyserial URL as serial_port: spy:// logs every byte on the line to a file."""
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 0x00EA, 1: 0x012C}})
    peer.serve_pty(line_end)
    trace = tmp_path / "spy.txt"

    async def run() -> list[PointResult]:
        bus = ModbusRtuBus(f"spy://{agent_end}?file={trace}", 9600, timeout=0.3)
        assert await bus.connect(), bus.last_error
        results = await _read(bus, 1)
        bus.close()
        return results

    results = asyncio.run(run())
    peer.stop()
    assert [r.value for r in results] == [0x00EA, 0x012C]
    text = trace.read_text()
    assert "01 03 00 00 00 02 C4 0B" in text.upper(), text


def test_connect_pause_and_per_device_timeout(line: tuple[str, str]) -> None:
    """connect_pause keeps the line quiet after opening; each request waits its own
    device's timeout, not the longest on the bus."""
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 1, 1: 2}})
    peer.serve_pty(line_end)

    async def run() -> tuple[float, float, float]:
        bus = ModbusRtuBus(agent_end, 9600, timeout=1.0, connect_pause=0.25)
        t0 = time.monotonic()
        assert await bus.connect()
        await _read(bus, 1, 1.0)
        first = peer.requests[0].t_start - t0
        t1 = time.monotonic()
        await _read(bus, 9, 0.1)  # nobody: its own 100 ms
        short = time.monotonic() - t1
        t2 = time.monotonic()
        await bus.read_device(9, TWO)  # the bus default: 1 s
        long = time.monotonic() - t2
        bus.close()
        return first, short, long

    first, short, long = asyncio.run(run())
    peer.stop()
    assert first >= 0.25
    assert 0.1 <= short < 0.3
    assert 1.0 <= long < 1.3
