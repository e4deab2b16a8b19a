"""Benchmark: RS-485 efficiency, the achieved poll cycle of an RTU bus vs its wire time.

    .venv/bin/python -m bench.rtu --units 10 --registers 10 --baud 9600 --seconds 30 --runs 3

A serial line is two linked pseudo-terminals (``socat``); on the far end a Modbus RTU
slave of ``--units`` units × ``--registers`` holding registers that keeps the timing of a
real line, which a pty does not: each reply is written when it would have finished
arriving over the wire, i.e. after the request's own transmission time, the 3.5-character
silence that ends a frame, and the reply's transmission time (a character is 1 start +
8 data + parity + stop bits: 11 bits by default, 8N2, which the spec pairs with no parity
and which times like its default 8E1, Modbus over Serial Line V1.02, 2.5.1; a pty refuses
parity settings; t3.5 as in 2.5.1.1), with no turnaround time of its own. The agent polls every
unit at its shortest interval (50 ms), so the bus is never idle by schedule.

The wire-time minimum of one cycle is, per unit, request (8 bytes) + t3.5 + reply
(5 + 2 × R bytes) + t3.5. The achieved cycle is the mean time between two requests to the
same unit at the slave, over the window. The slave also counts requests that came less
than t3.5 after its last reply ended (``gap_violations``: a master that does not keep the
inter-frame silence would look faster than the wire allows).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from drivers.modbus.line import char_time, crc16, min_frame_gap
from tests.helpers import Mosquitto, start_line, wait_until

COLUMNS = [
    ("bus", "bus"),
    ("wire_min_ms", "wire-time minimum ms"),
    ("cycle_ms", "achieved cycle ms"),
    ("ratio", "achieved / minimum"),
    ("gap_violations", "gap violations"),
    ("load", "load 1/5/15"),
]


def wire_minimum(units: int, registers: int, baud: int, stopbits: int) -> float:
    """Seconds of one poll cycle on the wire: per unit, an FC 03 request (8 bytes), t3.5,
    the reply (5 + 2 × registers bytes), t3.5 (Modbus over Serial Line V1.02, 2.5.1)."""
    c = char_time(baud, "N", stopbits)
    return units * ((8 + 5 + 2 * registers) * c + 2 * min_frame_gap(baud, "N", stopbits))


def serve(port: str, units: int, registers: int, baud: int, stopbits: int, stats: Path) -> None:
    """The wire-timed slave (see the module docstring); on SIGTERM writes its request times
    per unit and its gap violations to ``stats`` as JSON."""
    c, gap = char_time(baud, "N", stopbits), min_frame_gap(baud, "N", stopbits)
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    times: dict[int, list[float]] = {u: [] for u in range(1, units + 1)}
    violations = 0
    reply_end = 0.0

    def done(*_: Any) -> None:
        stats.write_text(json.dumps({"times": times, "gap_violations": violations}))
        os._exit(0)

    signal.signal(signal.SIGTERM, done)
    buf = b""
    while True:
        buf += os.read(fd, 256)
        while len(buf) >= 8:
            frame, rest = buf[:8], buf[8:]
            if crc16(frame[:6]) != frame[6:]:
                buf = buf[1:]  # resynchronise on the next byte
                continue
            buf = rest
            now = time.monotonic()
            unit, fc, addr, count = struct.unpack(">BBHH", frame[:6])
            if reply_end and now - reply_end < gap - 0.0005:
                violations += 1
            if unit not in times or fc != 3 or addr + count > registers:
                continue  # not ours, or a request this slave does not serve: no answer
            times[unit].append(now)
            pdu = bytes([unit, 3, 2 * count]) + bytes(2 * count)
            reply = pdu + crc16(pdu)
            until = now + 8 * c + gap + len(reply) * c
            time.sleep(max(0.0, until - time.monotonic() - 0.001))
            while time.monotonic() < until:
                pass
            os.write(fd, reply)
            reply_end = time.monotonic()


def run(units: int, registers: int, baud: int, stop: int, seconds: float,
        warmup: float) -> dict[str, Any]:  # fmt: skip
    """One measured run; returns the figures (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp, common.runtime_dir() as run_dir:
        d = Path(tmp)
        far, near = str(d / "ttyA"), str(d / "ttyB")
        line = start_line(far, near)
        broker = Mosquitto(d / "broker")
        broker.start()
        stats = d / "slave.json"
        slave = subprocess.Popen(
            [sys.executable, "-m", "bench.rtu", "--serve", far, "--units", str(units),
             "--registers", str(registers), "--baud", str(baud), "--stopbits", str(stop),
             "--stats", str(stats)],
            cwd=common.REPO,
        )  # fmt: skip
        devs = "".join(
            f"  - id: u{u}\n    driver: modbus_rtu\n    serial_port: {near}\n"
            f"    baudrate: {baud}\n    parity: N\n    stopbits: {stop}\n    unit_id: {u}\n"
            "    poll_interval: 50ms\n    timeout: 1s\n    points:\n"
            + "".join(f"      - {{name: r{i}, address: {i}}}\n" for i in range(registers))
            for u in range(1, units + 1)
        )
        cfg = d / "agent.yaml"
        cfg.write_text(
            f"version: 1\ngateway_id: bench\nstate_dir: {d / 'state'}\nlog_level: error\n"
            f"mqtt:\n  host: 127.0.0.1\n  port: {broker.port}\n  client_id: bench\n"
            f"devices:\n{devs}"
        )
        env = dict(os.environ, PYTHONPATH=str(common.REPO), RUNTIME_DIRECTORY=str(run_dir))
        load = common.load()
        with (d / "agent.log").open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                stdout=log,
                stderr=log,
                env=env,
                cwd=common.REPO,
            )
            time.sleep(warmup)
            t0 = time.monotonic()
            time.sleep(seconds)
            t1 = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            agent.wait(20)
        agent_log = (d / "agent.log").read_text(errors="replace")
        slave.send_signal(signal.SIGTERM)
        slave.wait(10)
        doc = json.loads(wait_until(lambda: stats.exists() and stats.read_text(), 10, "stats"))
        line.terminate()
        line.wait(5)
        broker.stop()
    cycles = []
    for ts in doc["times"].values():
        inside = [t for t in ts if t0 <= t < t1]
        if len(inside) >= 2:
            cycles.append((inside[-1] - inside[0]) / (len(inside) - 1))
    if len(cycles) < units:
        raise RuntimeError(
            f"only {len(cycles)} of {units} units were polled in the window; the agent's "
            f"log:\n{agent_log[-3000:]}"
        )
    cycle = statistics.mean(cycles)
    minimum = wire_minimum(units, registers, baud, stop)
    return {
        "bus": f"{units}x{registers} @{baud} 8N{stop}",
        "units": units,
        "registers": registers,
        "baud": baud,
        "bits_per_char": round(char_time(baud, "N", stop) * baud),
        "window_s": round(t1 - t0, 1),
        "wire_min_ms": round(minimum * 1000, 2),
        "cycle_ms": round(cycle * 1000, 2),
        "ratio": round(cycle / minimum, 4),
        "gap_violations": doc["gap_violations"],
        "load": load,
        "load_end": common.load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=10)
    ap.add_argument("--registers", type=int, default=10)
    ap.add_argument("--baud", type=int, default=9600)
    ap.add_argument("--stopbits", type=int, choices=[1, 2], default=2,
                    help="8N2 (11 bits a character, as 8E1) or 8N1 (10 bits)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--results", type=Path)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        assert a.stats is not None
        serve(a.serve, a.units, a.registers, a.baud, a.stopbits, a.stats)
        return
    runs = []
    for i in range(a.runs):
        fig = {**run(a.units, a.registers, a.baud, a.stopbits, a.seconds, a.warmup), "run": i + 1}
        common.record("rtu", fig, a.results)
        runs.append(fig)
        print(common.table([fig], COLUMNS), flush=True)
    if len(runs) > 1:
        med = {**common.median_of(runs), "run": f"median of {len(runs)}", "summary": True}
        med["loads"] = [r["load"] for r in runs]
        common.record("rtu", med, a.results)
        print(f"\nmedian of {len(runs)} runs:")
        print(common.table([med], COLUMNS))


if __name__ == "__main__":
    main()
