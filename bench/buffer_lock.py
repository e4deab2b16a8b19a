"""Benchmark: the buffer file write-locked by another process for 70 s (issue 12's figures).

Another process holds ``BEGIN EXCLUSIVE`` on the agent's ``buffer.db`` for ``--lock``
seconds while two devices are polled every 100 ms, with ``buffer.stall_after`` at
``--stall-after`` (default: the default, 30 s). Checks and prints what the test
``test_buffer_write_locked_by_another_process_is_reported`` checks with a 20 s lock and a
5 s stall_after (the same code): health says ``buffer_error`` within stall_after + the
health interval, the ``buffer_stalled`` and ``buffer_resumed`` notices go out, the log
says how many readings wait in memory, and every reading arrives afterwards.

    .venv/bin/python -m bench.buffer_lock --lock 70
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tests.helpers import Mosquitto
from tests.test_reliability import buffer_locked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", type=float, default=70.0, help="seconds the lock is held")
    ap.add_argument("--stall-after", type=float, default=30.0, help="buffer.stall_after, s")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        broker = Mosquitto(d / "broker")
        broker.start()
        try:
            figures = buffer_locked(d, broker, args.stall_after, args.lock)
        finally:
            broker.stop()
    print(
        f"buffer locked {args.lock:g} s (stall_after {args.stall_after:g} s): health said "
        f"buffer_error after {figures['health_error_after_s']} s; "
        f"{figures['readings_waiting_at_stall']} readings waited in memory at the stall, "
        f"{figures['written_at_resume']} messages written at the resume; "
        f"{figures['messages']} messages in all, every one received"
    )
    print(json.dumps({"bench": "buffer_lock", "at": round(time.time()), **figures}))


if __name__ == "__main__":
    main()
