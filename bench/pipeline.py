"""Benchmark: CPU per 1000 readings, peak RSS and poll->broker latency of the agent.

Runs mosquitto, a simulated TCP-to-RS-485 converter with N devices x R registers (its own
process), the agent (``python -m agent run``, durable buffer on) and a subscriber. CPU time
and RSS are read from /proc for the agent process only; CPU is counted between the end of a
warm-up and the end of the run.

    .venv/bin/python -m bench.pipeline --devices 10 --registers 10 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.readings import parse_iso_ms
from tests.helpers import PROFILES, Mosquitto, Subscriber, wait_until

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc/PID/stat (utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (main loop, buffer thread, executor)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(devices: int, registers: int, seconds: float, warmup: float, interval: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        broker = Mosquitto(d / "broker")
        broker.start()
        port_file = d / "sim.port"
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.sim",
                "--devices",
                str(devices),
                "--registers",
                str(registers),
                "--port-file",
                str(port_file),
            ]
        )
        wait_until(lambda: port_file.exists() and port_file.read_text(), 20, "simulator")
        sim_port = int(port_file.read_text())
        cfg = d / "agent.yaml"
        devs = "".join(
            f"  - id: dev{u}\n    host: 127.0.0.1\n    port: {sim_port}\n    unit_id: {u}\n"
            f"    poll_interval: {interval}\n    points:\n"
            + "".join(
                f"      - {{name: r{i}, address: {i}, type: int16, scale: 0.1, unit: kPa}}\n"
                for i in range(registers)
            )
            for u in range(1, devices + 1)
        )
        cfg.write_text(
            f"gateway_id: bench\nstate_dir: {d / 'state'}\nprofiles_dir: {PROFILES}\n"
            f"log_level: warning\nmqtt:\n  port: {broker.port}\n  client_id: bench\n"
            f"devices:\n{devs}"
        )
        sub = Subscriber(broker.port, "lifeline/#")
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)])
        time.sleep(warmup)
        (u0, s0), n0 = cpu_times(agent.pid), len(sub.telemetry())
        threads0 = thread_cpu(agent.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        (u1, s1), n1 = cpu_times(agent.pid), len(sub.telemetry())
        cpu0, cpu1 = u0 + s0, u1 + s1
        elapsed = time.monotonic() - t0
        rss = peak_rss_mb(agent.pid)
        threads1 = thread_cpu(agent.pid)
        per_thread = {k: round(v - threads0.get(k, 0.0), 3) for k, v in threads1.items()}
        msgs = sub.telemetry()[n0:n1]
        # latency: acquisition timestamp -> arrival at the subscriber (wall clock)
        lat = []
        for m in msgs:
            doc = json.loads(m.payload)
            lat.append(m.wall_ms - parse_iso_ms(doc["ts"]))
        agent.send_signal(signal.SIGTERM)
        agent.wait(20)
        sub.close()
        sim.terminate()
        sim.wait(10)
        broker.stop()
    readings = (n1 - n0) * registers
    lat.sort()
    return {
        "devices": devices,
        "registers": registers,
        "interval": interval,
        "seconds": round(elapsed, 1),
        "messages": n1 - n0,
        "readings": readings,
        "cpu_s": round(cpu1 - cpu0, 3),
        "cpu_s_user": round(u1 - u0, 3),
        "cpu_s_system": round(s1 - s0, 3),
        "cpu_s_per_1000_readings": round((cpu1 - cpu0) / readings * 1000, 5) if readings else None,
        "cpu_ms_per_s": round((cpu1 - cpu0) / elapsed * 1000, 2),
        "cpu_s_by_thread": per_thread,
        "peak_rss_mb": round(rss, 1),
        "latency_ms_p50": round(statistics.median(lat), 1) if lat else None,
        "latency_ms_p99": round(lat[max(0, int(len(lat) * 0.99) - 1)], 1) if lat else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--registers", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--interval", default="1s")
    a = ap.parse_args()
    print(json.dumps(run(a.devices, a.registers, a.seconds, a.warmup, a.interval)))


if __name__ == "__main__":
    main()
