"""Bad input never crashes the agent: property-based tests (hypothesis) throw random YAML
at the config loader and random bytes at the Modbus, text-line and seismic decoders."""

from __future__ import annotations

import contextlib
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config.loader import ConfigError, load_config
from drivers.modbus.config import ModbusPoint
from drivers.modbus.driver import decode_block, plan_blocks
from drivers.modbus.line import ExceptionReply, FrameError, check_reply, parse_ascii
from drivers.seismic_stream import ChannelAligner, parse_ascii_frame, parse_datacast
from drivers.serial_config import SerialLineDevice
from drivers.serial_line import LineAssembler, LineError, parse_line

pytestmark = pytest.mark.fault

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["1s", "50ms", "modbus_rtu", "modbus_tcp", "holding", "float32", "CDAB"]),
)
keys = st.sampled_from(
    [
        "gateway_id",
        "state_dir",
        "devices",
        "mqtt",
        "id",
        "host",
        "points",
        "name",
        "address",
        "type",
        "driver",
        "poll_interval",
        "alarms",
        "outputs",
        "profile",
        "serial_port",
        "x",
    ]
)
yaml_docs = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=20,
)


def _dump(doc: object) -> str:
    import io

    from ruamel.yaml import YAML

    out = io.StringIO()
    YAML(typ="safe").dump(doc, out)
    return out.getvalue()


@FUZZ
@given(st.one_of(yaml_docs.map(_dump), st.text(alphabet=string.printable, max_size=300)))
def test_config_loader_never_raises_anything_but_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "agent.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_config(path)
        except ConfigError as exc:
            assert exc.issues and all(i.message for i in exc.issues)


POINTS = [
    ModbusPoint(name="a", address=0, type="float32", byte_order="CDAB"),
    ModbusPoint(name="b", address=2, type="int16", scale=0.1, invalid_values=[0x7FFF]),
    ModbusPoint(name="c", address=3, type="string", length=4),
    ModbusPoint(name="d", address=5, type="bit", bit=3),
    ModbusPoint(name="e", address=6, type="uint64", counter=True),
]
BLOCK = plan_blocks(POINTS)[0]


@FUZZ
@given(st.lists(st.integers(-(2**20), 2**20), max_size=20))
def test_modbus_decoding_of_any_words_gives_results(words: list[int]) -> None:
    results = decode_block(BLOCK, words)
    assert [r.point for r in results] == [p.name for p in POINTS]
    assert all(r.quality == "good" or r.value is None for r in results)


@FUZZ
@given(st.binary(max_size=300))
def test_modbus_frames_of_any_bytes_are_errors_or_data(data: bytes) -> None:
    request = bytes.fromhex("010300000002")
    with contextlib.suppress(FrameError, ExceptionReply):
        check_reply(request, data)
    with contextlib.suppress(FrameError):
        parse_ascii(data)


LINE_DEVICES = [
    SerialLineDevice.model_validate(
        {
            "driver": "serial_line",
            "id": "s",
            "serial_port": "/dev/null",
            "parser": parser,
            "points": points,
        }
    )
    for parser, points in (
        ({"kind": "csv", "columns": ["a", "b"]}, [{"name": "a"}, {"name": "b", "type": "int"}]),
        ({"kind": "kv"}, [{"name": "a"}]),
        ({"kind": "regex", "pattern": r"L=(?P<a>\S+)"}, [{"name": "a"}]),
        ({"kind": "nmea"}, [{"name": "a", "field": "1"}]),
    )
]


@FUZZ
@given(st.binary(max_size=200))
def test_text_lines_of_any_bytes_are_errors_or_readings(data: bytes) -> None:
    asm = LineAssembler(b"\n", 64)
    asm.synced = True
    lines, _ = asm.feed(data)
    for line in [*lines, data]:
        for dev in LINE_DEVICES:
            try:
                results = parse_line(line, dev)
            except LineError:
                continue
            assert [r.point for r in results] == [p.name for p in dev.points]


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 2**33), max_size=5))
def test_seismic_frames_of_any_bytes_are_errors_or_samples(data: bytes, ts: list[int]) -> None:
    for parse in (lambda d: parse_ascii_frame(d, 3), parse_datacast):
        with contextlib.suppress(LineError):
            parse(data)
    al = ChannelAligner(["a", "b"], 100.0)
    for t in ts:
        al.feed("a", t / 1000, [1, 2, 3])
        al.feed("b", t / 1000, [4])
