"""A short run of the fleet benchmark (``bench/fleet.py``) as a correctness check of its
counting, never of a timing: every reading of the window arrives and is counted once, and
each device poll is one Modbus request at the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fleet


@pytest.mark.timeout(90)
def test_a_short_fleet_run_counts_every_reading_once(tmp_path: Path) -> None:
    fig = fleet.run(devices=2, registers=3, seconds=3, warmup=1, interval="500ms",
                    workdir=tmp_path)  # fmt: skip
    assert fig["intervals"] == 6
    assert fig["nominal"] == 2 * 3 * 6
    # each device polled once per interval of the window, each poll counted once, with
    # its 3 readings
    assert fig["polls_by_device"] == {"dev1": 6, "dev2": 6}
    assert fig["readings"] == fig["nominal"]
    assert fig["delivered_ratio"] == 1.0
    # counted at the simulator: one read request per device poll (3 contiguous registers)
    assert fig["requests_by_unit"] == {1: 6, 2: 6}
    assert fig["requests_per_cycle"] == 1.0
    # the byte counts are those of what arrived: a verbose payload names each point
    assert fig["payload_b"] is not None and fig["payload_b"] > len('"r0":{"value":0}')
    assert fig["wire_up_b"] > fig["payload_b"]  # topics and MQTT headers on top
    assert fig["peak_rss_mb"] > 0 and fig["pss_mb"] > 0
    assert fig["subject"] == "agent" and fig["payload_mode"] == "default"


def test_a_payload_the_benchmark_cannot_read_is_an_error_not_a_zero() -> None:
    assert fleet.polls_in(
        "lifeline/g/telemetry/d1",
        b'{"ts": "2026-01-01T00:00:00.000Z", "points": {"a": {}, "b": {}}}',
    ) == [("d1", 1767225600000, 2)]
    with pytest.raises(ValueError, match="cannot read"):
        fleet.polls_in("lifeline/g/telemetry/d1", b'{"v": [1, 2, 3]}')
    # compact: one value per reading, a batch's rows each a poll, zlib or not
    compact = (
        b'{"schema":"telemetry_compact/1","seq":1,"layout":"0badcafe",'
        b'"ts":"2026-01-01T00:00:00.000Z","rows":[[0,[1,2,null]],[1000,[null,null,null],'
        b'{"q":{"0":"timeout","1":"timeout","2":"timeout"}}]]}'
    )
    from agent.contract.compact import deflate

    for body in (compact, deflate(compact)):
        assert fleet.polls_in("lifeline/g/telemetry/d1", body) == [
            ("d1", 1767225600000, 2),
            ("d1", 1767225601000, 3),
        ]
