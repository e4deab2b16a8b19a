"""The shipped device profiles against simulated devices: what the platform gets from each
model, with the addresses its manual gives."""

from __future__ import annotations

import asyncio
import shutil
import struct
from pathlib import Path

from agent.config.loader import load_config
from agent.pipeline import CounterTracker
from agent.simulator import ModbusSimulator
from drivers.base import PointResult
from drivers.modbus.config import ModbusPoint, ModbusTcpDevice
from drivers.modbus.driver import ModbusTcpBus, plan_blocks
from tests.helpers import PROFILES


def devices_from(tmp_path: Path, devices: str) -> list[ModbusTcpDevice]:
    shutil.copytree(PROFILES, tmp_path / "profiles")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"gateway_id: g\nstate_dir: state\ndevices:\n{devices}")
    out = load_config(cfg).devices
    assert all(isinstance(d, ModbusTcpDevice) for d in out)
    return out  # type: ignore[return-value]


def poll(sim: ModbusSimulator, dev: ModbusTcpDevice, times: int = 1) -> list[list[PointResult]]:
    async def run() -> list[list[PointResult]]:
        await sim.start()
        bus = ModbusTcpBus("127.0.0.1", sim.port, timeout=0.5)
        assert await bus.connect()
        blocks = plan_blocks(dev.points, dev.max_gap, dev.max_registers)
        out = []
        for _ in range(times):
            out.append(await bus.read_device(dev.unit_id, blocks))
        bus.close()
        await sim.stop()
        return out

    return asyncio.run(run())


def test_methane_detector_at_its_manuals_addresses(tmp_path: Path) -> None:
    """MSA ULTIMA X3 map: 'Base + 207' with the default base 40000 is address 40207 on the
    wire; a device whose base register was set to 0 says address_base: 0."""
    default, rebased = devices_from(
        tmp_path,
        "  - {id: ch4-1, host: 127.0.0.1, unit_id: 247, profile: methane-lel-detector, "
        "max_gap: 16}\n"
        "  - {id: ch4-2, host: 127.0.0.1, unit_id: 1, profile: methane-lel-detector, "
        "address_base: 0}\n",
    )
    addresses = {p.name: p.address for p in default.points}
    assert addresses["methane"] == 40207 and addresses["status"] == 40201
    assert {p.name: p.address for p in rebased.points}["methane"] == 207
    sim = ModbusSimulator()
    # every register from Base+201 to Base+217 exists on the device, so max_gap 16 bridges
    filler = ModbusPoint(name="filler", address=40201, type="string", length=34)
    sim.add_device(247, [*default.points, filler])
    sim.set_raw(247, "holding", 40201, [(1 << 5) | (1 << 6)])  # low and mid alarm relays
    sim.set_raw(247, "holding", 40207, list(struct.unpack(">2H", struct.pack(">f", 23.4))))
    sim.set_raw(247, "holding", 40217, [0xFFFB])  # -5 degC
    (results,) = poll(sim, default)
    assert sim.requests == [(247, 3, 40201, 17)], "one request for the whole map"
    values = {r.point: r.value for r in results}
    assert all(r.quality == "good" for r in results), results
    assert values["methane"] == 23.4
    assert (values["alarm_low"], values["alarm_mid"], values["alarm_high"]) == (True, True, False)
    assert values["device_fault"] is False and values["sensor_temperature"] == -5
    units = {p.name: p.unit for p in default.points}
    assert units["methane"] == "%LEL"


def test_rain_gauge_counts_tips_through_rollover_and_power_loss(tmp_path: Path) -> None:
    """XM9505: tips at holding 0x0000, 0.1 mm each. 65530 -> 4 is a roll-over (10 tips),
    a drop from 120 to 3 is a power cycle (3 tips since)."""
    (dev,) = devices_from(tmp_path, "  - {id: rain-1, host: 127.0.0.1, profile: rain-gauge}\n")
    assert [(p.name, p.address, p.counter) for p in dev.points] == [
        ("tips", 0, True),
        ("rainfall", 0, False),
    ]
    assert len(plan_blocks(dev.points)) == 1, "both points come from one register read"
    tracker = CounterTracker(dev)
    got = []
    for raw in (65530, 4, 120, 3):
        sim = ModbusSimulator()
        sim.add_device(1, list(dev.points))
        sim.set_raw(1, "holding", 0, [raw])
        (results,) = poll(sim, dev)
        rain = next(r.value for r in results if r.point == "rainfall")
        got.append((rain, tracker.deltas(results).get("tips")))
    assert got == [(6553.0, None), (0.4, 10), (12.0, 116), (0.3, 3)]
