"""Simulated devices for the benchmark, in their own process so their CPU is not counted.

python -m bench.sim --devices 10 --registers 10 --port-file FILE
"""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path

from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--registers", type=int, required=True)
    ap.add_argument("--port-file", type=Path, required=True)
    args = ap.parse_args()
    sim = ModbusSimulator(tick=0.5)
    points = [
        ModbusPoint(name=f"r{i}", address=i, type="int16", scale=0.1, unit="kPa")
        for i in range(args.registers)
    ]
    for unit in range(1, args.devices + 1):
        sim.add_device(unit, points, {"r0": lambda t: round(100 + 5 * math.sin(t), 1)})

    async def run() -> None:
        await sim.start()
        args.port_file.write_text(str(sim.port))
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
