"""CPU cost of the on-device seismic processing for 3 components at 250 Hz.

Runs the real K2 record (3 × 250 Hz) through what the agent runs per sample: recursive
STA/LTA and a trigger per component, and the 0.1–10 Hz PGA/PGV pipeline; repeats it to a
given length of record time and reports CPU seconds per second of record, i.e. the share
of one core needed to keep up in real time.

Prints a table and appends the figures to ``bench/results/seismic.jsonl``.

    .venv/bin/python -m bench.seismic --seconds 600 --runs 3
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

from agent.seismic import GroundMotion, RecursiveStaLta, SeismicProcessor, Trigger
from bench import common
from drivers.seismic_config import SeismicDevice
from drivers.seismic_stream import SeismicSerialReader, ascii_frame

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "seismic"
PER_COUNT = (1.1682748289245507e-06, 1.1682281943836448e-06, 1.1687419361571917e-06)


COLUMNS = [
    ("run", "run"),
    ("record_seconds", "record s"),
    ("cpu_s", "processing CPU-s"),
    ("cpu_s_per_s", "CPU-s per s of data"),
    ("with_frame_parsing_cpu_s_per_s", "with frame parsing"),
    ("us_per_sample_triplet", "µs per triplet"),
    ("load", "load 1/5/15"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=600.0, help="record time to process")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        fig = {"run": i + 1, "load": common.load(), **measure(args.seconds)}
        common.record("seismic", fig, args.results)
        runs.append(fig)
        print(common.table([fig], COLUMNS), flush=True)
    if len(runs) > 1:
        med = {**common.median_of(runs), "run": "median", "summary": True}
        med["loads"] = [r["load"] for r in runs]
        common.record("seismic", med, args.results)
        print(f"\nmedian of {len(runs)} runs:")
        print(common.table([med], COLUMNS))


def measure(seconds: float) -> dict[str, Any]:
    """CPU seconds for ``seconds`` of 3 × 250 Hz record: processing only, and with $SMP
    frame parsing."""
    fs = 250.0
    with (DATA / "kinemetrics_K2_STN_20020722_counts.csv").open() as f:
        rows = [
            (int(r["X"]) * PER_COUNT[0], int(r["Y"]) * PER_COUNT[1], int(r["Z"]) * PER_COUNT[2])
            for r in csv.DictReader(f)
        ]
    n = int(seconds * fs)
    stalta = [RecursiveStaLta(50, 500) for _ in range(3)]
    trig = [Trigger(4.0, 2.0) for _ in range(3)]
    gm = GroundMotion(fs)
    t0 = time.process_time()
    for i in range(n):
        x, y, z = rows[i % len(rows)]
        for c, v in enumerate((x, y, z)):
            trig[c].feed(stalta[c].feed(v))
        gm.feed(x, y, z)
    cpu = time.process_time() - t0
    # the whole path of the agent: $SMP frames parsed, checked and processed (summaries,
    # events, waveform), in chunks as a serial port delivers them
    dev = SeismicDevice.model_validate(
        {
            "driver": "seismic",
            "id": "b",
            "serial_port": "/dev/null",
            "sample_rate": fs,
            "channels": [{"name": c, "scale": PER_COUNT[i]} for i, c in enumerate("XYZ")],
            "sta": "200ms",
            "lta": "2s",
            "trigger_on": 4.0,
            "trigger_off": 2.0,
        }
    )
    raw = [
        (int(r[0] / PER_COUNT[0]), int(r[1] / PER_COUNT[1]), int(r[2] / PER_COUNT[2])) for r in rows
    ]
    frames = b"".join(ascii_frame(i, list(raw[i % len(raw)])) for i in range(n))
    proc = SeismicProcessor(dev)
    reader = SeismicSerialReader(dev, lambda k, c, ts: proc.feed(c, ts), lambda *a: None, lambda: 0)
    reader.asm.synced = True
    t0 = time.process_time()
    for off in range(0, len(frames), 4096):
        reader.handle(frames[off : off + 4096])
    cpu_all = time.process_time() - t0
    return {
        "components": 3,
        "sampling_rate_hz": fs,
        "record_seconds": seconds,
        "cpu_s": round(cpu, 3),
        "cpu_s_per_s": round(cpu / seconds, 5),
        "us_per_sample_triplet": round(cpu / n * 1e6, 2),
        "with_frame_parsing_cpu_s": round(cpu_all, 3),
        "with_frame_parsing_cpu_s_per_s": round(cpu_all / seconds, 5),
        "frames_read": reader.samples,
        "bad_frames": reader.errors,
    }


if __name__ == "__main__":
    main()
