"""Benchmark: a million buffered readings drained to a subscriber while live polling goes on.

The buffer is filled with ``--readings`` telemetry rows (a 10-point poll each, flagged
historical, as an outage leaves them); then the agent starts with a real ``mosquitto``
there, no drain limit (``buffer.drain_rate: 0``) and a live device polled every 200 ms.
Prints readings/s of the drain and the live readings' largest lag, then the figures as
one JSON line. The same code with 200,000 rows is the test
``test_a_large_backlog_drains_while_live_stays_live``.

    .venv/bin/python -m bench.drain --readings 1000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tests.helpers import Mosquitto
from tests.test_reliability import drain_backlog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        broker = Mosquitto(d / "broker")
        broker.start()
        try:
            figures = drain_backlog(d, broker, args.readings)
        finally:
            broker.stop()
    print(
        f"{figures['readings']:,} buffered readings: filled in {figures['fill_s']} s, drained "
        f"in {figures['drain_s']} s ({figures['msg_per_s']:,} msg/s); live readings "
        f"{figures['live_readings']}, largest lag {figures['live_lag_max_ms']} ms"
    )
    print(json.dumps({"bench": "drain", "at": round(time.time()), **figures}))


if __name__ == "__main__":
    main()
