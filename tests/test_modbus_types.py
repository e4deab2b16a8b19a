"""Bits in registers (case 012), 'no value' markers (case 008), Modicon numbers (case 014)."""

from __future__ import annotations

import asyncio
import math
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.simulator import ModbusSimulator
from drivers.codec import encode_registers, register_bit, to_big_endian
from drivers.modbus.config import ModbusPoint, modicon_address
from drivers.modbus.driver import ModbusTcpBus, decode_block, decode_point, plan_blocks


def pt(**kw: object) -> ModbusPoint:
    return ModbusPoint.model_validate(kw)


def read_once(points: list[ModbusPoint], regs: dict[int, list[int]]) -> tuple[dict, list]:
    """Serve ``regs`` (holding address -> words) and read ``points`` once over Modbus TCP."""

    async def run() -> tuple[dict, list]:
        sim = ModbusSimulator()
        sim.add_device(1, [pt(name=f"r{a}", address=a) for a in regs])
        await sim.start()
        for address, words in regs.items():
            sim.set_raw(1, "holding", address, words)
        bus = ModbusTcpBus("127.0.0.1", sim.port, timeout=1.0)
        assert await bus.connect()
        results = await bus.read_device(1, plan_blocks(points))
        bus.close()
        await sim.stop()
        return {r.point: r for r in results}, sim.requests

    return asyncio.run(run())


CASE_012 = [
    pt(name="pump1_running", address=2, type="bit", bit=8),
    pt(name="pump2_running", address=2, type="bit", bit=9),
    pt(name="door_open", address=2, type="bit", bit=0),
    pt(name="float_switch_high", address=3, type="bit", bit=2),
]


def test_case_012_bits_from_one_read() -> None:
    got, requests = read_once(CASE_012, {2: [0x0300], 3: [0x0004]})
    assert {k: r.value for k, r in got.items()} == {
        "pump1_running": True,
        "pump2_running": True,
        "door_open": False,
        "float_switch_high": True,
    }
    assert requests == [(1, 3, 2, 2)], "all four bits from one read of registers 2..3"


def test_case_012_bit_numbering_and_config_errors() -> None:
    assert register_bit(b"\x80\x00", 15) and not register_bit(b"\x80\x00", 0)
    assert register_bit(b"\x00\x80", 15, "BADC")  # bytes swapped first, then bit 15
    for bad in (16, -1):
        with pytest.raises(ValidationError):
            pt(name="b", address=0, type="bit", bit=bad)
    with pytest.raises(ValidationError, match="needs 'bit"):
        pt(name="b", address=0, type="bit")
    with pytest.raises(ValidationError, match="needs type 'bit'"):
        pt(name="b", address=0, type="uint16", bit=3)
    with pytest.raises(ValidationError):
        pt(name="b", table="coil", address=0, type="bit", bit=1)


CASE_008 = [
    pt(name="cos_phi_l1", address=0, type="int16", scale=0.001, invalid_values=[0x7FFF]),
    pt(name="dc_voltage", address=1, type="uint16", scale=0.1, invalid_values=[0xFFFF]),
    pt(name="ac_power", address=2, type="int32", invalid_values=[0x80000000]),
]


def test_case_008_no_value_markers_are_bad_quality() -> None:
    block = plan_blocks(CASE_008)[0]
    got = {r.point: r for r in decode_block(block, [0x7FFF, 0xFFFF, 0x8000, 0x0000])}
    for name, marker in (
        ("cos_phi_l1", "0x7FFF"),
        ("dc_voltage", "0xFFFF"),
        ("ac_power", "0x80000000"),
    ):
        assert got[name].value is None and got[name].quality == "invalid"
        assert marker in (got[name].error or "")
    normal = {r.point: r for r in decode_block(block, [0x01B3, 123, 0, 7])}
    assert normal["cos_phi_l1"].value == pytest.approx(0.435)
    assert normal["dc_voltage"].value == pytest.approx(12.3)
    assert normal["ac_power"].value == 7


def test_case_008_markers_by_bit_pattern_in_any_byte_order() -> None:
    p = pt(name="p", address=0, type="int32", byte_order="CDAB", invalid_values=[0x80000000])
    words = encode_registers(-(2**31), "int32", "CDAB")
    (r,) = decode_block(plan_blocks([p])[0], words)
    assert r.quality == "invalid"


@pytest.mark.parametrize("order", ["ABCD", "CDAB", "BADC", "DCBA"])
@pytest.mark.parametrize(
    ("dtype", "marker", "value", "good"),
    [
        ("uint64", 0xFFFFFFFFFFFFFFFF, 2**64 - 1, 2**64 - 2),
        ("int64", 0x8000000000000000, -(2**63), -(2**63) + 1),
        ("int64", 0x7FFFFFFFFFFFFFFF, 2**63 - 1, 12345678901234),
        ("float64", 0x7FF8000000000001, None, 1.5),
    ],
)
def test_case_008_64_bit_markers(
    dtype: str, marker: int, value: int | None, good: float, order: str
) -> None:
    """64-bit "no value" markers, given as the 64-bit pattern as the manual prints it
    (most significant byte first), in every byte order; the neighbouring value is good."""
    p = pt(name="p", address=0, type=dtype, byte_order=order, invalid_values=[marker])
    block = plan_blocks([p])[0]
    pattern = list(struct.unpack(">4H", marker.to_bytes(8, "big")))
    words = to_registers(pattern, order)
    (r,) = decode_block(block, words)
    assert (r.value, r.quality) == (None, "invalid"), (dtype, order, r)
    assert f"0x{marker:X}" in (r.error or "")
    if value is not None:  # the same marker given as the number it decodes to
        q = pt(name="p", address=0, type=dtype, byte_order=order, invalid_values=[value])
        assert decode_block(plan_blocks([q])[0], words)[0].quality == "invalid"
    (ok,) = decode_block(block, encode_registers(good, dtype, order))  # type: ignore[arg-type]
    assert (ok.value, ok.quality) == (good, "good")


def to_registers(big_endian_words: list[int], order: str) -> list[int]:
    """The registers a device holding these big-endian words sends in ``order``."""
    data = struct.pack(f">{len(big_endian_words)}H", *big_endian_words)
    wire = to_big_endian(data, order)  # type: ignore[arg-type]  # its own inverse
    return list(struct.unpack(f">{len(big_endian_words)}H", wire))


@pytest.mark.parametrize(
    ("register", "table", "address"),
    [
        ("40001", "holding", 0),
        ("40110", "holding", 109),
        ("400002", "holding", 1),
        ("30001", "input", 0),
        ("10001", "discrete_input", 0),
        ("00001", "coil", 0),
        (1, "coil", 0),  # YAML's unquoted 00001
        ("465536", "holding", 65535),
    ],
)
def test_case_014_modicon_numbers(register: object, table: str, address: int) -> None:
    assert modicon_address(register) == (table, address)
    p = pt(name="a", register=register)
    assert (p.table, p.address) == (table, address)


@pytest.mark.parametrize("bad", ["40000", "400000", "30000", "4001", "50001", "4000a", "2x"])
def test_case_014_invalid_modicon_numbers_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        modicon_address(bad)
    with pytest.raises(ValidationError):
        pt(name="a", register=bad)


def test_case_014_pdu_on_the_wire() -> None:
    """Modicon 40001 is read as FC 03, start address 0, count 1 (PDU 03 00 00 00 01)."""
    got, requests = read_once([pt(name="a", register="40001")], {0: [42]})
    assert got["a"].value == 42
    assert requests == [(1, 3, 0, 1)]


def test_case_014_register_and_address_together_refused() -> None:
    with pytest.raises(ValidationError, match="either 'register'"):
        pt(name="a", register="40001", address=0)


class LateReplies:
    """A Modbus TCP peer that answers the first request only after ``delay`` (a device that
    is slow once), every later one at once; each reply holds ``1000 + address``, in
    ``count + extra`` registers."""

    def __init__(self, delay: float, extra: int = 0) -> None:
        self.delay = delay
        self.extra = extra
        self.port = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        try:
            while True:
                tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                fc, address, count = struct.unpack(">BHH", await reader.readexactly(length - 1))
                n = count + self.extra
                body = struct.pack(">BB", fc, 2 * n) + struct.pack(">H", 1000 + address) * n
                frame = struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body
                if first:
                    first = False
                    asyncio.get_running_loop().call_later(self.delay, writer.write, frame)
                else:
                    writer.write(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def test_case_019_late_reply_is_not_taken_for_the_next_request() -> None:
    """Modbus TCP: the reply to a timed-out request arrives during the next request; it is
    discarded by transaction id, the next request gets its own value, and the connection
    stays in step afterwards."""

    async def run() -> list[tuple[object, str]]:
        peer = LateReplies(delay=0.5)
        server = await peer.start()
        bus = ModbusTcpBus("127.0.0.1", peer.port, timeout=0.3)
        assert await bus.connect()
        out = []
        for address in (0, 10, 0, 10):
            (r,) = await bus.read_device(1, plan_blocks([pt(name="p", address=address)]))
            out.append((r.value, r.quality))
        bus.close()
        server.close()
        return out

    assert asyncio.run(run()) == [
        (None, "timeout"),  # level: no value this cycle
        (1010, "good"),  # pressure gets its own reply, never the late one (1000)
        (1000, "good"),
        (1010, "good"),
    ]


@pytest.mark.parametrize("extra", [1, -1])
def test_reply_with_wrong_register_count_is_refused(extra: int) -> None:
    """A long or short reply is an error, never shifted data."""

    async def run() -> tuple[object, str, str]:
        peer = LateReplies(delay=0.0, extra=extra)
        server = await peer.start()
        bus = ModbusTcpBus("127.0.0.1", peer.port, timeout=0.3)
        assert await bus.connect()
        points = [pt(name="a", address=4), pt(name="b", address=5)]
        results = await bus.read_device(1, plan_blocks(points))
        bus.close()
        server.close()
        return results[0].value, results[0].quality, results[0].error or ""

    value, quality, error = asyncio.run(run())
    assert value is None and quality == "frame_error"
    assert ("long reply" if extra > 0 else "short reply") in error


def test_case_011_string_keeps_its_own_byte_order() -> None:
    """Text is read first character first; a float's low-word-first order never applies."""
    points = [
        pt(name="tank_label", address=0, type="string", length=8),
        pt(name="tank_level_m", address=4, type="float32", byte_order="CDAB"),
    ]
    (block,) = plan_blocks(points)
    got = {
        r.point: r.value
        for r in decode_block(block, [0x5441, 0x4E4B, 0x2D30, 0x3720, 0x0000, 0x4050])
    }
    assert got == {"tank_label": "TANK-07", "tank_level_m": 3.25}
    swapped = pt(name="s", address=0, type="string", length=4, byte_order="BADC")
    (r,) = decode_block(plan_blocks([swapped])[0], [0x4154, 0x4B4E])
    assert r.value == "TANK"


def test_string_over_modbus_and_in_json() -> None:
    from agent.contract.telemetry import parse_telemetry, telemetry_body

    label = pt(name="label", address=0, type="string", length=7)
    got, requests = read_once([label], {0: [0x5441, 0x4E4B, 0x2D30, 0x3700]})
    assert got["label"].value == "TANK-07" and requests == [(1, 3, 0, 4)]
    body = telemetry_body("gw", "d", 0, [got["label"]], {"label": None})
    assert parse_telemetry(body)[0].value == "TANK-07"


def test_string_config_errors() -> None:
    with pytest.raises(ValidationError, match="needs 'length'"):
        pt(name="s", address=0, type="string")
    with pytest.raises(ValidationError, match="do not apply"):
        pt(name="s", address=0, type="string", length=4, scale=0.1)
    assert pt(name="s", address=0, type="string", length=5).register_count == 3


class OneUnitPeer:
    """A TCP-to-RS-485 converter where only unit 1 answers (unit 2 is powered off)."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[tuple[float, int]] = []

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                fc, _address, count = struct.unpack(">BHH", await reader.readexactly(length - 1))
                self.requests.append((time.monotonic(), unit))
                if unit == 1:
                    body = struct.pack(">BB", fc, 2 * count) + struct.pack(">H", 7) * count
                    writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def test_dead_unit_backs_off_and_spares_its_neighbour() -> None:
    """Unit 2 never answers: after 3 failed polls it is asked less and less often (its
    polls still publish bad quality), so unit 1 on the same line keeps its rhythm."""
    from agent.poller import BusPoller
    from drivers.modbus.config import ModbusTcpDevice

    polls: list[tuple[str, str, float]] = []

    async def run(peer: OneUnitPeer) -> None:
        server = await peer.start()
        devices = [
            ModbusTcpDevice.model_validate(
                {
                    "id": f"u{u}",
                    "host": "127.0.0.1",
                    "port": peer.port,
                    "unit_id": u,
                    "poll_interval": "100ms",
                    "timeout": "300ms",
                    "points": [{"name": "v", "address": 0}],
                }
            )
            for u in (1, 2)
        ]
        bus = ModbusTcpBus("127.0.0.1", peer.port, timeout=0.3)
        poller = BusPoller(
            "tcp://peer",
            bus,
            devices,
            lambda d, ts, rs: polls.append((d.id, rs[0].quality, time.monotonic())),
        )
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(4)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()

    peer = OneUnitPeer()
    asyncio.run(run(peer))
    asked_2 = sum(1 for _, u in peer.requests if u == 2)
    assert asked_2 <= 6, f"unit 2 asked {asked_2} times in 4 s"  # 3, then after 1 s, 2 s
    dead = [q for d, q, _ in polls if d == "u2"]
    assert len(dead) >= 15 and set(dead) == {"timeout"}, "bad quality keeps being published"
    good = [t for d, q, t in polls if d == "u1" and q == "good"]
    assert len(good) >= 25, f"unit 1 got only {len(good)} good polls in 4 s"


SPREAD = [0, 1, 2, 10, 11, 30, 31, 32, 100, 101, 102, 103, 120, 200, 210, 220, 230, 250, 290, 300]


@pytest.mark.parametrize(
    ("max_gap", "max_registers", "expected"),
    [
        # runs of touching points: 0-2, 10-11, 30-32, 100-103, 120, then 7 singles
        (
            0,
            125,
            [
                (0, 3),
                (10, 2),
                (30, 3),
                (100, 4),
                (120, 1),
                (200, 1),
                (210, 1),
                (220, 1),
                (230, 1),
                (250, 1),
                (290, 1),
                (300, 1),
            ],
        ),
        # gaps of up to 10 unused registers bridged
        (10, 125, [(0, 12), (30, 3), (100, 4), (120, 1), (200, 31), (250, 1), (290, 11)]),
        # everything bridged, split only by the 125-register limit
        (123, 125, [(0, 121), (200, 101)]),
        # a device that takes at most 50 registers per request
        (123, 50, [(0, 33), (100, 21), (200, 31), (250, 41), (300, 1)]),
    ],
)
def test_requests_per_poll_are_minimal(
    max_gap: int, max_registers: int, expected: list[tuple[int, int]]
) -> None:
    """20 points over registers 0-300: exactly the requests the gap and size limits
    allow, counted at the server."""

    async def run() -> tuple[list[tuple[int, int, int, int]], dict[str, object]]:
        sim = ModbusSimulator()
        sim.add_device(1, [pt(name=f"r{a}", address=a) for a in range(301)])
        await sim.start()
        sim.set_raw(1, "holding", 0, list(range(1000, 1301)))
        bus = ModbusTcpBus("127.0.0.1", sim.port, timeout=1.0)
        assert await bus.connect()
        points = [pt(name=f"p{a}", address=a) for a in SPREAD]
        results = await bus.read_device(1, plan_blocks(points, max_gap, max_registers))
        bus.close()
        await sim.stop()
        return sim.requests, {r.point: r.value for r in results}

    requests, values = asyncio.run(run())
    assert [(a, c) for _, _, a, c in requests] == expected
    assert values == {f"p{a}": 1000 + a for a in SPREAD}, "no value shifted by a bridged gap"


def test_decimal_point_read_from_the_device() -> None:
    """value = raw / 10^n with n from the transmitter's decimal-point register (0x0003),
    read in the same poll; a changed setting changes the value at once."""
    points = [
        pt(name="decimals", address=3, type="uint16"),
        pt(name="level", address=4, type="int16", decimal_point="decimals", unit="m"),
        pt(name="fixed", address=5, type="int16", decimal_point=1),
    ]
    (block,) = plan_blocks(points)
    from drivers.modbus.driver import apply_decimal_points

    def values(words: list[int]) -> dict[str, object]:
        return {
            r.point: (r.value, r.quality)
            for r in apply_decimal_points(points, decode_block(block, words))
        }

    assert values([2, 1234, 1234])["level"] == (12.34, "good")
    assert values([3, 1234, 1234])["level"] == (1.234, "good")
    assert values([0, 0xFFFE, 0])["level"] == (-2.0, "good")
    assert values([2, 1234, 1234])["fixed"] == (123.4, "good")
    assert values([12, 1234, 0])["level"] == (None, "decode_error")


def test_decimal_point_over_modbus() -> None:
    points = [
        pt(name="decimals", address=3, type="uint16"),
        pt(name="pressure", address=4, type="int16", decimal_point="decimals", unit="kPa"),
    ]
    got, requests = read_once(points, {3: [1], 4: [3012]})
    assert got["pressure"].value == 301.2 and requests == [(1, 3, 3, 2)]


def test_decimal_point_reference_errors() -> None:
    from drivers.modbus.config import ModbusTcpDevice

    base = {"id": "d", "host": "h"}
    with pytest.raises(ValidationError, match="must name a uint16/int16 point"):
        ModbusTcpDevice.model_validate(
            {**base, "points": [{"name": "v", "address": 0, "decimal_point": "nope"}]}
        )
    with pytest.raises(ValidationError, match=r"outside 0\.\.9"):
        pt(name="v", address=0, decimal_point=12)


def test_modicon_number_past_the_last_and_strict_unit_id() -> None:
    from drivers.modbus.config import ModbusTcpDevice

    with pytest.raises(ValueError, match=r"past the last one, 465536"):
        modicon_address("465537")
    for bad in (True, "1"):
        with pytest.raises(ValidationError):
            ModbusTcpDevice.model_validate(
                {"id": "d", "host": "h", "unit_id": bad, "points": [{"name": "v", "address": 0}]}
            )


NUMERIC = ["uint16", "int16", "uint32", "int32", "float32", "uint64", "int64", "float64"]


@st.composite
def numeric_points(draw: st.DrawFn) -> list[ModbusPoint]:
    """Up to 12 numeric points at random addresses: gaps, shared and overlapping registers,
    every byte order, integer and float scales (some large enough to overflow), decimals."""
    out = []
    # half the time a fleet-like block: contiguous points of one type, scaled alike
    uniform = draw(st.booleans())
    dtype = draw(st.sampled_from(NUMERIC))
    ints = draw(st.booleans())
    rounds = draw(st.booleans())
    address = 0
    for i in range(draw(st.integers(1, 12))):
        if not uniform:
            dtype = draw(st.sampled_from(NUMERIC))
        scales = [1, 10, -3] if uniform and ints else [0.1, 0.001, 1.5, 1e300, -1e305]
        scale = draw(st.sampled_from(scales if uniform else [1, 10, -3, *scales]))
        offset = draw(st.sampled_from([0, 5, -40] if uniform and ints else [0, 5, -40, 0.5]))
        kw: dict[str, object] = {
            "name": f"p{i}",
            "address": address if uniform else draw(st.integers(0, 30)),
            "type": dtype,
            "scale": scale,
            "offset": offset,
            "byte_order": "ABCD"
            if uniform
            else draw(st.sampled_from(["ABCD", "ABCD", "CDAB", "BADC", "DCBA"])),
        }
        address += int(dtype[-2:]) // 16 if dtype[-2:].isdigit() else 1
        fractional = not (isinstance(scale, int) and isinstance(offset, int))
        if fractional and (rounds if uniform else draw(st.booleans())):
            kw["decimals"] = draw(st.integers(0, 4))
        if not uniform and draw(st.integers(0, 5)) == 0 and dtype in ("uint16", "int16"):
            kw["invalid_values"] = [0xFFFF]
        out.append(pt(**kw))
    return out


@settings(max_examples=400, deadline=None)
@given(numeric_points(), st.data())
def test_a_block_decodes_as_its_points_one_by_one(
    points: list[ModbusPoint], data: st.DataObject
) -> None:
    """decode_block, whichever way it reads a block (one unpack for the whole block when
    its points allow it), gives for every point what decode_point gives for its words."""
    for block in plan_blocks(points, max_gap=4):
        words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=block.count,
                                   max_size=block.count))  # fmt: skip
        expected = [
            decode_point(p, words[p.address - block.start :][: p.register_count])
            for p in block.points
        ]
        got = decode_block(block, words)
        assert got == expected
        # the same type and sign too (== takes 1 for 1.0 and 0.0 for -0.0)
        assert [repr(r.value) for r in got] == [repr(r.value) for r in expected]


def test_whole_block_reading_is_taken_where_the_points_allow() -> None:
    """The plain fleet (contiguous int16 and float32 in ABCD) is unpacked as one block;
    overlapping points or 'no value' markers go point by point."""
    plain = [pt(name=f"r{i}", address=i, type="int16", scale=0.1) for i in range(10)]
    plain.append(pt(name="f", address=12, type="float32"))
    (block,) = plan_blocks(plain, max_gap=2)
    assert block.whole is not None and block.whole.size == 2 * 14
    nan = struct.unpack(">2H", struct.pack(">f", math.nan))
    got = decode_block(block, [65535] * 10 + [0, 0, *nan])
    assert [r.value for r in got[:10]] == [-0.1] * 10
    assert (got[10].value, got[10].quality) == (None, "nan")
    overlapping = [pt(name="a", address=0, type="int32"), pt(name="b", address=1)]
    assert plan_blocks(overlapping)[0].whole is None
    marked = [pt(name="a", address=0, invalid_values=[0xFFFF]), pt(name="b", address=1)]
    assert plan_blocks(marked)[0].whole is None
    # an integer scale too large for a float beside a float offset: checked point by point
    huge = pt(name="h", address=0, type="uint16", scale=10**305, offset=0.5)
    (block,) = plan_blocks([huge])
    assert decode_block(block, [1]) == [decode_point(huge, [1])]
    assert decode_block(block, [40000])[0].quality == "inf"
