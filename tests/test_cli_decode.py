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
