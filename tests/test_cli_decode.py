"""`edge-agent decode`: the decode explorer for technicians."""

from __future__ import annotations

from click.testing import CliRunner

from agent.cli import main
from drivers.codec import decode_all


def test_decode_lists_float32_cdab() -> None:
    result = CliRunner().invoke(main, ["decode", "0x077A", "0x429B"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()[1:]
    columns = header.split()
    float_row = next(r.split() for r in rows if r.startswith("float32"))
    assert float_row[columns.index("CDAB")] == "77.51460266"
    assert float_row[columns.index("ABCD")] == "1.88274832e-34"


def test_decode_all_types_that_fit() -> None:
    rows = dict(decode_all([0x4348, 0xCCCD]))
    assert set(rows) == {"uint16", "int16", "uint32", "int32", "float32"}
    assert rows["float32"]["ABCD"] == 200.8000030517578
    assert rows["int16"]["BADC"] == 0x4843
    assert "float64" in dict(decode_all([0, 0, 0, 0]))


def test_decode_refuses_non_register_values() -> None:
    for bad in ("0x1FFFF", "-1", "twelve"):
        result = CliRunner().invoke(main, ["decode", bad])
        assert result.exit_code == 2
        assert bad in result.output


def test_decode_reads_live_and_gives_the_address_hint() -> None:
    from agent.simulator import ModbusSimulator
    from drivers.modbus.config import ModbusPoint

    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="level", address=100, type="float32")])
    sim.set_raw(1, "holding", 100, [0x077A, 0x429B])
    sim.start_thread()
    base = ["decode", "--host", "127.0.0.1", "--port", str(sim.port)]
    live = CliRunner().invoke(main, [*base, "--address", "100"])
    missing = CliRunner().invoke(main, [*base, "--address", "7"])
    sim.stop_thread()
    assert live.exit_code == 0, live.output
    lines = live.output.splitlines()
    assert lines[0] == "registers: 0x077A 0x429B"
    columns = lines[1].split()
    float_row = next(r.split() for r in lines if r.startswith("float32"))
    assert float_row[columns.index("CDAB")] == "77.51460266"
    hint = lines[-1]
    assert "address 100 (zero-based, as sent) is holding register 101" in hint
    assert "Modicon 40101" in hint and "try address 99" in hint
    assert missing.exit_code == 1
    assert "exception 2" in missing.output or "illegal data address" in missing.output


def test_decode_needs_words_or_a_live_source() -> None:
    result = CliRunner().invoke(main, ["decode"])
    assert result.exit_code == 2 and "--address" in result.output
    both = CliRunner().invoke(main, ["decode", "0x1", "--host", "x", "--address", "1"])
    assert both.exit_code == 2
