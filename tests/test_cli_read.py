"""`edge-agent read`: poll once and print, for technicians; nothing is published."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    assert lines[1].split()[:8] == [
        "level",
        "holding",
        "0",
        "077A",
        "429B",
        "77.51460266113281",
        "m",
        "good",
    ]
    assert "unsupported" in lines[2] and "illegal data address" in lines[2]
    assert result.exit_code == 1, "a bad point makes the exit code non-zero"
    assert not (tmp_path / "state").exists(), "read does not touch the buffer"


def test_read_unknown_device(tmp_path: Path) -> None:
    devices = "  - {id: d1, host: 127.0.0.1, port: 1, points: [{name: v, address: 0}]}\n"
    cfg = write_config(tmp_path / "agent.yaml", 1, devices)
    result = CliRunner().invoke(main, ["read", "--config", str(cfg), "--device", "nope"])
    assert result.exit_code == 2 and "no device nope" in result.output


def test_read_without_config_from_a_profile_and_points() -> None:
    """On a gateway without a config: the bus and the points on the command line."""
    from tests.helpers import PROFILES

    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="level", address=0, type="float32", byte_order="CDAB")])
    sim.set_raw(1, "holding", 0, [0x077A, 0x429B])
    sim.start_thread()
    base = ["read", "--host", "127.0.0.1", "--port", str(sim.port)]
    one = CliRunner().invoke(main, [*base, "--point", "level=holding:0:float32:CDAB"])
    bad = CliRunner().invoke(main, [*base, "--point", "level=holding"])
    none = CliRunner().invoke(main, base)
    sim.stop_thread()
    assert one.exit_code == 0, one.output
    lines = one.output.splitlines()
    assert lines[0] == f"unit 1  (tcp://127.0.0.1:{sim.port})"
    assert lines[1].split() == [
        "level",
        "holding",
        "0",
        "077A",
        "429B",
        "77.51460266113281",
        "good",
    ]
    assert bad.exit_code == 2 and "NAME=TABLE:ADDRESS" in bad.output
    assert none.exit_code == 2 and "--profile and/or --point" in none.output
    assert PROFILES.is_dir()


def test_read_with_a_shipped_profile() -> None:
    from tests.helpers import PROFILES

    sim = ModbusSimulator()
    prof = "submersible-water-level"
    from agent.config.loader import load_profiles

    points = load_profiles(PROFILES).valid[prof].points
    sim.add_device(1, list(points))
    sim.set_raw(1, "holding", 0x0003, [3])  # three decimals
    sim.set_raw(1, "holding", 0x0004, [1523])  # 1.523 m
    sim.start_thread()
    result = CliRunner().invoke(
        main,
        [
            "read",
            "--host",
            "127.0.0.1",
            "--port",
            str(sim.port),
            "--profile",
            prof,
            "--profiles-dir",
            str(PROFILES),
        ],
    )
    unknown = CliRunner().invoke(
        main, ["read", "--host", "127.0.0.1", "--profile", "nope", "--profiles-dir", str(PROFILES)]
    )
    sim.stop_thread()
    level = next(line.split() for line in result.output.splitlines() if "holding 4 " in line)
    assert level[3:5] == ["05F3", "1.523"], result.output
    assert unknown.exit_code == 2 and "known: " in unknown.output and prof in unknown.output


def test_read_a_device_that_never_answers() -> None:
    """A TCP peer that accepts and stays silent: quality timeout in the table, exit 1,
    no traceback."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    result = CliRunner().invoke(
        main,
        [
            "read",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout",
            "200ms",
            "--point",
            "v=holding:0",
        ],
    )
    srv.close()
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "timeout" in result.output and "Traceback" not in result.output


def test_read_finds_the_shipped_profiles_and_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no profiles/ here: the shipped ones are found
    missing = CliRunner().invoke(main, ["read", "--host", "127.0.0.1", "--profile", "nope"])
    assert missing.exit_code == 2
    assert "gas-pressure" in missing.output and "--profiles-dir" in missing.output
    assert "config/profiles" in missing.output  # where it looked


def test_read_host_with_a_port_says_to_use_port() -> None:
    args = ["read", "--host", "127.0.0.1:5020", "--point", "v=holding:0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--host 127.0.0.1 --port 5020" in result.output


def test_read_shows_raw_registers_when_a_point_of_the_block_is_refused() -> None:
    """The device refuses one address of a block: the block is read point by point, and
    every point it has still shows its raw register."""
    from agent.config.loader import load_profiles
    from tests.helpers import PROFILES

    sim = ModbusSimulator()
    sim.add_device(1, list(load_profiles(PROFILES).valid["submersible-water-level"].points))
    sim.set_raw(1, "holding", 0x0004, [1523])
    sim.start_thread()
    args = ["read", "--host", "127.0.0.1", "--port", str(sim.port), "--profile"]
    args += ["submersible-water-level", "--profiles-dir", str(PROFILES)]
    result = CliRunner().invoke(main, [*args, "--point", "extra=holding:7:uint16"])
    sim.stop_thread()
    level = next(line.split() for line in result.output.splitlines() if "holding 4 " in line)
    extra = next(line for line in result.output.splitlines() if "holding 7 " in line)
    assert level[3] == "05F3", result.output
    assert "unsupported" in extra
