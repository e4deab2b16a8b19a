"""Register decoding, scaling, block planning and the JSON of non-finite values.

Every expected register list below was written out by hand from the byte-order table in the
docstring of :mod:`drivers.codec` (``A`` = most significant byte):

* ``ABCD``: registers as the big-endian bytes, high word first;
* ``CDAB``: the same registers in reverse order;
* ``BADC``: the ``ABCD`` registers with the two bytes of each register swapped;
* ``DCBA``: all bytes reversed (= ``CDAB`` with the bytes of each register swapped).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.contract.telemetry import parse_telemetry, telemetry_body
from drivers.base import GOOD, PointResult
from drivers.codec import (
    REGISTER_COUNT,
    DecodeError,
    decode_registers,
    encode_registers,
    non_finite_quality,
    scale_value,
)
from drivers.modbus.config import MAX_REGISTERS_PER_READ, ModbusPoint
from drivers.modbus.driver import Block, decode_block, decode_point, plan_blocks

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
TYPES = ("uint16", "int16", "uint32", "int32", "float32", "uint64", "int64", "float64")


def point(**kw: object) -> ModbusPoint:
    """A validated point; ``name`` and ``address`` default to ``p`` and 0."""
    kw.setdefault("name", "p")
    kw.setdefault("address", 0)
    return ModbusPoint.model_validate(kw)


# ---------------------------------------------------------------------------------------
# 1. decoding table: every type x every byte order, registers written out by hand

DECODE_TABLE = [
    # uint16 0x1234 = 4660: a 16-bit value only feels the byte swap
    ("uint16", "ABCD", [0x1234], 4660),
    ("uint16", "CDAB", [0x1234], 4660),
    ("uint16", "BADC", [0x3412], 4660),
    ("uint16", "DCBA", [0x3412], 4660),
    ("uint16", "ABCD", [0xFFFE], 65534),
    # int16 0xFF85 = -123
    ("int16", "ABCD", [0xFF85], -123),
    ("int16", "CDAB", [0xFF85], -123),
    ("int16", "BADC", [0x85FF], -123),
    ("int16", "DCBA", [0x85FF], -123),
    ("int16", "ABCD", [0xFFFE], -2),
    ("int16", "ABCD", [0x7FFF], 32767),
    ("int16", "ABCD", [0x8000], -32768),
    # uint32 0x12345678 = 305419896
    ("uint32", "ABCD", [0x1234, 0x5678], 305419896),
    ("uint32", "CDAB", [0x5678, 0x1234], 305419896),
    ("uint32", "BADC", [0x3412, 0x7856], 305419896),
    ("uint32", "DCBA", [0x7856, 0x3412], 305419896),
    # acceptance check: 0x0001270F = 65536 + 9999
    ("uint32", "ABCD", [0x0001, 0x270F], 75535),
    # int32 0xFEDCBA98 = -19088744
    ("int32", "ABCD", [0xFEDC, 0xBA98], -19088744),
    ("int32", "CDAB", [0xBA98, 0xFEDC], -19088744),
    ("int32", "BADC", [0xDCFE, 0x98BA], -19088744),
    ("int32", "DCBA", [0x98BA, 0xDCFE], -19088744),
    # int32 0xFFFFFC03 = -1021
    ("int32", "ABCD", [0xFFFF, 0xFC03], -1021),
    # float32 0x429B077A = 77.51460266113281
    ("float32", "ABCD", [0x429B, 0x077A], 77.51460266113281),
    # acceptance check (case 001 A): wire bytes 07 7A 42 9B, low word first
    ("float32", "CDAB", [0x077A, 0x429B], 77.51460266113281),
    ("float32", "BADC", [0x9B42, 0x7A07], 77.51460266113281),
    ("float32", "DCBA", [0x7A07, 0x9B42], 77.51460266113281),
    # float32 0xC0200000 = -2.5
    ("float32", "ABCD", [0xC020, 0x0000], -2.5),
    ("float32", "CDAB", [0x0000, 0xC020], -2.5),
    ("float32", "BADC", [0x20C0, 0x0000], -2.5),
    ("float32", "DCBA", [0x0000, 0x20C0], -2.5),
    # uint64 0x0123456789ABCDEF = 81985529216486895
    ("uint64", "ABCD", [0x0123, 0x4567, 0x89AB, 0xCDEF], 81985529216486895),
    ("uint64", "CDAB", [0xCDEF, 0x89AB, 0x4567, 0x0123], 81985529216486895),
    ("uint64", "BADC", [0x2301, 0x6745, 0xAB89, 0xEFCD], 81985529216486895),
    ("uint64", "DCBA", [0xEFCD, 0xAB89, 0x6745, 0x2301], 81985529216486895),
    # int64 0xFEDCBA9876543210 = -81985529216486896
    ("int64", "ABCD", [0xFEDC, 0xBA98, 0x7654, 0x3210], -81985529216486896),
    ("int64", "CDAB", [0x3210, 0x7654, 0xBA98, 0xFEDC], -81985529216486896),
    ("int64", "BADC", [0xDCFE, 0x98BA, 0x5476, 0x1032], -81985529216486896),
    ("int64", "DCBA", [0x1032, 0x5476, 0x98BA, 0xDCFE], -81985529216486896),
    # float64 0x400921FB54442D18 = pi
    ("float64", "ABCD", [0x4009, 0x21FB, 0x5444, 0x2D18], 3.141592653589793),
    ("float64", "CDAB", [0x2D18, 0x5444, 0x21FB, 0x4009], 3.141592653589793),
    ("float64", "BADC", [0x0940, 0xFB21, 0x4454, 0x182D], 3.141592653589793),
    ("float64", "DCBA", [0x182D, 0x4454, 0xFB21, 0x0940], 3.141592653589793),
]


@pytest.mark.parametrize(("dtype", "order", "registers", "expected"), DECODE_TABLE)
def test_decode_table(dtype: str, order: str, registers: list[int], expected: float) -> None:
    value = decode_registers(registers, dtype, order)  # type: ignore[arg-type]
    assert value == expected
    assert type(value) is (float if dtype.startswith("float") else int)
    # the table is also the encoder's answer key
    assert encode_registers(expected, dtype, order) == registers  # type: ignore[arg-type]


def test_decode_table_covers_every_type_and_order() -> None:
    covered = {(dtype, order) for dtype, order, _, _ in DECODE_TABLE}
    assert covered == {(t, o) for t in TYPES for o in ORDERS}
    assert set(REGISTER_COUNT) == set(TYPES)


def test_acceptance_float32_cdab() -> None:
    value = decode_registers([0x077A, 0x429B], "float32", "CDAB")
    assert value == pytest.approx(77.5146026611328, rel=1e-12)
    assert value == 77.51460266113281


def test_acceptance_int16_scaled() -> None:
    raw = decode_registers([0xFFFE], "int16")
    assert raw == -2
    assert scale_value(raw, 0.1) == -0.2


def test_acceptance_uint32_abcd() -> None:
    assert decode_registers([0x0001, 0x270F], "uint32", "ABCD") == 75535


def test_decode_is_byte_based_not_host_endian() -> None:
    # the same wire bytes give the same value whatever the host; spelt out via struct '>'
    assert (
        decode_registers([0x429B, 0x077A], "float32")
        == struct.unpack(">f", bytes([0x42, 0x9B, 0x07, 0x7A]))[0]
    )


def test_decode_rejects_bad_register_values() -> None:
    with pytest.raises(DecodeError, match="out of range"):
        decode_registers([0x10000], "uint16")
    with pytest.raises(DecodeError, match="out of range"):
        decode_registers([-1], "int16")
    with pytest.raises(DecodeError, match="not a register type"):
        decode_registers([1], "bool")  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="does not fit"):
        encode_registers(70000, "uint16")
    with pytest.raises(DecodeError, match="does not fit"):
        encode_registers(-1, "uint32")


def test_non_finite_quality() -> None:
    assert non_finite_quality(float("nan")) == "nan"
    assert non_finite_quality(float("inf")) == "inf"
    assert non_finite_quality(float("-inf")) == "inf"
    assert non_finite_quality(-0.0) is None
    assert non_finite_quality(1.5) is None


def test_scale_value_types() -> None:
    assert scale_value(7, 3, 2) == 23
    assert type(scale_value(7, 3, 2)) is int
    assert scale_value(7, 1.0) == 7.0
    assert type(scale_value(7, 1.0)) is float
    assert type(scale_value(7, 1, 0.5)) is float
    assert scale_value(7, 1, 0.5) == 7.5
    assert scale_value(1, 0.123456, 0, 3) == 0.123
    nan = scale_value(float("nan"), 0.1, 0, 2)
    assert math.isnan(nan)


# ---------------------------------------------------------------------------------------
# 2. round trip property

INT_RANGES = {
    "uint16": (0, 2**16 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint32": (0, 2**32 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint64": (0, 2**64 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


@given(
    data=st.data(),
    dtype=st.sampled_from(sorted(INT_RANGES)),
    order=st.sampled_from(ORDERS),
)
def test_roundtrip_integers(data: st.DataObject, dtype: str, order: str) -> None:
    lo, hi = INT_RANGES[dtype]
    value = data.draw(st.integers(min_value=lo, max_value=hi))
    regs = encode_registers(value, dtype, order)  # type: ignore[arg-type]
    assert len(regs) == REGISTER_COUNT[dtype]
    assert all(0 <= r <= 0xFFFF for r in regs)
    assert decode_registers(regs, dtype, order) == value  # type: ignore[arg-type]


@given(
    data=st.data(),
    dtype=st.sampled_from(["float32", "float64"]),
    order=st.sampled_from(ORDERS),
)
def test_roundtrip_floats(data: st.DataObject, dtype: str, order: str) -> None:
    width = 32 if dtype == "float32" else 64
    value = data.draw(st.floats(width=width, allow_nan=True, allow_infinity=True))
    regs = encode_registers(value, dtype, order)  # type: ignore[arg-type]
    assert len(regs) == REGISTER_COUNT[dtype]
    decoded = decode_registers(regs, dtype, order)  # type: ignore[arg-type]
    if math.isnan(value):
        assert math.isnan(decoded)
    else:
        assert decoded == value
        assert math.copysign(1.0, decoded) == math.copysign(1.0, value)


# ---------------------------------------------------------------------------------------
# 3. field-failure cases


def test_case_001_float32_cdab() -> None:
    # check A
    a = decode_point(point(name="flow_rate", type="float32", byte_order="CDAB"), [0x077A, 0x429B])
    assert a.quality == GOOD
    assert a.value == 77.51460266113281
    assert round(a.value, 3) == 77.515
    # the wrong answers of the report
    wrong_abcd = decode_registers([0x077A, 0x429B], "float32", "ABCD")
    wrong_badc = decode_registers([0x077A, 0x429B], "float32", "BADC")
    assert wrong_abcd == pytest.approx(1.88e-34, rel=1e-2)
    assert wrong_badc == pytest.approx(1.76e35, rel=1e-2)
    # check B: one block of four registers, two low-word-first floats
    pts = [
        point(name="first", address=0, type="float32", byte_order="CDAB"),
        point(name="second", address=2, type="float32", byte_order="CDAB"),
    ]
    blocks = plan_blocks(pts)
    assert [(b.table, b.start, b.count) for b in blocks] == [("holding", 0, 4)]
    results = decode_block(blocks[0], [0x0000, 0x3FC0, 0x0000, 0x4040])
    assert [(r.point, r.value, r.quality) for r in results] == [
        ("first", 1.5, GOOD),
        ("second", 3.0, GOOD),
    ]


def test_case_003_float32_is_ieee() -> None:
    p = point(name="supply_voltage", address=2, type="float32", byte_order="CDAB", scale=1.0)
    r = decode_point(p, [0x9BD4, 0x436E])
    assert r.quality == GOOD
    assert r.value == 238.60870361328125
    assert r.value != pytest.approx(11313223.24)
    assert round(r.value, 2) == 238.61
    # a scaled integer has to be asked for by name
    as_int = decode_point(
        point(name="v", type="uint32", byte_order="CDAB", scale=0.01, decimals=2),
        [0x9BD4, 0x436E],
    )
    assert as_int.value == 11313223.24
    # unknown or mis-cased type names are config errors
    for bad in ("FLOAT32", "flaot32", "float"):
        with pytest.raises(ValidationError) as exc:
            ModbusPoint.model_validate({"name": "v", "address": 2, "type": bad})
        assert exc.value.errors()[0]["loc"] == ("type",)
        assert exc.value.errors()[0]["type"] == "literal_error"


def test_case_004_register_count() -> None:
    with pytest.raises(DecodeError, match="float32 needs exactly 2 register"):
        decode_registers([0xCCCD], "float32")
    with pytest.raises(DecodeError, match="float32 needs exactly 2 register"):
        decode_registers([0x4348, 0xCCCD, 0x0000], "float32")
    with pytest.raises(ValidationError) as exc:
        ModbusPoint.model_validate(
            {"name": "grid_voltage", "address": 100, "type": "float32", "count": 1}
        )
    assert "count 1" in str(exc.value)
    assert "float32" in str(exc.value)
    for extra in ({}, {"count": 2}):
        p = point(name="grid_voltage", address=100, type="float32", **extra)
        assert p.register_count == 2
        r = decode_point(p, [0x4348, 0xCCCD])
        assert r.quality == GOOD
        assert r.value == 200.8000030517578
        assert round(r.value, 1) == 200.8
    # a short read is a decode error, never zero-padded to 7.35e-41
    short = decode_point(point(name="grid_voltage", type="float32"), [0xCCCD])
    assert short.quality == "decode_error"
    assert short.value is None


def test_case_005_int16_sign() -> None:
    assert decode_registers([0xFFEC], "int16") == -20
    assert scale_value(decode_registers([0xFFEC], "int16"), 1.0) == -20
    assert scale_value(decode_registers([0xFFFE], "int16"), 0.1) == -0.2
    assert decode_registers([0xFFEC], "uint16") == 65516
    assert scale_value(decode_registers([0xFFFE], "uint16"), 0.1, 0, 1) == 6553.4

    def read(dtype: str, scale: float, word: int) -> object:
        return decode_point(point(name="t", address=10, type=dtype, scale=scale), [word]).value

    assert read("int16", 1.0, 0xFFEC) == -20
    assert read("uint16", 1.0, 0xFFEC) == 65516
    assert read("int16", 0.1, 0xFFFE) == -0.2
    assert read("uint16", 0.1, 0xFFFE) == pytest.approx(6553.4, rel=1e-12)


def test_case_006_scaled_int16_keeps_fraction() -> None:
    p = point(name="air_temp", table="input", type="int16", scale=0.1, decimals=1)
    values = [decode_point(p, [w]).value for w in (0x016C, 0x014C, 0x01A5)]
    assert values == [36.4, 33.2, 42.1]
    assert all(type(v) is float for v in values)
    assert [scale_value(raw, 0.1, 0, 1) for raw in (364, 332, 421)] == [36.4, 33.2, 42.1]
    neg = scale_value(-1021, 0.1, 0, 1)
    assert neg == -102.1
    assert repr(neg) == "-102.1"
    body = telemetry_body("gw", "dev", 0, [decode_point(p, [0x016C])], {"air_temp": "degC"})
    assert b'"value":36.4' in body


def test_case_007_int32_scale() -> None:
    for scale in (10, 10.0):
        p = point(name="totalizer", address=46, type="int32", scale=scale)
        assert decode_point(p, [0x00D8, 0x00DC]).value == 141559960
    assert decode_point(point(name="t", type="int32", scale=1.0), [0x00D8, 0x00DC]).value == (
        14155996
    )
    net = decode_point(
        point(name="net_flow", address=48, type="int32", scale=0.1, decimals=1), [0xFFFF, 0xFC03]
    )
    assert net.value == -102.1


@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("order", ORDERS)
def test_case_007_scale_and_offset_for_every_type(dtype: str, order: str) -> None:
    raw = 100.0 if dtype.startswith("float") else 100
    regs = encode_registers(raw, dtype, order)  # type: ignore[arg-type]
    p = point(type=dtype, byte_order=order, scale=0.5, offset=3)
    assert decode_point(p, regs).value == 53.0
    p = point(type=dtype, byte_order=order, scale=2, offset=-7)
    assert decode_point(p, regs).value == 193
    p = point(type=dtype, byte_order=order, scale=0.1, offset=0.25, decimals=2)
    assert decode_point(p, regs).value == 10.25


def test_case_009_nan_inf_json() -> None:
    pairs = {
        "quiet_nan": [0x7FC0, 0x0000],
        "pos_inf": [0x7F80, 0x0000],
        "neg_inf": [0xFF80, 0x0000],
        "neg_zero": [0x8000, 0x0000],
        "normal": [0x4050, 0x0000],
    }
    results = [decode_point(point(name=n, type="float32"), regs) for n, regs in pairs.items()]
    results.append(decode_point(point(name="state", address=10, type="uint16"), [7]))
    units = {n: "m" for n in pairs} | {"state": None}
    body = telemetry_body("gw-1", "dev-1", 1700000000123, results, units)

    def refuse(token: str) -> float:
        raise AssertionError(f"non-standard JSON token {token}")

    doc = json.loads(body, parse_constant=refuse)
    pts = doc["points"]
    assert pts["quiet_nan"]["value"] is None
    assert pts["quiet_nan"]["quality"] == "nan"
    for name in ("pos_inf", "neg_inf"):
        assert pts[name]["value"] is None
        assert pts[name]["quality"] == "inf"
        assert pts[name]["unit"] == "m"
    assert pts["neg_zero"]["value"] == 0
    assert pts["neg_zero"]["quality"] == GOOD
    assert not pts["neg_zero"]["value"] < 0
    assert pts["normal"] == {"value": 3.25, "unit": "m", "quality": GOOD}
    assert pts["state"] == {"value": 7, "unit": None, "quality": GOOD}
    assert doc["gateway"] == "gw-1"
    assert doc["device"] == "dev-1"
    assert doc["ts"] == "2023-11-14T22:13:20.123Z"
    # the platform side reads the same message back
    readings = {r.point: r for r in parse_telemetry(body)}
    assert readings["pos_inf"].value is None
    assert readings["normal"].value == 3.25
    assert readings["state"].ts_ms == 1700000000123


def test_telemetry_body_guards_raw_non_finite_values() -> None:
    # even a non-finite value handed in as "good" never reaches the JSON
    body = telemetry_body("gw", "d", 0, [PointResult("x", float("-inf"))], {})
    doc = json.loads(body, parse_constant=lambda t: pytest.fail(f"token {t}"))
    assert doc["points"]["x"]["value"] is None
    assert doc["points"]["x"]["quality"] == "inf"


# ---------------------------------------------------------------------------------------
# 4. block planning


def spans(blocks: list[Block]) -> list[tuple[str, int, int, list[str]]]:
    return [(b.table, b.start, b.count, [p.name for p in b.points]) for b in blocks]


def test_plan_blocks_merges_contiguous_points() -> None:
    pts = [
        point(name="c", address=3, type="uint16"),
        point(name="a", address=0, type="uint16"),
        point(name="b", address=1, type="float32"),
    ]
    assert spans(plan_blocks(pts)) == [("holding", 0, 4, ["a", "b", "c"])]


def test_plan_blocks_merges_overlapping_points() -> None:
    pts = [point(name="f", address=4, type="float32"), point(name="hi", address=4)]
    blocks = plan_blocks(pts)
    assert [(b.start, b.count) for b in blocks] == [(4, 2)]
    got = [(r.point, r.value) for r in decode_block(blocks[0], [0x4050, 0x0000])]
    assert got == [("f", 3.25), ("hi", 0x4050)]


def test_plan_blocks_gap_starts_new_block() -> None:
    pts = [
        point(name="a", address=0),
        point(name="b", address=2),
        point(name="c", address=3, type="uint32"),
    ]
    assert spans(plan_blocks(pts)) == [
        ("holding", 0, 1, ["a"]),
        ("holding", 2, 3, ["b", "c"]),
    ]


def test_plan_blocks_never_mixes_tables() -> None:
    pts = [
        point(name="h0", table="holding", address=0),
        point(name="i1", table="input", address=1),
        point(name="h1", table="holding", address=1),
        point(name="i0", table="input", address=0),
        point(name="c0", table="coil", address=0),
        point(name="d1", table="discrete_input", address=1),
        point(name="c1", table="coil", address=1),
    ]
    got = spans(plan_blocks(pts))
    assert sorted(got) == [
        ("coil", 0, 2, ["c0", "c1"]),
        ("discrete_input", 1, 1, ["d1"]),
        ("holding", 0, 2, ["h0", "h1"]),
        ("input", 0, 2, ["i0", "i1"]),
    ]
    for table, _, _, names in got:
        assert all(
            {"h": "holding", "i": "input", "c": "coil", "d": "discrete_input"}[n[0]] == table
            for n in names
        )


def test_plan_blocks_splits_at_125_registers() -> None:
    assert MAX_REGISTERS_PER_READ == 125
    full = [point(name=f"r{i}", address=i) for i in range(125)]
    assert [(b.start, b.count) for b in plan_blocks(full)] == [(0, 125)]
    over = [*full, point(name="r125", address=125)]
    assert [(b.start, b.count) for b in plan_blocks(over)] == [(0, 125), (125, 1)]
    # a float32 that would end at 126 goes to the next block whole
    straddle = [*full[:124], point(name="f", address=124, type="float32")]
    blocks = plan_blocks(straddle)
    assert [(b.start, b.count) for b in blocks] == [(0, 124), (124, 2)]
    assert [p.name for p in blocks[1].points] == ["f"]
    assert all(b.count <= 125 for b in plan_blocks(over + straddle[124:]))


def test_plan_blocks_splits_bits_at_2000() -> None:
    coils = [point(name=f"c{i}", table="coil", address=i) for i in range(2001)]
    assert [(b.start, b.count) for b in plan_blocks(coils)] == [(0, 2000), (2000, 1)]


def test_decode_block_uses_offsets_from_block_start() -> None:
    pts = [
        point(name="a", address=10, type="int16"),
        point(name="b", address=11, type="uint32", byte_order="CDAB"),
    ]
    (block,) = plan_blocks(pts)
    assert (block.start, block.count) == (10, 3)
    got = [(r.point, r.value) for r in decode_block(block, [0xFFEC, 0x5678, 0x1234])]
    assert got == [("a", -20), ("b", 305419896)]
