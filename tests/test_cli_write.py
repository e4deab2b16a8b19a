"""`edge-agent write`: guarded by an explicit flag; reads back what it wrote."""

from __future__ import annotations

from click.testing import CliRunner

from agent.cli import main
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint


def test_write_needs_the_flag_then_writes_and_reads_back() -> None:
    sim = ModbusSimulator()
    sim.add_device(
        3,
        [
            ModbusPoint(name="setpoint", address=20, type="float32", byte_order="CDAB"),
            ModbusPoint(name="relay", table="coil", address=5),
        ],
    )
    sim.start_thread()
    base = ["write", "--host", "127.0.0.1", "--port", str(sim.port), "--unit", "3"]
    float_args = ["--address", "20", "--type", "float32", "--byte-order", "CDAB", "77.5146"]
    dry = CliRunner().invoke(main, [*base, *float_args])
    asked_before = len(sim.requests)
    done = CliRunner().invoke(main, [*base, *float_args, "--yes-write"])
    coil = CliRunner().invoke(
        main, [*base, "--table", "coil", "--address", "5", "on", "--yes-write"]
    )
    refused = CliRunner().invoke(main, [*base, "--address", "99", "1", "--yes-write"])
    stored: list[int] = []
    sim.call(lambda: stored.extend(sim.devices[3].context.getValues(3, 20, 2)))  # type: ignore[union-attr]
    sim.stop_thread()
    assert dry.exit_code == 2
    assert "would write holding 20..21 of unit 3: 0x077A 0x429B" in dry.output
    assert "nothing sent: add --yes-write" in dry.output
    assert asked_before == 0, "nothing went out without --yes-write"
    assert done.exit_code == 0, done.output
    assert "read back: 0x077A 0x429B" in done.output
    assert stored == [0x077A, 0x429B]
    assert coil.exit_code == 0 and "read back: on" in coil.output, coil.output
    # the simulator refuses a register it does not have with exception 4
    assert refused.exit_code == 1 and "exception 4 (server device failure)" in refused.output


def test_write_refuses_bad_values() -> None:
    base = ["write", "--host", "127.0.0.1", "--address", "0"]
    assert CliRunner().invoke(main, [*base, "70000"]).exit_code == 2
    assert "on/off" in CliRunner().invoke(main, [*base, "--table", "coil", "maybe"]).output
    assert CliRunner().invoke(main, ["write", "--address", "0", "1"]).exit_code == 2


def test_write_stays_within_one_request_and_the_address_space() -> None:
    base = ["write", "--host", "127.0.0.1"]
    past = CliRunner().invoke(main, [*base, "--address", "65535", "--type", "float32", "1.0"])
    assert past.exit_code == 2 and "ending at address 65535" in past.output
    many = CliRunner().invoke(main, [*base, "--address", "0", *(["1"] * 124)])
    assert many.exit_code == 2 and "at most 123 per request" in many.output
