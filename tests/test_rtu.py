"""Modbus RTU over a serial line: a pymodbus RTU server on one end of a pseudo-terminal
pair made by socat, the agent's driver on the other."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus import FramerType
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusSerialServer

from agent.config.loader import ConfigError, load_config
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from drivers.modbus.driver import ModbusRtuBus, plan_blocks
from tests.helpers import wait_until


@pytest.fixture
def line(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked pseudo-terminals: (server end, client end)."""
    if shutil.which("socat") is None:
        raise RuntimeError("the RTU tests need socat: sudo apt-get install -y socat")
    a, b = str(tmp_path / "ttyA"), str(tmp_path / "ttyB")
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: Path(a).exists() and Path(b).exists(), 10, "socat's ptys")
    yield a, b
    proc.terminate()
    proc.wait(5)


def test_rtu_devices_on_one_line(line: tuple[str, str]) -> None:
    server_end, client_end = line
    points = [
        ModbusPoint(name="level", address=0, type="float32", byte_order="CDAB"),
        ModbusPoint(name="temp", address=2, type="int16", scale=0.1),
    ]

    async def run() -> list[list[object]]:
        sim = ModbusSimulator()  # used for its device stores only
        for unit in (1, 2):
            sim.add_device(unit, points)
        sim.set_raw(1, "holding", 0, [0x077A, 0x429B, 0xFFFE])
        sim.set_raw(2, "holding", 0, [0x0000, 0x4040, 215])
        context = ModbusServerContext(
            devices={u: d.context for u, d in sim.devices.items()}, single=False
        )
        server = ModbusSerialServer(context, framer=FramerType.RTU, port=server_end, baudrate=9600)
        await server.serve_forever(background=True)
        bus = ModbusRtuBus(client_end, baudrate=9600, timeout=0.5)
        assert await bus.connect()
        blocks = plan_blocks(points)
        out = []
        for unit in (1, 3, 2):  # unit 3 is not on the line: bad quality for it alone
            results = await bus.read_device(unit, blocks)
            out.append([(r.value, r.quality) for r in results])
        bus.close()
        await server.shutdown()
        return out

    one, three, two = asyncio.run(run())
    assert one == [(77.51460266113281, "good"), (-0.2, "good")]
    # pymodbus's serial server answers exception 11 for a unit it does not serve
    assert [q for _, q in three] == ["exception", "exception"], three
    assert two == [(3.0, "good"), (21.5, "good")], "the line stays in step"


def test_rtu_config_and_line_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    device = (
        "  - {{id: {id}, driver: modbus_rtu, serial_port: /dev/ttyUSB0, unit_id: {u}, "
        "baudrate: {b}, points: [{{name: v, address: 0}}]}}\n"
    )
    cfg.write_text(
        "gateway_id: g\nstate_dir: st\ndevices:\n"
        + device.format(id="r1", u=1, b=9600)
        + device.format(id="r2", u=2, b=9600)
    )
    loaded = load_config(cfg)
    assert {d.bus for d in loaded.devices} == {"serial:/dev/ttyUSB0"}
    cfg.write_text(
        "gateway_id: g\nstate_dir: st\ndevices:\n"
        + device.format(id="r1", u=1, b=9600)
        + device.format(id="r2", u=2, b=19200)
    )
    with pytest.raises(ConfigError, match="share serial port /dev/ttyUSB0 but not its settings"):
        load_config(cfg)
