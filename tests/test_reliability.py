"""Nothing lost: fault injection against the real agent process, mosquitto and SQLite.
Run alone with `pytest -m fault`; also part of the normal test run."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    Subscriber,
    assert_all_delivered,
    one_point_device,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.fault


def sim_one_point() -> ModbusSimulator:
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.set_raw(1, "holding", 0, [7])
    sim.start_thread()
    return sim


@pytest.mark.parametrize("garbage", ["random bytes", "another program's database"])
def test_unusable_buffer_is_moved_aside_and_reported(
    tmp_path: Path, broker: Mosquitto, garbage: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = state / "buffer.db"
    if garbage == "random bytes":
        db.write_bytes(b"\x00\xffnot sqlite at all" * 4096)
    else:
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, other TEXT)")
        con.execute("INSERT INTO outbox(other) VALUES ('x')")
        con.commit()
        con.close()
    original = db.read_bytes()
    sim = sim_one_point()
    cfg = write_config(tmp_path / "agent.yaml", broker.port, one_point_device(sim.port))
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: len(sub.telemetry()) >= 3, 15, "new readings")
    wait_until(lambda: sub.on("/notice"), 5, "the notice")
    assert agent.stop() == 0, agent.log()
    sim.stop_thread()
    assert_all_delivered(sub, state)
    (moved,) = state.glob("buffer.db.corrupt-*")
    assert moved.read_bytes() == original, "moved aside, never deleted or changed"
    notice = sub.on("/notice")[0].json()
    assert notice["type"] == "buffer_moved_aside" and str(moved) in notice["message"]
    assert "moved aside" in agent.log()
