"""What keeps the agent's memory small at thousands of points (issue 14) must not change
what it writes: the state file's points as text, the retained info kept deflated, the C
allocator's fixed mmap threshold."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from agent.memory import fix_mmap_threshold
from agent.retained import KEEP_DEFLATED_FROM
from agent.status import RawJson, dumps_raw, points_json
from drivers.base import PointResult
from tests.helpers import AgentProcess, Mosquitto, free_listen_port, wait_until, write_config
from tests.test_contract import _retained

VALUES: list[Any] = [
    0,
    -1,
    2**63 - 1,
    1.5,
    -0.1,
    1e-300,
    1e300,
    True,
    False,
    None,
    "plain",
    'quote " and \\ backslash',
    "Pumpe Süd 北 \u2028",
    math.nan,
    math.inf,
    -math.inf,
]


def dict_form(values: dict[str, tuple[Any, str]], units: dict[str, str | None]) -> str:
    """What the state file held before: a dict per point, through json.dumps."""
    doc = {
        name: {
            "value": v if not isinstance(v, float) or math.isfinite(v) else None,
            "unit": units.get(name),
            "quality": q,
        }
        for name, (v, q) in values.items()
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def test_state_file_points_are_the_text_json_dumps_makes() -> None:
    values = {f"p{i}": (v, "good" if i % 3 else "timeout") for i, v in enumerate(VALUES)}
    values['odd "name"'] = (1, "nan")
    units = {"p1": "m", "p2": 'k"Pa', "p3": "°C", 'odd "name"': None}
    results = [PointResult(name, v, q) for name, (v, q) in values.items()]
    text = points_json(results, units).text
    assert text == dict_form(values, units)
    assert points_json([], {}).text == "{}"
    # a name given twice: the later result, where the first stood (as in a dict)
    twice = [PointResult("a", 1), PointResult("b", 2), PointResult("a", 3, "timeout")]
    assert points_json(twice, {}).text == dict_form({"a": (3, "timeout"), "b": (2, "good")}, {})


def test_dumps_raw_is_json_dumps_with_raw_parts() -> None:
    doc = {"a": [1, 2.5, None, "x"], "b": {"c": True}, "n": 7, "devices": [{"points": 0}]}
    plain = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    assert dumps_raw(doc) == plain
    doc["devices"] = [{"points": RawJson('{"v":1}')}]
    assert json.loads(dumps_raw(doc))["devices"] == [{"points": {"v": 1}}]
    # raw parts first, between and last in a dict, in lists, nested: the exact text of
    # json.dumps of the same document with the parts parsed
    raw = {"r1": '{"v":1.5,"q":"good"}', "r2": "[1,null]", "r3": '"x\\u2028"'}
    mixed = {
        "first": RawJson(raw["r1"]),
        "s": 'é\u2028"',
        "devices": [{"id": "a", "points": RawJson(raw["r2"]), "n": -1}, {"id": "b"}, []],
        "mid": {"k": [RawJson(raw["r3"]), 2]},
        "last": RawJson(raw["r2"]),
    }
    parsed = json.loads(json.dumps(mixed, default=lambda o: json.loads(o.text)))
    assert dumps_raw(mixed) == json.dumps(parsed, separators=(",", ":"), allow_nan=False)
    assert dumps_raw(RawJson("[]")) == "[]" and dumps_raw({}) == "{}" and dumps_raw([]) == "[]"
    with pytest.raises(ValueError):
        dumps_raw({"x": math.nan})
    with pytest.raises(ValueError):
        dumps_raw({"p": RawJson("{}"), "x": [math.inf]})
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps_raw({"p": RawJson("{}"), "x": object()})
    # strings with NULs around text (the shape of the mark a raw part stands in by while
    # the encoder runs) are written as json.dumps writes them
    nuls = {"a": "\x00" + "0" * 32 + "\x00", "p": RawJson("1"), "b": ["\x00", "\u0000"]}
    assert dumps_raw(nuls) == json.dumps({**nuls, "p": 1}, separators=(",", ":"))


def test_the_mmap_threshold_is_fixed_on_glibc() -> None:
    assert fix_mmap_threshold() is True


def test_a_large_retained_info_is_published_again_whole_after_the_broker_lost_it(
    tmp_path: Path,
) -> None:
    """20 devices of 125 points: an info of more than 64 kB, kept deflated in the agent,
    comes back byte for byte after a broker restarted without its retained messages."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    nobody = free_listen_port()  # the devices do not answer: info is published anyway
    points = "".join(
        f"      - {{name: level_{i}, address: {i}, type: int16, unit: m}}\n" for i in range(125)
    )
    devices = "".join(
        f"  - id: d{n}\n    host: 127.0.0.1\n    port: {nobody}\n    poll_interval: 5s\n"
        f"    timeout: 100ms\n    points:\n{points}"
        for n in range(20)
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        first = wait_until(
            lambda: _retained(broker.port, "lifeline/test-gw/info").get("lifeline/test-gw/info"),
            15,
            "the retained info",
        )
        assert len(first) >= KEEP_DEFLATED_FROM
        broker.stop()
        for kept in (tmp_path / "broker").glob("*.db"):
            kept.unlink()  # the broker forgets its retained messages
        broker.start()
        time.sleep(0.5)
        again = wait_until(
            lambda: _retained(broker.port, "lifeline/test-gw/info").get("lifeline/test-gw/info"),
            15,
            "the info published again",
        )
        assert again == first
        assert len(json.loads(again)["devices"]) == 20
    finally:
        code = agent.stop()
        broker.stop()
    assert code == 0, agent.log()
