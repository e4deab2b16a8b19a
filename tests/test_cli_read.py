"""`edge-agent read`: poll once and print, for technicians; nothing is published."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from agent.cli import main
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import write_config


def test_read_prints_each_point_once(tmp_path: Path) -> None:
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="level", address=0, type="float32", byte_order="CDAB")])
    sim.set_raw(1, "holding", 0, [0x077A, 0x429B])
    sim.start_thread()
    devices = (
        f"  - id: wl-1\n    host: 127.0.0.1\n    port: {sim.port}\n    points:\n"
        "      - {name: level, address: 0, type: float32, byte_order: CDAB, unit: m}\n"
        "      - {name: missing, address: 9}\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", 1, devices)  # no broker needed
    result = CliRunner().invoke(main, ["read", "--config", str(cfg)])
    sim.stop_thread()
    lines = result.output.splitlines()
    assert lines[0].startswith("wl-1  (tcp://127.0.0.1:")
    assert lines[1].split()[:6] == ["level", "holding", "0", "77.51460266113281", "m", "good"]
    assert "exception" in lines[2] and "illegal data address" in lines[2]
    assert result.exit_code == 1, "a bad point makes the exit code non-zero"
    assert not (tmp_path / "state").exists(), "read does not touch the buffer"


def test_read_unknown_device(tmp_path: Path) -> None:
    devices = "  - {id: d1, host: 127.0.0.1, port: 1, points: [{name: v, address: 0}]}\n"
    cfg = write_config(tmp_path / "agent.yaml", 1, devices)
    result = CliRunner().invoke(main, ["read", "--config", str(cfg), "--device", "nope"])
    assert result.exit_code == 2 and "no device nope" in result.output
