"""Bytes per reading of each telemetry payload mode, as the platform receives them (the
MQTT payload with its ``seq``), over realistic values: a pure-function measurement of the
encoders, no broker.

python -m bench.payload_size [--registers 10] [--polls 600] [--batch 5] [--json FILE]

A device of R points polled every second with values of the kinds the shipped profiles
read (pressures and levels with one to three decimals, a temperature, a running counter,
a status flag, small codes), varying as a slow signal with noise does. Every mode encodes
the same polls; ``compact+batch`` puts ``--batch`` consecutive polls in one message
(``mqtt.max_batch_delay`` of that many poll intervals). ``cbor`` is the compact message
as CBOR (RFC 8949) when the package ``cbor2`` is installed, for comparison only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.buffer import payload_with_seq
from agent.contract.compact import CompactEncoder, deflate
from agent.contract.payloads import InfoPoint, layout_hash
from agent.contract.telemetry import TelemetryEncoder
from drivers.base import PointResult

T0_MS = 1_784_534_400_123
"""2026-07-20T08:00:00.123Z: a time stamp of the year the dictionary names."""
SEQ0 = 1_048_576
"""A seq of a gateway that has been running for a while (7 digits)."""


def _pressure(t: int, r: random.Random) -> float:
    return round(301.2 + 2 * math.sin(t / 60) + r.gauss(0, 0.1), 1)


def _level(t: int, r: random.Random) -> float:
    return round(0.412 + 0.05 * math.sin(t / 300) + r.gauss(0, 0.002), 3)


KINDS: list[tuple[str, str | None, str, Callable[[int, random.Random], Any]]] = [
    ("pressure", "kPa", "int16", _pressure),
    ("temperature", "degC", "int16", lambda t, r: round(21.7 + r.gauss(0, 0.1), 1)),
    ("level", "m", "uint16", _level),
    ("total", "m3", "uint32", lambda t, r: 75_535 + t // 7),
    ("pump_on", None, "bool", lambda t, r: (t // 45) % 2 == 0),
    ("flow", "m3/h", "float32", lambda t, r: round(12.5 + r.gauss(0, 0.05), 2)),
    ("voltage", "V", "uint16", lambda t, r: round(230.1 + r.gauss(0, 0.3), 1)),
    ("frequency", "Hz", "uint16", lambda t, r: round(49.98 + r.gauss(0, 0.01), 2)),
    ("status", None, "uint16", lambda t, r: 1),
    ("alarm_code", None, "uint16", lambda t, r: 0),
]  # fmt: skip
"""(name, unit, type, value at second t) of the points, cycled for more than ten."""


def device_points(registers: int) -> list[InfoPoint]:
    """The points of the measured device, as ``info`` lists them."""
    out = []
    for i in range(registers):
        name, unit, dtype, _ = KINDS[i % len(KINDS)]
        out.append(InfoPoint(f"{name}_{i // len(KINDS)}" if i >= len(KINDS) else name, unit, dtype))
    return out


def polls(registers: int, count: int, seed: int = 1) -> list[tuple[int, list[PointResult]]]:
    """``count`` polls one second apart: (UTC ms, results)."""
    rnd = random.Random(seed)
    points = device_points(registers)
    out = []
    for t in range(count):
        results = [
            PointResult(p.name, KINDS[i % len(KINDS)][3](t, rnd)) for i, p in enumerate(points)
        ]
        out.append((T0_MS + t * 1000 + rnd.randint(0, 3), results))
    return out


def measure(registers: int = 10, count: int = 600, batch: int = 5) -> dict[str, float]:
    """Mode → mean MQTT payload bytes per reading over ``count`` polls of a device of
    ``registers`` points (the message as published: with its seq, compressed when the
    mode compresses)."""
    points = device_points(registers)
    data = polls(registers, count)
    verbose = TelemetryEncoder(
        "zz-jinshui-gw017", "pump-station-3", {p.name: p.unit for p in points}
    )
    compact = CompactEncoder([p.name for p in points], layout_hash(points))
    readings = count * registers
    seq = SEQ0

    def total(messages: list[bytes]) -> float:
        return sum(len(m) for m in messages) / readings

    single = []
    plain = []
    for ts, results in data:
        plain.append(payload_with_seq(seq, verbose.encode(ts, results)))
        single.append(payload_with_seq(seq, compact.encode(ts, results)))
        seq += 1
    batched = []
    for k in range(0, count, batch):
        rows = [compact.row(ts, results) for ts, results in data[k : k + batch]]
        batched.append(payload_with_seq(seq, compact.message(rows)))
        seq += 1
    out = {
        "verbose": total(plain),
        "compact": total(single),
        "compact+zlib": total([deflate(m) for m in single]),
        "compact+batch": total(batched),
        "compact+batch+zlib": total([deflate(m) for m in batched]),
    }
    try:
        import cbor2  # type: ignore[import-not-found]
    except ImportError:
        return out
    out["compact as cbor"] = total([cbor2.dumps(json.loads(m), canonical=True) for m in single])
    out["compact+batch as cbor"] = total(
        [cbor2.dumps(json.loads(m), canonical=True) for m in batched]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.payload_size", description=__doc__)
    ap.add_argument("--registers", type=int, default=10)
    ap.add_argument("--polls", type=int, default=600)
    ap.add_argument("--batch", type=int, default=5, help="polls per batch message")
    ap.add_argument("--json", type=Path, help="append the figures as one JSON line")
    args = ap.parse_args(argv)
    figures = measure(args.registers, args.polls, args.batch)
    print(f"{args.registers} points per device, {args.polls} polls, batches of {args.batch}")
    print(f"{'mode':<24} {'bytes/reading':>13}")
    for mode, b in figures.items():
        print(f"{mode:<24} {b:>13.2f}")
    if args.json is not None:
        line = {"bench": "payload_size", **vars(args), "json": None, "bytes_per_reading": figures}
        with args.json.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
