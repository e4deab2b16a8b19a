"""Real parts for the tests: a mosquitto broker, an MQTT subscriber, the agent process."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contract.compact import inflate
from drivers.seismic_stream import datacast_packet
from tests.contract_check import problem

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "config" / "profiles"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_listen_port() -> int:
    """A free port below the kernel's ephemeral range, for a server that is stopped and
    started again on the same port: while it is down, a client reconnecting from an
    ephemeral port can be given that very port and connect to itself (TCP simultaneous
    open), which then keeps the server from binding."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def mqtt_length(n: int) -> bytes:
    """``n`` as an MQTT remaining length (MQTT 3.1.1 section 2.2.3)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        got = conn.recv(n - len(data))
        if not got:
            raise ConnectionError("closed")
        data += got
    return data


def read_packet(conn: socket.socket) -> tuple[int, bytes]:
    """(first byte, body) of the next MQTT packet on ``conn``."""
    first = _recv_exact(conn, 1)[0]
    length, mult = 0, 1
    while True:
        byte = _recv_exact(conn, 1)[0]
        length += (byte & 0x7F) * mult
        mult *= 128
        if not byte & 0x80:
            return first, _recv_exact(conn, length)


class TcpPeer:
    """A TCP peer on loopback: ``script(conn)`` runs on a thread of its own for each
    connection it accepts (closed when the script returns); :attr:`connections` counts
    them."""

    def __init__(self, script: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self.script = script
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.script(conn)

    def close(self) -> None:
        self.sock.close()


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if found is None:
        raise RuntimeError("the tests need mosquitto: sudo apt-get install -y mosquitto")
    return found


class Mosquitto:
    """A mosquitto process on a free loopback port; stop/start keep the port and its
    persistence file (so a subscriber's persistent session survives a restart)."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        self.workdir = workdir
        self.port = free_listen_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    def start(self) -> None:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # as root, mosquitto would switch to user 'mosquitto' and could not write here
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.log}\n"
            "log_type all\n" + self.extra_conf
        )
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return True
            assert self.proc is not None and self.proc.poll() is None, "mosquitto died"
            return False

        wait_until(up, 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    t: float
    wall_ms: int = 0

    def json(self) -> Any:
        """The payload as JSON (telemetry compressed with ``mqtt.compression: zlib``
        inflated first)."""
        return json.loads(inflate(self.payload))


SUBSCRIBERS: list[Subscriber] = []
"""Every subscriber a test made; conftest checks after each test that every message they
received follows the contract's schemas."""


class Subscriber:
    """The platform: a persistent-session QoS 1 subscriber collecting every message, each
    of which is checked against the contract's JSON Schemas (``docs/schemas``) as a
    platform would (:meth:`check`; conftest runs it after the test and fails the test on
    any message that breaks the contract). The check runs after the test, not in the
    network thread, so that a subscriber taking thousands of messages a second keeps up
    and the latencies a test measures are the gateway's, not the checker's."""

    def __init__(
        self,
        port: int,
        topic: str = "#",
        client_id: str | None = None,
        clean: bool = False,
        prefix: str = "lifeline",
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.messages: list[Message] = []
        self.invalid: list[str] = []
        self.checked = 0
        self.prefix = prefix
        SUBSCRIBERS.append(self)
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"platform-{os.getpid()}-{id(self)}",
            clean_session=clean,
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.topic = topic
        self.connected = threading.Event()
        self.subscribed = threading.Event()

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe(topic, qos=1)
            self.connected.set()

        def on_subscribe(c: mqtt.Client, u: Any, mid: int, codes: Any, p: Any) -> None:
            self.subscribed.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            with self._lock:
                self.messages.append(
                    Message(
                        msg.topic,
                        msg.payload,
                        bool(msg.retain),
                        time.monotonic(),
                        time.time_ns() // 1_000_000,
                    )
                )

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10), "subscriber could not connect"
        assert self.subscribed.wait(10), "no SUBACK"

    def check(self) -> list[str]:
        """Check every message received since the last call against its schema; return
        (and keep in :attr:`invalid`) what breaks the contract."""
        with self._lock:
            todo = self.messages[self.checked :]
            self.checked = len(self.messages)
        for m in todo:
            wrong = problem(m.topic, m.payload, self.prefix)
            if wrong is not None:
                self.invalid.append(wrong)
        return self.invalid

    def telemetry(self) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if "/telemetry/" in m.topic]

    def sequenced(self) -> list[Message]:
        """Every message that went through the gateway's buffer (it has a ``seq``):
        telemetry, events and waveforms."""
        kinds = ("/telemetry/", "/events/", "/waveform/", "/notice")
        with self._lock:
            return [m for m in self.messages if any(k in m.topic for k in kinds)]

    def on(self, suffix: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


RUNNING: list[AgentProcess] = []
"""Every agent process a test started; conftest kills the leftovers after each test."""


class AgentProcess:
    """``python -m agent run --config FILE`` as a child process, stderr to a log file."""

    def __init__(
        self,
        config: Path,
        log: Path,
        wall_offset_file: Path | None = None,
        args: tuple[str, ...] = (),
        wrap: tuple[str, ...] = (),
        output: int | None = None,
    ) -> None:
        self.config = config
        self.args = args
        """More arguments of ``run``, e.g. ``("--log-level", "debug")``."""
        self.log_path = log
        self.wall = wall_offset_file
        """With a file: the agent's wall clock is off by the milliseconds written in it
        (``tests/wallclock.py``)."""
        self.wrap = wrap
        """A fault-injection wrapper and its arguments, run as ``python WRAP... -m agent``
        (e.g. ``tests/hang.py FLAG``)."""
        self.output = output
        """A file descriptor for the agent's stdout and stderr instead of the log file
        (e.g. a pipe the test stops reading)."""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        RUNNING.append(self)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        wrap = [] if self.wall is None else [str(REPO / "tests" / "wallclock.py"), str(self.wall)]
        out = self._log.fileno() if self.output is None else self.output
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *wrap,
                *self.wrap,
                "-m",
                "agent",
                "run",
                "--config",
                str(self.config),
                *self.args,
            ],
            stdout=out,
            stderr=out,
            env=env,
            cwd=REPO,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Make sure the process is gone (also after a failed test)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if not self._log.closed:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def buffer_rows(state_dir: Path) -> tuple[int, int]:
    """(pending rows, last seq handed out) of the agent's buffer file."""
    db = sqlite3.connect(state_dir / "buffer.db")
    try:
        pending = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        return int(pending), int(row[0]) if row else 0
    finally:
        db.close()


def assert_all_delivered(sub: Subscriber, state_dir: Path, timeout: float = 10) -> int:
    """After the agent stopped: the buffer holds nothing, and the subscriber got exactly the
    seqs 1..last ever handed out (duplicates allowed). Closes ``sub``; returns last seq."""
    pending, last_seq = buffer_rows(state_dir)
    try:
        wait_until(
            lambda: len({m.json()["seq"] for m in sub.sequenced()}) >= last_seq,
            timeout,
            f"every committed message (1..{last_seq})",
        )
    finally:
        sub.close()
    assert pending == 0, f"{pending} rows left in the buffer"
    assert sorted(set(seqs_of(sub.sequenced()))) == list(range(1, last_seq + 1))
    return last_seq


def seqs_of(messages: list[Message]) -> list[int]:
    return [int(m.json()["seq"]) for m in messages]


def assert_no_gaps(seqs: list[int], start: int = 1) -> None:
    unique = sorted(set(seqs))
    assert unique, "no telemetry received"
    missing = sorted(set(range(start, unique[-1] + 1)) - set(unique))
    assert not missing, f"missing seqs: {missing[:20]} (of {len(missing)})"


def one_point_device(
    port: int, poll: str = "100ms", device_id: str = "d1", timeout: str = "1s"
) -> str:
    """The ``devices:`` items of one device with one holding register ``v`` at address 0."""
    return (
        f"  - id: {device_id}\n    host: 127.0.0.1\n    port: {port}\n"
        f"    poll_interval: {poll}\n    timeout: {timeout}\n"
        "    points: [{name: v, address: 0}]\n"
    )


def write_config(
    path: Path, broker_port: int, devices_yaml: str, extra: str = "", tail: str = ""
) -> Path:
    """An agent config for the tests: ``extra`` goes into the ``mqtt`` section, ``tail``
    after ``devices``. The shipped profiles are copied beside it, in ``profiles/``, where a
    config's profiles must be."""
    shutil.copytree(PROFILES, path.parent / "profiles", dirs_exist_ok=True)
    path.write_text(
        "version: 1\n"
        "gateway_id: test-gw\n"
        f"state_dir: {path.parent / 'state'}\n"
        "profiles_dir: profiles\n"
        "mqtt:\n"
        "  host: 127.0.0.1\n"
        f"  port: {broker_port}\n"
        "  topic_prefix: lifeline\n"
        "  client_id: test-gw\n"
        "  reconnect_min: 100ms\n"
        "  reconnect_max: 500ms\n"
        "  keepalive: 5s\n" + extra + "devices:\n" + devices_yaml + tail
    )
    return path


def start_line(a: str, b: str) -> subprocess.Popen[bytes]:
    """socat linking two pseudo-terminals at paths ``a`` and ``b`` (a USB RS-485 adapter
    plugged in, as far as the agent can tell)."""
    if shutil.which("socat") is None:
        raise RuntimeError("the RTU tests need socat: sudo apt-get install -y socat")
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: Path(a).exists() and Path(b).exists(), 10, "socat's ptys")
    return proc


class Shake:
    """A Raspberry Shake on this gateway: datacast packets of its channels, ``rate / 4``
    samples each 0.25 s, stamped with the time of their first sample on the sensor's own
    clock (the gateway's plus ``offset`` seconds), from 127.0.0.1. While :attr:`paused`
    is set it sends nothing (its clock goes on); :attr:`sent` counts the packets sent
    per channel."""

    def __init__(
        self, port: int, channels: tuple[str, ...], rate: int, offset: float = 0.0
    ) -> None:
        self.port = port
        self.channels = channels
        self.rate = rate
        self.offset = offset
        self.sent = 0
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = self.rate // 4
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            t0 = time.time() - 0.25
            k = 0
            while not self._stop.wait(max(0.0, t0 + 0.25 * (k + 1) - time.time())):
                if not self.paused.is_set():
                    counts = [round(1000 * random.gauss(0, 1)) for _ in range(n)]
                    stamp = t0 + self.offset + 0.25 * k
                    for ch in self.channels:
                        s.sendto(datacast_packet(ch, stamp, counts), ("127.0.0.1", self.port))
                    self.sent += 1
                k += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


IN_PROCESS: list[InProcessAgent] = []
"""In-process agents still running; conftest stops them after each test."""


class InProcessAgent:
    """The agent on its own thread and event loop in the test process, for tests that
    look at GPIO pins through gpiozero's ``MockFactory`` (the pins of a child process
    cannot be seen). :meth:`stop` takes the same path as SIGTERM."""

    def __init__(self, config: Path, pin_factory: Any) -> None:
        from agent.config.loader import load_config

        self.cfg = load_config(config)
        self.pin_factory = pin_factory
        self.agent: Any = None
        self.loop: Any = None
        self.code: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import asyncio

        from agent.app import Agent

        ready = threading.Event()

        async def main() -> int:
            self.loop = asyncio.get_running_loop()
            self.agent = Agent(self.cfg, pin_factory=self.pin_factory)
            ready.set()
            return await self.agent.run()

        def run() -> None:
            self.code = asyncio.run(main())

        self._thread = threading.Thread(target=run, name="agent", daemon=True)
        self._thread.start()
        IN_PROCESS.append(self)
        assert ready.wait(10), "agent did not start"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the agent's loop and return its result."""
        import asyncio

        async def wrapped() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(10)

    def stop(self, timeout: float = 15) -> int | None:
        """Stop as on SIGTERM; return the exit code."""
        if self._thread is None:
            return self.code
        self.loop.call_soon_threadsafe(self.agent.stop_event.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            import asyncio
            import io

            out = io.StringIO()
            for t in asyncio.all_tasks(self.loop):
                out.write(f"task {t.get_name()}:\n")
                t.print_stack(file=out)
            raise AssertionError(f"agent did not stop; its tasks:\n{out.getvalue()}")
        self._thread = None
        with contextlib.suppress(ValueError):
            IN_PROCESS.remove(self)
        return self.code


class TcpProxy:
    """A TCP forwarder from a port of its own to ``127.0.0.1:upstream``, which the test
    can close (the endpoint refuses connections and open ones are cut, as when a broker
    goes down) and open again on the same port. Issue 6's fault tests extend it."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_listen_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self.open()

    def blackhole(self) -> None:
        """Stop forwarding without closing anything (a modem that lost its carrier): bytes
        wait in the kernel's buffers, connections stay open, nobody is told."""
        self._flowing.clear()

    def heal(self) -> None:
        """Forward again; whatever waited in the buffers goes through."""
        self._flowing.set()

    def open(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(16)
        self._listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``"4m"``) mounted at ``path`` for a disk fault, unmounted
    afterwards. Mounting needs root (as in CI) or password-less sudo."""
    path.mkdir(parents=True, exist_ok=True)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    opts = f"size={size},mode=0700,uid={os.getuid()},gid={os.getgid()}"
    done = subprocess.run(
        [*sudo, "mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
        check=False,
        capture_output=True,
    )
    if done.returncode:
        pytest.fail(
            "the disk-fault tests mount a small tmpfs: run them as root or with "
            f"password-less sudo ({done.stderr.decode().strip()})"
        )
    try:
        yield path
    finally:
        subprocess.run([*sudo, "umount", "-l", str(path)], check=False, capture_output=True)


def remount(path: Path, mode: str) -> None:
    """Remount the filesystem at ``path`` ``"ro"`` or ``"rw"`` (see :func:`small_filesystem`)."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run([*sudo, "mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill_filesystem(path: Path) -> Path:
    """Write ``path/hog`` until the filesystem is full (what a runaway log does)."""
    hog = path / "hog"
    fd = os.open(hog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (65536, 4096, 512):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return hog
