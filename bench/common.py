"""What the benchmarks share: figures of a process from /proc, the machine and its load, a
byte-counting TCP proxy, a lean MQTT subscriber, the simulator process, the results file
and the printed table.

Every figure of a process is read from outside it (``/proc/PID/...``, Linux ``proc(5)``),
so the benchmark's own work (subscriber, proxy, simulator) is never counted in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TICKS = os.sysconf("SC_CLK_TCK")


# -- a process, from /proc ------------------------------------------------------------------


@contextlib.contextmanager
def runtime_dir() -> Iterator[Path]:
    """A fresh directory for ``RUNTIME_DIRECTORY`` (where the agent writes its state file
    every second), on tmpfs as systemd's ``RuntimeDirectory=`` under ``/run`` is:
    ``/dev/shm`` where it is writable, else the system's temporary directory."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
    with tempfile.TemporaryDirectory(prefix="edge-agent-run-", dir=where) as d:
        yield Path(d)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and of its children it has waited for
    (``utime``, ``stime``, ``cutime``, ``cstime`` of ``/proc/PID/stat``), in clock ticks
    (10 ms on most kernels)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (``python`` is the main loop, ``buffer_0`` SQLite)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return out


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status``, e.g. ``VmHWM`` (peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def pss_kb(pid: int) -> int:
    """Proportional set size (shared pages divided among the processes mapping them), from
    ``/proc/PID/smaps_rollup`` (Linux ≥ 4.14)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise KeyError("Pss")


def io_counters(pid: int) -> dict[str, int]:
    """``/proc/PID/io``: ``write_bytes`` is what the process caused to be written to
    storage (counted when the page is dirtied), ``wchar`` every byte passed to write()."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


# -- the machine ------------------------------------------------------------------------------


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (``uptime``)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python: what a figure was measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, IndexError, ValueError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "mem_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def revision() -> str:
    """The git commit measured (``+`` when the work tree has changes)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+" if dirty else "")


# -- results ----------------------------------------------------------------------------------


def record(bench: str, figures: dict[str, Any], results: Path | None = None) -> None:
    """Append ``figures`` as one JSON line to ``bench/results/BENCH.jsonl`` (git-ignored),
    with the time, commit, machine and load."""
    path = results or RESULTS / f"{bench}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "bench": bench,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rev": revision(),
        "machine": machine(),
        **figures,
    }
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median of the runs' numbers (other values: the first run's)."""
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        nums = [r[k] for r in runs if isinstance(r.get(k), int | float) and r.get(k) is not None]
        if isinstance(v, int | float) and not isinstance(v, bool) and nums:
            out[k] = round(statistics.median(nums), 6)
        else:
            out[k] = v
    return out


def table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table of ``rows`` with ``columns`` as (key, heading)."""
    cells = [[h for _, h in columns]]
    for r in rows:
        cells.append(["" if r.get(k) is None else _fmt(r.get(k)) for k, _ in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, list):
        return "/".join(_fmt(x) for x in v)
    return str(v)


def parse_interval(text: str) -> float:
    """``"1s"``, ``"500ms"``, ``"0.2"`` → seconds."""
    t = text.strip()
    if t.endswith("ms"):
        return float(t[:-2]) / 1000
    if t.endswith("s"):
        return float(t[:-1])
    return float(t)


# -- a byte-counting TCP proxy ------------------------------------------------------------------


class CountingProxy:
    """A TCP forwarder from a port of its own to ``127.0.0.1:upstream`` that counts the
    bytes each way: ``up`` (client → server, e.g. agent → broker) and ``down``. What it
    counts is TCP payload (MQTT packets: fixed header, topic, properties, payload, and the
    PINGREQ/PUBACK traffic), not IP and TCP headers."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self.port = int(self._srv.getsockname()[1])
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="proxy").start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), 5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)  # (the 5 s were for connecting: a quiet link stays up)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.close()


# -- a lean subscriber ------------------------------------------------------------------------


class Collector:
    """A QoS 1 MQTT subscriber that keeps (topic, payload, arrival wall-clock ms) of every
    message and does nothing else in its network thread, so that it keeps up and the
    latencies measured are the publisher's."""

    def __init__(self, port: int, topic: str) -> None:
        self.got: list[tuple[str, bytes, int]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}-{id(self)}"
        )
        ready = threading.Event()

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe(topic, qos=1)

        def on_subscribe(*_: Any) -> None:
            ready.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            item = (msg.topic, bytes(msg.payload), time.time_ns() // 1_000_000)
            with self._lock:
                self.got.append(item)

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the subscriber could not subscribe")

    def messages(self) -> list[tuple[str, bytes, int]]:
        with self._lock:
            return list(self.got)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- the simulated fleet ------------------------------------------------------------------------


class SimProcess:
    """``python -m bench.sim``: N Modbus TCP devices × R registers in their own process
    (their CPU is not the agent's). :meth:`stats` asks it (SIGUSR1) for the requests it
    received so far, per unit id."""

    def __init__(self, workdir: Path, devices: int, registers: int) -> None:
        self.port_file = workdir / "sim.port"
        self.stats_file = workdir / "sim.stats"
        self._asked = 0
        for f in (self.port_file, self.stats_file):
            f.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.sim",
                "--devices",
                str(devices),
                "--registers",
                str(registers),
                "--port-file",
                str(self.port_file),
                "--stats-file",
                str(self.stats_file),
            ],
            cwd=REPO,
        )
        wait_until(lambda: self.port_file.exists() and self.port_file.read_text(), 30, "the sim")
        self.port = int(self.port_file.read_text())

    def stats(self) -> dict[str, Any]:
        """``{"n": answer number, "requests": total, "by_unit": {unit: count}}``."""
        self._asked += 1
        self.proc.send_signal(signal.SIGUSR1)

        def answered() -> dict[str, Any] | None:
            with contextlib.suppress(OSError, ValueError):
                doc: dict[str, Any] = json.loads(self.stats_file.read_text())
                if doc["n"] >= self._asked:
                    return doc
            return None

        got: dict[str, Any] = wait_until(answered, 10, "the simulator's counts", step=0.01)
        return got

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
