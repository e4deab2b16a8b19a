"""Benchmark: start-up, from the agent's process start to its first reading published.

    .venv/bin/python -m bench.startup --devices 10 --registers 10 --runs 5

The same fleet as ``bench/fleet.py`` (simulator and broker already up, a subscriber
connected): ``python -m agent run`` is started, and the time from just before the
process is created (``subprocess.Popen``) to the arrival of its first telemetry message
at the subscriber is measured; the agent is stopped, and this is done ``--runs`` times
with a fresh state directory each time. Prints each start and the median, and appends
them to ``bench/results/startup.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Collector, SimProcess
from bench.fleet import agent_config
from tests.helpers import Mosquitto, wait_until


def starts(devices: int, registers: int, runs: int) -> list[dict[str, Any]]:
    """``runs`` cold starts of the agent on one simulator and broker; per start: seconds
    to the first telemetry message and to one from every device."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        broker = Mosquitto(d / "broker")
        broker.start()
        sim = SimProcess(d, devices, registers)
        try:
            for i in range(runs):
                run = d / f"run{i}"
                (run / "run").mkdir(parents=True)
                cfg = agent_config(run, devices, registers, "1s", broker.port, sim.port, None)
                sub = Collector(broker.port, "lifeline/+/telemetry/#")
                env = dict(
                    os.environ, PYTHONPATH=str(common.REPO), RUNTIME_DIRECTORY=str(run / "run")
                )
                load = common.load()
                with (run / "agent.log").open("wb") as log:
                    t0 = time.monotonic()
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                        stdout=log,
                        stderr=log,
                        env=env,
                        cwd=common.REPO,
                    )
                    try:
                        wait_until(sub.messages, 60, "the first reading", step=0.002)
                        first = time.monotonic() - t0
                        wait_until(
                            lambda s=sub: len({t for t, _, _ in s.messages()}) >= devices,
                            60,
                            "a reading of every device",
                            step=0.002,
                        )
                        every = time.monotonic() - t0
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(20)
                        sub.close()
                out.append(
                    {"run": i + 1, "first_s": round(first, 3), "every_device_s": round(every, 3),
                     "load": load}
                )  # fmt: skip
        finally:
            sim.stop()
            broker.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--registers", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--results", type=Path)
    a = ap.parse_args()
    runs = starts(a.devices, a.registers, a.runs)
    fleet = f"{a.devices}x{a.registers}"
    med = {
        "fleet": fleet,
        "runs": len(runs),
        "first_s": statistics.median(r["first_s"] for r in runs),
        "every_device_s": statistics.median(r["every_device_s"] for r in runs),
        "first_s_all": [r["first_s"] for r in runs],
        "load": runs[0]["load"],
        "load_end": common.load(),
        "summary": True,
    }
    common.record("startup", med, a.results)
    cols = [("run", "run"), ("first_s", "to 1st reading s"), ("every_device_s", "every device s"),
            ("load", "load 1/5/15")]  # fmt: skip
    print(common.table([*runs, {**med, "run": "median"}], cols))


if __name__ == "__main__":
    main()
