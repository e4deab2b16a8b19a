"""Modbus RTU over a serial line: a pymodbus RTU server on one end of a pseudo-terminal
pair made by socat, the agent's driver on the other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config.loader import ConfigError, load_config
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from drivers.modbus.driver import ModbusRtuBus, plan_blocks
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    Subscriber,
    assert_all_delivered,
    start_line,
    wait_until,
    write_config,
)


def test_rtu_devices_on_one_line(line: tuple[str, str]) -> None:
    server_end, client_end = line
    points = [
        ModbusPoint(name="level", address=0, type="float32", byte_order="CDAB"),
        ModbusPoint(name="temp", address=2, type="int16", scale=0.1),
    ]

    async def run() -> list[list[object]]:
        sim = ModbusSimulator(serial_port=server_end, baudrate=9600)
        for unit in (1, 2):
            sim.add_device(unit, points)
        sim.set_raw(1, "holding", 0, [0x077A, 0x429B, 0xFFFE])
        sim.set_raw(2, "holding", 0, [0x0000, 0x4040, 215])
        await sim.start()
        bus = ModbusRtuBus(client_end, baudrate=9600, timeout=0.5)
        assert await bus.connect()
        blocks = plan_blocks(points)
        out = []
        for unit in (1, 3, 2):  # unit 3 is not on the line: bad quality for it alone
            results = await bus.read_device(unit, blocks)
            out.append([(r.value, r.quality) for r in results])
        bus.close()
        await sim.stop()
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


def test_agent_polls_an_rtu_line_end_to_end(
    tmp_path: Path, line: tuple[str, str], broker: Mosquitto
) -> None:
    """The agent process, a serial RTU line (pty), two units, mosquitto: readings arrive."""
    server_end, client_end = line
    sim = ModbusSimulator(serial_port=server_end, baudrate=19200)
    for unit in (1, 2):
        sim.add_device(unit, [ModbusPoint(name="v", address=0)])
        sim.set_raw(unit, "holding", 0, [100 + unit])
    sim.start_thread()
    devices = "".join(
        f"  - {{id: rtu{u}, driver: modbus_rtu, serial_port: {client_end}, baudrate: 19200, "
        f"unit_id: {u}, poll_interval: 200ms, timeout: 300ms, "
        "points: [{name: v, address: 0}]}\n"
        for u in (1, 2)
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(
        lambda: {m.json()["device"] for m in sub.telemetry()} == {"rtu1", "rtu2"},
        15,
        "readings of both RTU units",
    )
    assert agent.stop() == 0, agent.log()
    sim.stop_thread()
    assert_all_delivered(sub, tmp_path / "state")
    values = {(m.json()["device"], m.json()["points"]["v"]["value"]) for m in sub.telemetry()}
    assert values == {("rtu1", 101), ("rtu2", 102)}
    assert "bus serial:" in agent.log()
    assert all(u in {r[0] for r in sim.requests} for u in (1, 2))


def test_scan_finds_exactly_the_units_on_the_line(line: tuple[str, str]) -> None:
    from click.testing import CliRunner

    from agent.cli import main

    server_end, client_end = line
    sim = ModbusSimulator(serial_port=server_end, baudrate=9600)
    for unit in (3, 7):
        sim.add_device(unit, [ModbusPoint(name="v", address=0)])
        sim.set_raw(unit, "holding", 0, [unit * 10])
    sim.start_thread()
    result = CliRunner().invoke(
        main, ["scan", "--serial-port", client_end, "--units", "1-10", "--timeout", "100ms"]
    )
    sim.stop_thread()
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("unit ")]
    assert lines == ["unit 3: answers: register 0 = 30", "unit 7: answers: register 0 = 70"]
    assert "2 unit(s) answered on serial:" in result.output
    assert sorted({u for u, _, _, _ in sim.requests}) == list(range(1, 11))


def test_scan_tries_each_line_setting(line: tuple[str, str]) -> None:
    """--baudrate (and --parity) lists: every unit is tried at every setting, and each
    answer says at which. (A pty passes bytes at any baud rate, so here both answer; on a
    real line only the matching one does. A pty refuses parity settings altogether.)"""
    from click.testing import CliRunner

    from agent.cli import main

    server_end, client_end = line
    sim = ModbusSimulator(serial_port=server_end, baudrate=9600)
    sim.add_device(3, [ModbusPoint(name="v", address=0)])
    sim.set_raw(3, "holding", 0, [30])
    sim.start_thread()
    result = CliRunner().invoke(
        main,
        [
            "scan",
            "--serial-port",
            client_end,
            "--units",
            "2-3",
            "--timeout",
            "100ms",
            "--baudrate",
            "9600,19200",
        ],
    )
    sim.stop_thread()
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("unit ")]
    assert lines == [f"unit 3: answers at {b} N: register 0 = 30" for b in (9600, 19200)]
    assert len(sim.requests) == 4


def test_case_021_serial_port_vanishes_and_returns(tmp_path: Path) -> None:
    """The adapter is pulled (its pty disappears) and plugged back: polls go on with
    quality no_connection meanwhile, and reading resumes without restarting anything."""
    from agent.poller import BusPoller
    from drivers.modbus.config import ModbusRtuDevice

    a, b = str(tmp_path / "ttyA"), str(tmp_path / "ttyB")
    polls: list[tuple[str, object]] = []

    async def run() -> None:
        line = start_line(a, b)
        sim = ModbusSimulator(serial_port=a)
        sim.add_device(1, [ModbusPoint(name="v", address=0)])
        sim.set_raw(1, "holding", 0, [5])
        await sim.start()
        dev = ModbusRtuDevice.model_validate(
            {
                "id": "r",
                "driver": "modbus_rtu",
                "serial_port": b,
                "poll_interval": "200ms",
                "timeout": "200ms",
                "points": [{"name": "v", "address": 0}],
            }
        )
        poller = BusPoller(
            dev.bus,
            ModbusRtuBus(b, timeout=0.2),
            [dev],
            lambda d, ts, rs: polls.append((rs[0].quality, rs[0].value)),
        )
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(1.0)
        await sim.stop()
        line.terminate()  # unplugged: both pty paths vanish
        line.wait(5)
        await asyncio.sleep(1.5)
        line = start_line(a, b)  # plugged back in under the same name
        sim = ModbusSimulator(serial_port=a)
        sim.add_device(1, [ModbusPoint(name="v", address=0)])
        sim.set_raw(1, "holding", 0, [6])
        await sim.start()
        for _ in range(100):
            await asyncio.sleep(0.1)
            if polls and polls[-1] == ("good", 6):
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sim.stop()
        line.terminate()
        line.wait(5)

    asyncio.run(run())
    qualities = [q for q, _ in polls]
    assert ("good", 5) in polls and polls[-1] == ("good", 6), polls
    gap = qualities[qualities.index("good") :]
    assert "no_connection" in gap or "timeout" in gap, "the outage shows as bad quality"
