"""Benchmark: a million buffered messages drained to a subscriber while live polling goes on.

The buffer is filled with ``--messages`` telemetry rows (a 10-point poll each, flagged
historical, as an outage leaves them); then the agent starts with a real ``mosquitto``
there, no drain limit (``buffer.drain_rate: 0``) and a live device polled every 200 ms.
Prints messages/s and point readings/s (10 per message) of the drain and the live
readings' largest lag, and appends the figures to ``bench/results/drain.jsonl``. The same
code with 200,000 rows is the test ``test_a_large_backlog_drains_while_live_stays_live``.

    .venv/bin/python -m bench.drain --messages 1000000 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench import common
from tests.helpers import Mosquitto
from tests.test_reliability import drain_backlog

POINTS_PER_MESSAGE = 10
"""Points of each buffered poll (``tests.test_reliability.prefill_backlog``)."""

COLUMNS = [
    ("run", "run"),
    ("readings", "messages"),
    ("fill_s", "fill s"),
    ("drain_s", "drain s"),
    ("msg_per_s", "messages/s"),
    ("readings_per_s", "point readings/s"),
    ("live_readings", "live polls"),
    ("live_lag_max_ms", "live lag max ms"),
    ("load", "load 1/5/15"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", "--readings", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        load = common.load()
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            broker = Mosquitto(d / "broker")
            broker.start()
            try:
                figures = drain_backlog(d, broker, args.messages)
            finally:
                broker.stop()
        fig = {
            "run": i + 1,
            **figures,
            "readings_per_s": figures["msg_per_s"] * POINTS_PER_MESSAGE,
            "load": load,
            "load_end": common.load(),
        }
        common.record("drain", fig, args.results)
        runs.append(fig)
        print(common.table([fig], COLUMNS), flush=True)
    if len(runs) > 1:
        med = {**common.median_of(runs), "run": "median", "summary": True}
        med["load"] = [statistics.median(r["load"][j] for r in runs) for j in range(3)]
        med["loads"] = [r["load"] for r in runs]
        common.record("drain", med, args.results)
        print(f"\nmedian of {len(runs)} runs:")
        print(common.table([med], COLUMNS))


if __name__ == "__main__":
    main()
