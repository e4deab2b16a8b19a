"""Resynchronisation on a noisy line and retries within a poll: the reply to the request
found inside stray bytes (and only that reply), a bad CRC still refused, a corrupted reply
retried, and the per-bus counters that show it, in the driver, in ``read`` and in the
agent's health."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.app import make_bus
from agent.cli import main
from agent.poller import BusPoller
from drivers.base import PointResult
from drivers.modbus.config import ModbusRtuDevice, ModbusRtuOverTcpDevice, ModbusTcpDevice
from drivers.modbus.driver import RetryBudget, plan_blocks
from drivers.modbus.line import (
    ascii_frame,
    crc16,
    find_ascii_reply,
    find_reply,
    read_pdu,
    reply_size,
    write_pdu,
)
from tests.helpers import AgentProcess, Mosquitto, Subscriber, wait_until, write_config
from tests.line_peer import LinePeer

READ = bytes([1]) + read_pdu("holding", 0, 2)  # unit 1, FC 3, 2 registers
REPLY = bytes.fromhex("01030400EA012C")
WIRE = REPLY + crc16(REPLY)
EXC = bytes.fromhex("018302")
WRITE = bytes([1]) + write_pdu("holding", 10, [7])  # unit 1, FC 6, register 10 = 7


def rtu(adu: bytes) -> bytes:
    return adu + crc16(adu)


# -- the search, pure -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "buf", "at", "length"),
    [
        (READ, WIRE, 0, 9),  # the healthy path
        (READ, b"\x00" + WIRE, 1, 9),  # one stray byte (an adapter switching direction)
        (READ, b"\xff\x00\xfe" + WIRE, 3, 9),
        (READ, b"\x01" + WIRE, 1, 9),  # a stray byte equal to the unit id
        (READ, b"\x01\x03" + WIRE, 2, 9),  # stray bytes that look like the head
        (READ, b"\x01\x03\x04" + WIRE, 3, 9),  # a head with the right byte count
        (READ, WIRE + b"\x00\x00", 0, 9),  # bytes after the reply are left
        (READ, b"\x00" + rtu(EXC), 1, 5),  # an exception reply to this request
        (READ, rtu(bytes.fromhex("02030400EA012C")) + WIRE, 9, 9),  # another unit's first
        (READ, rtu(bytes.fromhex("02030400EA012C")), -1, 0),  # another unit only
        (READ, rtu(bytes.fromhex("01040400EA012C")), -1, 0),  # another function code
        (READ, rtu(bytes.fromhex("010302012C")), -1, 0),  # another byte count (late reply)
        (READ, rtu(bytes.fromhex("018402")), -1, 0),  # the exception of another code
        (READ, b"\x00" + WIRE[:-1] + bytes([WIRE[-1] ^ 0xFF]), -1, 0),  # a bad CRC
        (READ, b"\x00" + WIRE[:-1], -1, 0),  # not all of it yet
        (READ, b"", -1, 0),
        (WRITE, b"\x00" + rtu(WRITE), 1, 8),  # a write's echo
        (WRITE, b"\x00" + rtu(bytes([1]) + write_pdu("holding", 10, [8])), -1, 0),
        (WRITE, b"\x00" + rtu(bytes([1]) + write_pdu("holding", 11, [7])), -1, 0),
    ],
)
def test_find_reply(request_: bytes, buf: bytes, at: int, length: int) -> None:
    found = find_reply(request_, buf)
    assert (found.at, found.length) == (at, length), found
    if at >= 0:
        assert found.at + found.length <= len(buf)


def test_find_reply_says_where_to_go_on() -> None:
    """Offsets ruled out are not looked at again; a frame still arriving is."""
    buf = b"\x00\x00" + WIRE[:4]
    first = find_reply(READ, buf)
    assert (first.at, first.resume) == (-1, 2)
    later = find_reply(READ, buf + WIRE[4:], first.resume)
    assert (later.at, later.length) == (2, 9)
    assert find_reply(READ, b"\x00" * 50).resume == 50


def test_find_reply_in_a_flood_is_bounded() -> None:
    """4 KB of heads that all look like the reply to a 125-register read (each needs a
    CRC once whole): a few tens of milliseconds at most, and nothing found."""
    big = bytes([1]) + read_pdu("holding", 0, 125)
    assert reply_size(big) == 255
    buf = bytes([1, 3, 250]) * 1365
    t = time.perf_counter()
    assert find_reply(big, buf).at == -1
    assert time.perf_counter() - t < 0.5


@pytest.mark.parametrize(
    ("buf", "found"),
    [
        (ascii_frame(REPLY), REPLY),
        (b"\x00" + ascii_frame(REPLY), REPLY),
        (b"noise\r\n" + ascii_frame(REPLY), REPLY),
        (b"x:01\r\n" + ascii_frame(REPLY), REPLY),
        (ascii_frame(bytes.fromhex("02030400EA012C")) + ascii_frame(REPLY), REPLY),
        (ascii_frame(bytes.fromhex("02030400EA012C")), None),
        (ascii_frame(REPLY).replace(b"2C", b"2D"), None),  # bad LRC
        (ascii_frame(REPLY)[:-1], None),  # no line end yet
    ],
)
def test_find_ascii_reply(buf: bytes, found: bytes | None) -> None:
    at, end, adu = find_ascii_reply(READ, buf)
    assert adu == found
    if found is not None:
        assert buf[at:end] == ascii_frame(REPLY)


# -- on a line --------------------------------------------------------------------------------


TWO = plan_blocks(
    ModbusRtuDevice.model_validate(
        {
            "id": "d",
            "driver": "modbus_rtu",
            "serial_port": "x",
            "points": [{"name": "a", "address": 0}, {"name": "b", "address": 1}],
        }
    ).points
)


def test_stray_bytes_before_every_reply_cost_nothing(line: tuple[str, str]) -> None:
    """One to three stray bytes before each reply: every poll good, the bytes counted."""
    line_end, agent_end = line
    peer = LinePeer(
        registers={1: {0: 234, 1: 300}},
        prefixes=[b"\x00", b"\xff\x01", b"\x01\x03\x04"],
        turnaround=0.02,
    )
    peer.serve_pty(line_end)
    dev = ModbusRtuDevice.model_validate(
        {
            "id": "d",
            "driver": "modbus_rtu",
            "serial_port": agent_end,
            "timeout": "300ms",
            "points": [{"name": "a", "address": 0}, {"name": "b", "address": 1}],
        }
    )

    async def run() -> tuple[list[list[PointResult]], dict[str, int]]:
        bus = make_bus([dev])
        assert await bus.connect()
        out = [await bus.read_device(1, TWO, 0.3) for _ in range(12)]
        bus.close()
        return out, bus.counters.as_dict()

    polls, counters = asyncio.run(run())
    peer.stop()
    assert all([(r.value, r.quality) for r in rs] == [(234, "good"), (300, "good")] for rs in polls)
    assert counters == {
        "requests": 12,
        "timeouts": 0,
        "crc_errors": 0,
        "garbage_bytes": peer.prefixed,
        "frame_errors": 0,
        "retries": 0,
    }
    assert peer.prefixed == 4 * (1 + 2 + 3)


@pytest.mark.parametrize("fault", ["other_unit_first", "other_unit"])
def test_a_frame_answering_another_unit_is_never_taken(line: tuple[str, str], fault: str) -> None:
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 234, 1: 300}}, faults={1: [fault]})
    peer.serve_pty(line_end)

    async def run() -> list[PointResult]:
        bus = make_bus(
            [
                ModbusRtuDevice.model_validate(
                    {
                        "id": "d",
                        "driver": "modbus_rtu",
                        "serial_port": agent_end,
                        "points": [{"name": "a", "address": 0}],
                    }
                )
            ]
        )
        assert await bus.connect()
        results = await bus.read_device(1, TWO, 0.3)
        bus.close()
        return results

    results = asyncio.run(run())
    peer.stop()
    if fault == "other_unit_first":  # unit 2's frame (zeros), then unit 1's own reply
        assert [(r.value, r.quality) for r in results] == [(234, "good"), (300, "good")]
    else:  # unit 2's frame only: nothing of it is used
        assert [(r.value, r.quality) for r in results] == [(None, "frame_error")] * 2
        assert "a frame from unit 2 came instead" in (results[0].error or "")


def test_a_bad_crc_is_refused_and_counted_even_after_stray_bytes(line: tuple[str, str]) -> None:
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 234, 1: 300}}, faults={1: ["crc"]}, prefixes=[b"\x00"])
    peer.serve_pty(line_end)

    async def run() -> tuple[list[PointResult], list[PointResult], dict[str, int], float]:
        bus = make_bus(
            [
                ModbusRtuDevice.model_validate(
                    {
                        "id": "d",
                        "driver": "modbus_rtu",
                        "serial_port": agent_end,
                        "points": [{"name": "a", "address": 0}],
                    }
                )
            ]
        )
        assert await bus.connect()
        t = time.monotonic()
        bad = await bus.read_device(1, TWO, 1.0)
        took = time.monotonic() - t
        good = await bus.read_device(1, TWO, 1.0)
        bus.close()
        return bad, good, bus.counters.as_dict(), took

    bad, good, counters, took = asyncio.run(run())
    peer.stop()
    assert [(r.value, r.quality) for r in bad] == [(None, "frame_error")] * 2
    assert "CRC error in reply from unit 1 after 1 byte(s) of garbage" in (bad[0].error or "")
    assert took < 0.5, "a whole reply with a bad CRC ends the wait at the next silence"
    assert [r.value for r in good] == [234, 300]
    assert counters["crc_errors"] == 1 and counters["frame_errors"] == 0
    assert counters["requests"] == 2 and counters["garbage_bytes"] == 1 + 9 + 1


@pytest.mark.parametrize("retries", [1, 0])
@pytest.mark.parametrize("fault", ["crc", "garbage_only", "late:0.5"])
def test_one_spoilt_reply_costs_no_reading_with_a_retry(
    line: tuple[str, str], retries: int, fault: str
) -> None:
    """The poller against the line: the third reply is spoilt (a bad CRC, noise instead
    of the reply, or no reply in time). With ``retries: 1`` the request is sent again at
    once and every poll is good; with ``retries: 0`` that poll is lost."""
    line_end, agent_end = line
    spoil = "other_unit" if fault == "garbage_only" else fault
    peer = LinePeer(registers={1: {0: 234, 1: 300}}, faults={1: ["", "", spoil]})
    peer.serve_pty(line_end)
    dev = ModbusRtuDevice.model_validate(
        {
            "id": "d",
            "driver": "modbus_rtu",
            "serial_port": agent_end,
            "poll_interval": "1s",
            "timeout": "300ms",
            "retries": retries,
            "points": [{"name": "a", "address": 0}, {"name": "b", "address": 1}],
        }
    )
    polls: list[list[PointResult]] = []

    async def run() -> dict[str, int]:
        bus = make_bus([dev])
        poller = BusPoller(dev.bus, bus, [dev], lambda d, ts, rs: polls.append(rs))
        for st in poller.states:  # poll back to back: the schedule is not under test here
            for _ in range(5):
                await poller.poll_once(st)
        poller.bus.close()
        return bus.counters.as_dict()

    counters = asyncio.run(run())
    peer.stop()
    qualities = [[r.quality for r in rs] for rs in polls]
    kind = {"crc": "crc_errors", "garbage_only": "frame_errors", "late:0.5": "timeouts"}[fault]
    assert counters[kind] == 1, counters
    if retries:
        assert qualities == [["good", "good"]] * 5, qualities
        assert counters["retries"] == 1 and counters["requests"] == 6
    else:
        assert qualities[2] == ["frame_error" if fault != "late:0.5" else "timeout"] * 2
        assert qualities[:2] + qualities[3:] == [["good", "good"]] * 4, qualities
        assert counters["retries"] == 0 and counters["requests"] == 5


def test_retry_budget_keeps_the_poll_interval_and_a_dead_device_is_not_retried(
    line: tuple[str, str],
) -> None:
    """A retry that could not end within the poll interval is not made; a device that did
    not answer its last poll is not retried at all (it costs one timeout per poll, as
    without retries)."""
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 1, 1: 2}})
    peer.serve_pty(line_end)

    async def run() -> tuple[dict[str, int], list[list[str]], float]:
        dev = ModbusRtuDevice.model_validate(
            {
                "id": "d",
                "driver": "modbus_rtu",
                "serial_port": agent_end,
                "unit_id": 9,  # nobody
                "poll_interval": "500ms",
                "timeout": "200ms",
                "retries": 3,
                "points": [{"name": "a", "address": 0}],
            }
        )
        bus = make_bus([dev])
        poller = BusPoller(dev.bus, bus, [dev], lambda d, ts, rs: None)
        st = poller.states[0]
        qualities = []
        t = time.monotonic()
        for _ in range(3):
            qualities.append([r.quality for r in await poller.poll_once(st)])
        took = time.monotonic() - t
        # an explicit budget too short for even one more timeout
        short = RetryBudget(3, time.monotonic() + 0.1)
        await bus.read_device(9, TWO, 0.2, short)
        bus.close()
        return bus.counters.as_dict(), qualities, took

    counters, qualities, took = asyncio.run(run())
    peer.stop()
    assert qualities == [["timeout"]] * 3
    # first poll: 200 ms + one retry (another would end past 500 ms); then no retries
    assert counters["retries"] == 1, counters
    assert counters["requests"] == 3 + 1 + 1 and counters["timeouts"] == 5
    assert took < 0.2 * 4 + 0.3, took


def test_retries_default_by_transport() -> None:
    point = {"points": [{"name": "a", "address": 0}]}
    assert ModbusTcpDevice.model_validate({"id": "t", "host": "h", **point}).retries == 0
    rtu = {"id": "r", "driver": "modbus_rtu", "serial_port": "/dev/ttyUSB0", **point}
    assert ModbusRtuDevice.model_validate(rtu).retries == 1
    over = {"id": "o", "driver": "modbus_rtu_over_tcp", "host": "h", "port": 4001, **point}
    assert ModbusRtuOverTcpDevice.model_validate(over).retries == 1
    assert ModbusRtuDevice.model_validate({**rtu, "retries": 0}).retries == 0
    with pytest.raises(ValueError, match="less than or equal to 5"):
        ModbusRtuDevice.model_validate({**rtu, "retries": 9})


def test_rtu_over_tcp_converter_with_noise(tmp_path: Path) -> None:
    """A serial device server whose line adds stray bytes before each reply."""
    peer = LinePeer(registers={1: {0: 11, 1: 12}}, prefixes=[b"\x00", b"\x00\x00"])
    peer.serve_tcp()
    dev = ModbusRtuOverTcpDevice.model_validate(
        {
            "id": "d",
            "driver": "modbus_rtu_over_tcp",
            "host": "127.0.0.1",
            "port": peer.port,
            "points": [{"name": "a", "address": 0}, {"name": "b", "address": 1}],
        }
    )

    async def run() -> tuple[list[list[object]], dict[str, int]]:
        bus = make_bus([dev])
        assert await bus.connect()
        out = [[r.value for r in await bus.read_device(1, TWO, 0.3)] for _ in range(4)]
        bus.close()
        return out, bus.counters.as_dict()

    values, counters = asyncio.run(run())
    peer.stop()
    assert values == [[11, 12]] * 4
    assert counters["garbage_bytes"] == peer.prefixed == 6 and counters["requests"] == 4


def test_read_prints_the_counters(line: tuple[str, str]) -> None:
    line_end, agent_end = line
    peer = LinePeer(registers={1: {0: 5}}, prefixes=[b"\x00\x00"])
    peer.serve_pty(line_end)
    result = CliRunner().invoke(
        main, ["read", "--serial-port", agent_end, "--timeout", "300ms", "--point", "v=holding:0"]
    )
    peer.stop()
    assert result.exit_code == 0, result.output
    assert "good" in result.output
    assert (
        "requests 1, timeouts 0, crc_errors 0, garbage_bytes 2, frame_errors 0, retries 0"
        in result.output
    ), result.output


def test_agent_health_counts_the_noise(
    tmp_path: Path, line: tuple[str, str], broker: Mosquitto
) -> None:
    """The agent process on a line that puts stray bytes before every reply: every reading
    good, and the health message counts the skipped bytes for that bus."""
    line_end, agent_end = line
    peer = LinePeer(
        baudrate=19200, registers={1: {0: 42}}, prefixes=[b"\x00", b"\x01\x00", b"\xff\x00\x01"]
    )
    peer.serve_pty(line_end)
    devices = (
        f"  - {{id: noisy, driver: modbus_rtu, serial_port: {agent_end}, baudrate: 19200, "
        "poll_interval: 100ms, timeout: 300ms, points: [{name: v, address: 0}]}\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: len(sub.telemetry()) >= 15, 15, "15 readings")
    assert agent.stop() == 0, agent.log()
    peer.stop()
    readings = [m.json()["points"]["v"] for m in sub.telemetry()]
    assert all((p["value"], p["quality"]) == (42, "good") for p in readings), readings
    health = [m.json() for m in sub.on("/health")][-1]  # the last one, made at the stop
    counters = health["buses"][f"serial:{agent_end}"]
    assert health["schema"] == "health/1"
    assert counters["requests"] >= len(readings)
    assert counters["timeouts"] == counters["crc_errors"] == counters["frame_errors"] == 0
    # every reply's stray bytes, but those of a reply still on its way at the stop
    assert peer.prefixed - 3 <= counters["garbage_bytes"] <= peer.prefixed, (counters, peer)
    assert counters["garbage_bytes"] >= len(readings)
