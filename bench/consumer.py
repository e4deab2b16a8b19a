"""Benchmark: messages per second the reference consumer stores in PostgreSQL.

A real ``mosquitto`` and a throwaway database on the machine's PostgreSQL
(127.0.0.1:5432); ``--consumers`` processes of ``edge-agent consume`` subscribe once to
``$share/bench/lifeline/+/#`` (persistent sessions) and stop; ``--messages`` telemetry
messages (10 points each, valid against ``telemetry/1``) of ``--gateways`` gateways are
published while they are away, so the broker holds the backlog; then the consumers start
again and the time from their start until every message is a row of ``edge_messages`` is
measured. Prints msg/s and the figures as one JSON line.

    .venv/bin/python -m bench.consumer --consumers 1 --messages 40000
    .venv/bin/python -m bench.consumer --consumers 2 --messages 40000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from agent.readings import iso_ms
from tests.helpers import REPO, Mosquitto, wait_until

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def consumers(n: int, port: int, dsn: str, logs: Path) -> list[subprocess.Popen[bytes]]:
    out = []
    for i in range(n):
        log = open(logs / f"consumer{i}.log", "ab")  # noqa: SIM115
        out.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    "consume",
                    "--mqtt",
                    f"127.0.0.1:{port}",
                    "--share",
                    "bench",
                    "--client-id",
                    f"bench-{i}",
                    "--postgres",
                    dsn,
                ],
                stdout=log,
                stderr=log,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                cwd=REPO,
            )
        )
    return out


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(30)


def publish(port: int, gateways: int, messages: int) -> float:
    """Publish ``messages`` QoS 1 telemetry messages; seconds until all acknowledged."""
    done = threading.Event()
    acked = [0]

    def on_publish(*_: object) -> None:
        acked[0] += 1
        if acked[0] == messages:
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-gateways")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.monotonic()
    now = time.time_ns() // 1_000_000
    points = {f"p{k}": {"value": k * 1.5, "unit": "m", "quality": "good"} for k in range(10)}
    for n in range(messages):
        gw, seq = f"gw{n % gateways}", n // gateways + 1
        doc = {"seq": seq, "schema": "telemetry/1", "gateway": gw, "device": "d1",
               "ts": iso_ms(now + seq), "points": points}  # fmt: skip
        c.publish(f"lifeline/{gw}/telemetry/d1", json.dumps(doc), qos=1)
    assert done.wait(300), f"{acked[0]} of {messages} acknowledged"
    took = time.monotonic() - t0
    c.disconnect()
    c.loop_stop()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--consumers", type=int, default=1)
    ap.add_argument("--messages", type=int, default=40_000)
    ap.add_argument("--gateways", type=int, default=10)
    args = ap.parse_args()
    name = f"edge_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            broker = Mosquitto(d / "broker")
            broker.start()
            try:
                first = consumers(args.consumers, broker.port, dsn, d)
                for i in range(args.consumers):
                    log = d / f"consumer{i}.log"
                    wait_until(lambda log=log: "subscribed" in log.read_text(), 20, "subscribed")
                stop(first)
                pub_s = publish(broker.port, args.gateways, args.messages)
                t0 = time.monotonic()
                procs = consumers(args.consumers, broker.port, dsn, d)
                with psycopg.connect(dsn, autocommit=True) as conn:

                    def count() -> int:
                        row = conn.execute("SELECT count(*) FROM edge_messages").fetchone()
                        return int(row[0]) if row else 0

                    wait_until(lambda: count() >= args.messages, 600, "every message", 0.1)
                took = time.monotonic() - t0
                stop(procs)
            finally:
                broker.stop()
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    figures = {
        "consumers": args.consumers,
        "messages": args.messages,
        "gateways": args.gateways,
        "publish_s": round(pub_s, 2),
        "consume_s": round(took, 2),
        "msg_per_s": round(args.messages / took),
    }
    print(
        f"{args.consumers} consumer(s): {args.messages:,} messages into PostgreSQL in "
        f"{took:.1f} s ({figures['msg_per_s']:,} msg/s, start of the processes included)"
    )
    print(json.dumps({"bench": "consumer", "at": round(time.time()), **figures}))


if __name__ == "__main__":
    main()
