"""``edge-agent consume --format sparkplug_b``: the gateway's Sparkplug B messages go into
the same accounting as the native ones (dedup and gaps on (edge node id, seq), drop
notices applied), against a real mosquitto, the agent as a process and a pymodbus
simulator; and the decoder alone on hand-built payloads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.consumer.decode import FORMATS, Context, Invalid
from agent.consumer.sinks import JsonLinesSink
from agent.consumer.sparkplug import decode_sparkplug
from agent.simulator import ModbusSimulator
from tests.helpers import REPO, AgentProcess, buffer_rows, wait_until, write_config
from tests.test_consumer import Consumer
from tests.test_end_to_end import DEVICE_A, EXPECTED_A, POINTS_A
from tests.test_sparkplug import GROUP, NODE, SPARKPLUG

INT64, UINT64, DOUBLE, BOOLEAN, STRING = 4, 8, 10, 11, 12


@pytest.fixture
def sim() -> Iterator[ModbusSimulator]:
    a = ModbusSimulator(tick=0.05)
    a.add_device(1, POINTS_A, {"counter": lambda t: int(t * 20) % 65536})
    a.set_raw(1, "holding", 0, [0x077A, 0x429B, 0xFFFE])
    a.set_raw(1, "input", 0, [0x0001, 0x270F])
    a.set_raw(1, "coil", 0, [True])
    a.start_thread()
    yield a
    a.stop_thread()


def test_every_seq_of_a_sparkplug_gateway_once_and_no_gap(
    tmp_path: Path, broker: Any, sim: ModbusSimulator
) -> None:
    """A gateway with ``mqtt.format: sparkplug_b`` and one consumer writing JSON lines:
    every seq 1..last of the gateway (DDATA and NDATA) is recorded once under the edge
    node id, the gap report is empty, nothing is refused, the values are the registers'
    and the births are state records."""
    out = tmp_path / "messages.jsonl"
    consumer = Consumer(
        tmp_path / "consumer.log",
        "--mqtt", f"127.0.0.1:{broker.port}",
        "--client-id", "platform-spb",
        "--format", "sparkplug_b",
        "--group", GROUP,
        "--output", str(out),
    )  # fmt: skip
    consumer.wait_for(f"subscribed to spBv1.0/{GROUP}/#")
    cfg = write_config(
        tmp_path / "gw" / "agent.yaml", broker.port, DEVICE_A.format(port_a=sim.port), SPARKPLUG
    )
    agent = AgentProcess(cfg, tmp_path / "gw" / "agent.log")
    agent.start()
    try:
        wait_until(
            lambda: out.exists() and out.read_text().count('"record":"message"') >= 15, 30, "15"
        )
    finally:
        code = agent.stop()
    assert code == 0, agent.log()
    pending, last = buffer_rows(cfg.parent / "state")
    assert pending == 0 and last >= 15
    wait_until(lambda: out.read_text().count('"record":"message"') >= last, 10, f"{last} seqs")
    time.sleep(0.5)  # anything more would be a second copy
    assert consumer.stop() == 0, consumer.log()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert not [x for x in lines if x["record"] in ("gaps", "invalid")], consumer.log()
    messages = [x for x in lines if x["record"] == "message"]
    assert sorted(x["seq"] for x in messages) == list(range(1, last + 1))
    assert {x["gateway"] for x in messages} == {NODE}
    ddata = [x for x in messages if x["schema"] == "sparkplug_b/DDATA"]
    assert len(ddata) >= 10
    for x in ddata:
        points = x["payload"]["points"]
        assert {k: points[k]["value"] for k in EXPECTED_A} == EXPECTED_A, points
        assert points["level"]["unit"] == "m" and points["level"]["quality"] == "good"
        assert x["topic"] == f"spBv1.0/{GROUP}/DDATA/{NODE}/wl-a"
    notices = [x for x in messages if x["schema"] == "notice/1"]
    assert {x["seq"] for x in messages} - {x["seq"] for x in ddata} == {x["seq"] for x in notices}
    states = {x["schema"] for x in lines if x["record"] == "state"}
    assert {"sparkplug_b/NBIRTH", "sparkplug_b/DBIRTH", "sparkplug_b/NDEATH"} <= states
    assert "Traceback" not in agent.log() + consumer.log()


# -- the decoder alone, on payloads built by hand ------------------------------------------


def _payload(seq: int | None, *metrics: dict[str, Any]) -> bytes:
    from agent.sparkplug.proto import Payload

    p = Payload(timestamp=1_767_225_600_000)
    if seq is not None:
        p.seq = seq
    for m in metrics:
        props = m.pop("props", {})
        metric = p.metrics.add(**m)
        for k, (t, v) in props.items():
            metric.properties.keys.append(k)
            pv = metric.properties.values.add(type=t)
            if t == STRING:
                pv.string_value = v
            else:
                pv.int_value = v
    return bytes(p.SerializeToString())


T = "spBv1.0/g/{}/n1"
NBIRTH = _payload(
    0,
    {"name": "bdSeq", "datatype": INT64, "long_value": 3},
    {"name": "Node Control/Rebirth", "datatype": BOOLEAN, "boolean_value": False},
    {"name": "seq", "alias": 1, "datatype": UINT64, "long_value": 0},
    {"name": "Notice", "alias": 2, "datatype": STRING, "is_null": True},
)
DBIRTH = _payload(
    1,
    {"name": "seq", "alias": 3, "datatype": UINT64, "is_null": True},
    {"name": "level", "alias": 4, "datatype": DOUBLE, "double_value": 0.5,
     "props": {"engUnit": (STRING, "m")}},
    {"name": "total", "alias": 5, "datatype": INT64, "long_value": 7},
    {"name": "pump", "alias": 6, "datatype": BOOLEAN, "boolean_value": True},
)  # fmt: skip


def _ddata(seq: int, spb_seq: int) -> bytes:
    return _payload(
        spb_seq,
        {"alias": 3, "timestamp": 1_767_225_600_000, "long_value": seq},
        {"alias": 4, "double_value": 1.5},
        {"alias": 5, "long_value": 2**64 - 3},  # Int64 -3 as its two's complement
        {"alias": 6, "is_null": True,
         "props": {"Quality": (3, 0), "qualityCode": (STRING, "timeout")}},
    )  # fmt: skip


def _notice(seq: int, **members: Any) -> bytes:
    doc = {"seq": seq, "schema": "notice/1", "gateway": "n1", "type": "dropped", "message": "m"}
    text = json.dumps({**doc, **members, "ts": "2026-01-01T00:00:00.000Z"})
    return _payload(4, {"alias": 2, "string_value": text}, {"alias": 1, "long_value": seq})


NOT_A_STRING = _payload(4, {"alias": 2, "long_value": 1}, {"alias": 1, "long_value": 6})
NOT_JSON = _payload(4, {"alias": 2, "string_value": "{"}, {"alias": 1, "long_value": 6})
WRONG_SEQ = _notice(6, count=1, first_seq=2, last_seq=2).replace(b'"seq": 6', b'"seq": 7')


def test_hand_built_births_data_and_a_drop_notice(tmp_path: Path) -> None:
    """NBIRTH and DBIRTH name the aliases; a DDATA becomes a telemetry record of seq 5
    with the points' names, units, signed values and the quality of a null one; a DDATA
    delivered twice is stored once; an NDATA ``Notice`` of ``dropped`` 2..4 covers those
    seqs, leaving seq 1 the only gap."""
    ctx = Context(prefix="g")
    fmt = FORMATS["sparkplug_b"]
    assert fmt.filters("g") == ["spBv1.0/g/#"]
    assert fmt.state_filters is not None and "spBv1.0/g/NBIRTH/+" in fmt.state_filters("g")
    nbirth = decode_sparkplug(T.format("NBIRTH"), NBIRTH, ctx)
    dbirth = decode_sparkplug(T.format("DBIRTH") + "/d1", DBIRTH, ctx)
    assert nbirth is not None and dbirth is not None
    assert (nbirth.gateway, nbirth.seq, nbirth.kind) == ("n1", None, "nbirth")
    bdseq = nbirth.doc["metrics"][0]
    assert (bdseq["name"], bdseq["datatype"], bdseq["value"]) == ("bdSeq", INT64, 3)
    data = decode_sparkplug(T.format("DDATA") + "/d1", _ddata(5, 2), ctx)
    assert data is not None
    assert (data.gateway, data.seq, data.kind, data.device) == ("n1", 5, "telemetry", "d1")
    assert data.ts_ms == 1_767_225_600_000
    assert data.doc["points"] == {
        "level": {"value": 1.5, "unit": "m", "quality": "good"},
        "total": {"value": -3, "unit": None, "quality": "good"},
        "pump": {"value": None, "unit": None, "quality": "timeout"},
    }
    notice = decode_sparkplug(T.format("NDATA"), _notice(6, count=3, first_seq=2, last_seq=4), ctx)
    assert notice is not None and (notice.kind, notice.seq, notice.type) == ("notice", 6, "dropped")
    again = decode_sparkplug(T.format("DDATA") + "/d1", _ddata(5, 3), ctx)
    assert again is not None
    assert decode_sparkplug(T.format("NCMD"), NBIRTH, ctx) is None
    assert decode_sparkplug("spBv1.0/STATE/host", b'{"online":true}', ctx) is None
    with (tmp_path / "out.jsonl").open("w") as f:
        sink = JsonLinesSink(f)
        sink.write([nbirth, dbirth, data, again, notice])
        assert sink.report() == {"n1": [(1, 1)]}
    assert (sink.counts.stored, sink.counts.duplicates, sink.counts.retained) == (2, 1, 2)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("spBv1.0/g/DDATA/n1/d1", b"\xff\xff\xff", "not a Sparkplug B payload"),
        ("spBv1.0/other/DDATA/n1/d1", _ddata(5, 2), "is not 'g'"),
        ("spBv1.0/g/DDATA/n1", _ddata(5, 2), "not a Sparkplug message type"),
        ("spBv1.0/g/DDATA/n2/d1", _ddata(5, 2), "no birth of this node named"),
        ("spBv1.0/g/DDATA/n1/d1", _payload(2, {"alias": 4, "double_value": 1.0}), "without"),
        ("spBv1.0/g/DDATA/n1/d1", _ddata(0, 2), "not a seq of the gateway"),
        ("spBv1.0/g/NDATA/n1", _notice(6, count=1, first_seq=2**63, last_seq=1), "beyond"),
        ("spBv1.0/g/NDATA/n1", WRONG_SEQ, "is not the metric seq"),
        ("spBv1.0/g/NDATA/n1", NOT_A_STRING, "is not a String"),
        ("spBv1.0/g/NDATA/n1", NOT_JSON, "not JSON"),
        ("lifeline/g1/telemetry/d1", b"{}", "not a Sparkplug B topic"),
    ],
)
def test_what_is_not_a_gateways_sparkplug_is_refused_with_the_reason(
    topic: str, payload: bytes, reason: str
) -> None:
    ctx = Context(prefix="g")
    decode_sparkplug(T.format("NBIRTH"), NBIRTH, ctx)
    decode_sparkplug(T.format("DBIRTH") + "/d1", DBIRTH, ctx)
    with pytest.raises(Invalid, match=reason):
        decode_sparkplug(topic, payload, ctx)


def test_the_consumer_loads_protobuf_only_for_sparkplug() -> None:
    code = (
        "import sys, agent.consumer.main, agent.consumer.decode; "
        "bad = [m for m in sys.modules if m.startswith('google.protobuf')]; "
        "print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
