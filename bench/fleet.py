"""Benchmark: the agent polling a Modbus TCP fleet of N devices × R registers.

    .venv/bin/python -m bench.fleet --devices 10 --registers 10 --seconds 60 --runs 3

Runs a real ``mosquitto`` on a free loopback port; ``bench/sim.py`` (N pymodbus devices of
R contiguous int16 holding registers, in its own process); a byte-counting TCP proxy
between the agent and the broker; the agent (``python -m agent run``, durable buffer on)
polling every device at ``--interval``; and a QoS 1 subscriber on the broker. After a
warm-up (and at least until every device has published), a window of a whole number of
intervals is measured. It starts half an interval away from the polls, so that no poll
straddles a boundary; the polls counted are those whose acquisition time is in the window.

Figures of the window, each for the measured process only (``/proc/PID``):

- ``delivered_ratio``: readings received / nominal (devices × registers × intervals);
- ``cpu_s_per_1000``: user + system CPU seconds per 1000 readings received;
- ``peak_rss_mb`` (``VmHWM``, since start, config loading included), ``pss_mb`` at the end;
- ``requests_per_cycle``: Modbus requests the simulator received, per device and interval;
- ``latency_p50_ms``/``p99``: acquisition time in the payload → arrival at the subscriber;
- ``payload_b``: MQTT payload bytes per reading; ``wire_up_b``: bytes the process sent to
  the broker (TCP payload: MQTT headers, topics, keep-alives) per reading;
- ``disk_mb_h``: ``write_bytes`` of ``/proc/PID/io`` per hour (buffer, WAL, log).

``--payload MODE`` sets the agent's telemetry payload mode (``mqtt.payload``); ``--peer
modpoll`` measures the Modbus-to-MQTT gateway ``modpoll`` (PyPI) in the agent's place, on
the same simulator, broker and proxy (installed on first use into ``bench/.peers/``).
Each run is appended as a JSON line to ``bench/results/fleet.jsonl``; with ``--runs`` > 1
the medians too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from agent.contract.compact import inflate, is_deflated
from agent.readings import parse_iso_ms
from bench import common
from bench.common import Collector, CountingProxy, SimProcess
from tests.helpers import Mosquitto, wait_until

PAYLOAD_KEY = "payload"
"""The ``mqtt`` key of the telemetry payload mode that ``--payload`` sets (issue 14's
compact telemetry). Without ``--payload`` the key is not written: the agent's default."""

PEERS = common.REPO / "bench" / ".peers"
MODPOLL = "modpoll==1.6.0"

COLUMNS = [
    ("subject", "subject"),
    ("fleet", "fleet"),
    ("delivered_ratio", "delivered"),
    ("cpu_s_per_1000", "CPU-s/1000"),
    ("peak_rss_mb", "peak RSS MB"),
    ("pss_mb", "PSS MB"),
    ("requests_per_cycle", "req/dev/cycle"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p99_ms", "p99 ms"),
    ("payload_b", "payload B/rdg"),
    ("wire_up_b", "wire B/rdg"),
    ("disk_mb_h", "disk MB/h"),
    ("first_reading_s", "1st rdg s"),
    ("load", "load 1/5/15"),
]


def polls_in(topic: str, payload: bytes) -> list[tuple[str, int, int]]:
    """(device, acquisition ms, readings) of each device poll a telemetry message carries.

    The agent's verbose payload (``telemetry/1``, docs/mqtt.md): one poll per message,
    ``ts`` and one member of ``points`` per reading; its compact payload
    (``telemetry_compact/1``, zlib-compressed or not): one poll per message or one per row
    of a batch, one value (or bad quality) per reading. The peer ``modpoll`` (``--timestamp``):
    one poll per message, ``timestamp`` in seconds and one member per register. A payload
    mode this does not know raises ValueError: teach it here (a batched message returns
    several polls).
    """
    device = topic.rsplit("/", 1)[-1]
    if is_deflated(payload):  # compact with compression: zlib
        payload = inflate(payload)
    doc = json.loads(payload)
    if isinstance(doc, dict) and "points" in doc and "ts" in doc:
        return [(device, parse_iso_ms(doc["ts"]), len(doc["points"]))]
    if isinstance(doc, dict) and doc.get("schema") == "telemetry_compact/1":
        t0 = parse_iso_ms(doc["ts"])
        rows = doc["rows"] if "rows" in doc else [[0, doc["v"], doc]]
        return [
            (device, t0 + row[0], sum(1 for v in row[1] if v is not None) + len(
                (row[2] if len(row) > 2 else {}).get("q", {})))
            for row in rows
        ]  # fmt: skip
    if isinstance(doc, dict) and "timestamp" in doc:
        return [(device, round(doc["timestamp"] * 1000), len(doc) - 1)]
    raise ValueError(f"a telemetry payload the benchmark cannot read: {payload[:80]!r}")


def agent_config(d: Path, devices: int, registers: int, interval: str, broker_port: int,
                 sim_port: int, payload: str | None) -> Path:  # fmt: skip
    """The agent's YAML: every device on the simulator's one TCP endpoint (one bus)."""
    devs = "".join(
        f"  - id: dev{u}\n    host: 127.0.0.1\n    port: {sim_port}\n    unit_id: {u}\n"
        f"    poll_interval: {interval}\n    points:\n"
        + "".join(
            f"      - {{name: r{i}, address: {i}, type: int16, scale: 0.1, unit: kPa}}\n"
            for i in range(registers)
        )
        for u in range(1, devices + 1)
    )
    mode = ""
    if payload:  # "compact", "compact+batch=5s", "compact+zlib", "compact+batch=5s+zlib"
        name, *extras = payload.split("+")
        mode = f"  {PAYLOAD_KEY}: {name}\n"
        for extra in extras:
            if extra.startswith("batch="):
                mode += f"  max_batch_delay: {extra.removeprefix('batch=')}\n"
            elif extra == "zlib":
                mode += "  compression: zlib\n"
            else:
                raise ValueError(f"--payload: {extra!r} is neither batch=DELAY nor zlib")
    cfg = d / "agent.yaml"
    cfg.write_text(
        f"version: 1\ngateway_id: bench\nstate_dir: {d / 'state'}\nlog_level: warning\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {broker_port}\n  client_id: bench\n{mode}"
        f"devices:\n{devs}"
    )
    return cfg


def modpoll_binary() -> Path:
    """The peer ``modpoll`` in its own virtualenv, installed with pip on first use."""
    venv = PEERS / "modpoll"
    exe = venv / "bin" / "modpoll"
    if not exe.exists():
        print(f"installing {MODPOLL} into {venv} (pip, once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
             MODPOLL],
            check=True,
        )  # fmt: skip
    return exe


def modpoll_command(d: Path, devices: int, registers: int, interval_s: float,
                    broker_port: int, sim_port: int) -> list[str]:  # fmt: skip
    """modpoll polling the same fleet: one poller (one request) of R registers per device,
    scale 0.1, QoS 1, one JSON message per device poll with its timestamp (the start of the
    polling cycle), no pause between devices (``--interval 0``; its default, 0.5 s, would
    make a cycle of 100 devices last 50 s). No unit in the
    payload (modpoll would put it in every key). No durable buffer (modpoll has none).
    MQTT 5: modpoll 1.6.0 fails to connect with 3.1.1 under paho-mqtt 2 (it passes
    ``clean_session`` to ``connect()``)."""
    csv = d / "modpoll.csv"
    csv.write_text(
        "".join(
            f"device,dev{u},{u},,\npoll,holding_register,0,{registers},BE_BE\n"
            + "".join(f"ref,r{i},{i},int16,r,,0.1\n" for i in range(registers))
            for u in range(1, devices + 1)
        )
    )
    return [
        str(modpoll_binary()), "-f", str(csv), "-d", "--tcp", "127.0.0.1",
        "--tcp-port", str(sim_port), "--rate", str(interval_s), "--interval", "0", "--timeout", "1",
        "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker_port), "--mqtt-qos", "1",
        "--mqtt-clientid", "bench-peer", "--mqtt-version", "5.0", "--mqtt-publish-topic-pattern",
        "peer/{{device_name}}", "--timestamp", "--loglevel", "ERROR",
    ]  # fmt: skip


def run(
    devices: int,
    registers: int,
    seconds: float,
    warmup: float = 10.0,
    interval: str = "1s",
    payload: str | None = None,
    peer: str | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """One measured run; returns its figures (see the module docstring) and the window's
    exact counts: ``polls_by_device`` and ``requests_by_unit`` (simulator)."""
    step = common.parse_interval(interval)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, common.runtime_dir() as run_dir:
        d = Path(tmp)
        broker = Mosquitto(d / "broker")
        broker.start()
        proxy = CountingProxy(broker.port)
        sim = SimProcess(d, devices, registers)
        sub = Collector(broker.port, "peer/#" if peer else "lifeline/+/telemetry/#")
        log = (d / "process.log").open("wb")
        if peer == "modpoll":
            cmd = modpoll_command(d, devices, registers, step, proxy.port, sim.port)
        elif peer is None:
            cfg = agent_config(d, devices, registers, interval, proxy.port, sim.port, payload)
            cmd = [sys.executable, "-m", "agent", "run", "--config", str(cfg)]
        else:
            raise SystemExit(f"unknown peer {peer!r} (known: modpoll)")
        env = dict(os.environ, PYTHONPATH=str(common.REPO), RUNTIME_DIRECTORY=str(run_dir))
        load0 = common.load()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=common.REPO)
        pid = proc.pid
        try:

            def published(devs: int) -> bool:
                """Whether ``devs`` devices have published; raises if the process ended."""
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{' '.join(cmd[:5])} exited with {proc.returncode}:\n"
                        + (d / "process.log").read_text(errors="replace")[-3000:]
                    )
                return len({t for t, _, _ in sub.messages()}) >= devs

            wait_until(lambda: published(1), 60, "a first reading", step=0.01)
            first_reading = time.monotonic() - started
            wait_until(lambda: published(devices), 60, "every device's first reading")
            time.sleep(max(0.0, warmup - (time.monotonic() - started)))
            # the window: k whole intervals, starting half an interval after a poll
            last_ts = max(p[1] for t, b, _ in sub.messages()[-devices:] for p in polls_in(t, b))
            k = max(1, round(seconds / step))
            t0 = last_ts / 1000 + step / 2
            while t0 < time.time() + 0.05:
                t0 += step
            t1 = t0 + k * step
            time.sleep(t0 - time.time())
            cpu0, th0, io0 = common.cpu_s(pid), common.thread_cpu(pid), common.io_counters(pid)
            up0, down0 = proxy.counts()
            req0 = sim.stats()
            time.sleep(t1 - time.time())
            cpu1, th1, io1 = common.cpu_s(pid), common.thread_cpu(pid), common.io_counters(pid)
            up1, down1 = proxy.counts()
            req1 = sim.stats()
            hwm, pss = common.status_kb(pid, "VmHWM"), common.pss_kb(pid)
            # what was polled in the window and is still on its way
            time.sleep(min(3.0, step) + 1.0)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
            sub.close()
            sim.stop()
            proxy.close()
            broker.stop()
    load1 = common.load()
    polls: dict[str, set[int]] = defaultdict(set)
    readings = 0
    lat: list[int] = []
    payload_bytes = 0
    for topic, body, arrived in sub.messages():
        inside = [p for p in polls_in(topic, body) if t0 * 1000 <= p[1] < t1 * 1000]
        if not inside:
            continue
        payload_bytes += len(body)
        for dev, ts, n in inside:
            if ts not in polls[dev]:
                polls[dev].add(ts)
                readings += n
            lat.append(arrived - ts)
    nominal = devices * registers * k
    window = t1 - t0
    lat.sort()
    by_unit = {
        int(u): n - req0["by_unit"].get(u, 0) for u, n in req1["by_unit"].items()
    }  # fmt: skip
    per = 1000 / readings if readings else math.nan
    return {
        "subject": f"peer:{peer}" if peer else "agent",
        "payload_mode": payload or "default",
        "fleet": f"{devices}x{registers}",
        "devices": devices,
        "registers": registers,
        "interval_s": step,
        "window_s": round(window, 3),
        "intervals": k,
        "readings": readings,
        "nominal": nominal,
        "delivered_ratio": round(readings / nominal, 5),
        "cpu_s": round(cpu1 - cpu0, 3),
        "cpu_s_per_1000": round((cpu1 - cpu0) * per, 5),
        "cpu_ms_per_s": round((cpu1 - cpu0) / window * 1000, 2),
        "cpu_s_by_thread": {n: round(v - th0.get(n, 0.0), 3) for n, v in th1.items()},
        "peak_rss_mb": round(hwm / 1024, 1),
        "pss_mb": round(pss / 1024, 1),
        "requests": req1["requests"] - req0["requests"],
        "requests_per_cycle": round((req1["requests"] - req0["requests"]) / (devices * k), 4),
        "latency_p50_ms": statistics.median(lat) if lat else None,
        "latency_p99_ms": lat[min(len(lat) - 1, math.ceil(len(lat) * 0.99) - 1)] if lat else None,
        "payload_b": round(payload_bytes / readings, 2) if readings else None,
        "wire_up_b": round((up1 - up0) / readings, 2) if readings else None,
        "wire_down_b": round((down1 - down0) / readings, 2) if readings else None,
        "disk_mb_h": round((io1["write_bytes"] - io0["write_bytes"]) / window * 3600 / 1e6, 2),
        "first_reading_s": round(first_reading, 2),
        "load": load0,
        "load_end": load1,
        "polls_by_device": {dev: len(ts) for dev, ts in sorted(polls.items())},
        "requests_by_unit": by_unit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--registers", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60, help="measured window, s")
    ap.add_argument("--warmup", type=float, default=10, help="s after start before the window")
    ap.add_argument("--interval", default="1s", help="poll interval, e.g. 1s or 500ms")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--payload",
        help=f"the agent's telemetry payload mode (mqtt.{PAYLOAD_KEY}), with +batch=DELAY "
        "(mqtt.max_batch_delay) and +zlib (mqtt.compression), e.g. compact+batch=5s+zlib",
    )
    ap.add_argument("--peer", choices=["modpoll"], help="measure this gateway instead")
    ap.add_argument("--results", type=Path, help="JSON lines file (default bench/results/)")
    a = ap.parse_args()
    if a.registers > 125:
        ap.error("--registers: at most 125 (one read request per device)")
    runs = []
    for i in range(a.runs):
        fig = run(a.devices, a.registers, a.seconds, a.warmup, a.interval, a.payload, a.peer)
        fig["run"] = i + 1
        common.record("fleet", fig, a.results)
        runs.append(fig)
        print(common.table([fig], COLUMNS), flush=True)
    if len(runs) > 1:
        med = common.median_of(runs)
        med["run"] = f"median of {len(runs)}"
        med["load"] = [statistics.median(r["load"][j] for r in runs) for j in range(3)]
        med["loads"] = [r["load"] for r in runs]
        common.record("fleet", {**med, "summary": True}, a.results)
        print(f"\nmedian of {len(runs)} runs:")
        print(common.table([med], COLUMNS))


if __name__ == "__main__":
    main()
