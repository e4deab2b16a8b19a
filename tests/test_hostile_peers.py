"""Hostile peers on every port cannot stop the gateway.

Each test runs a real agent process (``python -m agent run`` on gpiozero's mock pins,
``tests/gpio_agent.py``) that polls a healthy Modbus TCP device and holds an active
alarm driving a relay, while one peer attacks another of its inputs: a UDP sender of
malformed, oversized, far-future and foreign datacast packets; a Modbus TCP peer
flooding bytes, or frames with wrong transaction ids; a serial device server (RTU over
TCP) flooding bytes; a serial line sending 10 MB without a line end; a serial line
sending lines on which its device's regex pattern backtracks without end. Through each: the
agent's memory stays under :data:`RSS_LIMIT_KB`, the healthy device is polled on time
(no gap between its readings over 2 × the poll interval), the relay never drops, the
attacked input works again afterwards, and SIGTERM stops the agent within 5 s with every
buffered message delivered.

A hostile broker (:class:`HostileBroker`, anything answering on the broker's address)
gets the same checks: one PUBLISH announcing 200 MB, a flood of unsolicited QoS 2
PUBLISHes, a flood of packets paho would answer (PINGREQ, PUBREL) while never reading.
The readings cannot reach it, so they are counted in the buffer and delivered afterwards
by a real mosquitto.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.mqtt import MAX_INBOUND_PACKET
from agent.readings import parse_iso_ms
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from drivers.seismic_stream import datacast_packet
from tests.helpers import (
    REPO,
    RUNNING,
    AgentProcess,
    Mosquitto,
    Shake,
    Subscriber,
    assert_all_delivered,
    buffer_rows,
    free_port,
    mqtt_length,
    read_packet,
    wait_until,
    write_config,
)

POLL_S = 0.5
"""The healthy device's poll interval."""
ATTACK_S = 8.0
"""How long each peer attacks."""
RSS_LIMIT_KB = 80 * 1024
STOP_LIMIT_S = 5.0
RELAY_PIN = "GPIO27"
CHANNELS = ("EHZ", "ENN", "ENE")
RATE = 100
"""Samples per second of the datacast sensor."""


def healthy_device(port: int) -> str:
    """The healthy Modbus TCP device's config."""
    return (
        f"  - id: healthy\n    host: 127.0.0.1\n    port: {port}\n    unit_id: 1\n"
        f"    poll_interval: {int(POLL_S * 1000)}ms\n    timeout: 300ms\n"
        "    points: [{name: level, address: 0, type: uint16, scale: 0.001, unit: m}]\n"
    )


ALARM = f"""\
alarms:
  - {{id: level-hh, device: healthy, point: level, kind: high, setpoint: 0.25,
     severity: critical}}
outputs:
  - {{name: barrier_relay, kind: relay, pin: {RELAY_PIN}, rules: [level-hh]}}
gpio:
  stall_after: 2s
"""


class GpioAgent(AgentProcess):
    """The agent as a child process on mock pins whose changes go to ``record``."""

    def __init__(self, config: Path, log: Path, record: Path) -> None:
        super().__init__(config, log)
        self.record = record

    def start(self) -> None:
        RUNNING.append(self)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("GPIOZERO_PIN_FACTORY", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        wrapper = [sys.executable, str(REPO / "tests" / "gpio_agent.py"), str(self.record)]
        self.proc = subprocess.Popen(
            [*wrapper, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self._log,
            stderr=self._log,
            env=env,
            cwd=REPO,
        )

    def relay(self) -> list[tuple[float, int]]:
        """(monotonic time, state) of every change of the relay's pin."""
        if not self.record.exists():
            return []
        out = []
        for line in self.record.read_text().splitlines():
            t, pin, state = line.split()
            if pin == RELAY_PIN:
                out.append((float(t), int(state)))
        return out

    def status(self, key: str) -> int:
        """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {key} in /proc/{self.proc.pid}/status")


class RssSampler:
    """The agent's VmRSS every 20 ms while running."""

    def __init__(self, agent: GpioAgent) -> None:
        self.agent = agent
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, AssertionError):
                self.peak_kb = max(self.peak_kb, self.agent.status("VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak_kb


# -- the peers ---------------------------------------------------------------------------------


class FloodServer:
    """A TCP peer that, for ``seconds`` after :meth:`arm`, sends ``chunk`` over and over on
    every connection it accepts, without reading (a device or serial device server gone
    wrong). Before :meth:`arm` it accepts and stays silent."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.until = 0.0
        self.sent = 0
        self.connections = 0
        self._armed = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds
        self._armed.set()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._flood, args=(conn,), daemon=True).start()

    def _flood(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            while not self._closed and not self._armed.wait(0.1):
                pass
            while not self._closed and time.monotonic() < self.until:
                try:
                    conn.sendall(self.chunk)
                except TimeoutError:
                    continue
                except OSError:
                    return  # the agent dropped the connection
                self.sent += len(self.chunk)
            # after the attack: silent until the agent gives up on this connection
            while not self._closed:
                try:
                    if not conn.recv(4096):
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def wrong_tid_frames() -> bytes:
    """Well-formed Modbus TCP replies (FC 3, one register) to transactions never asked."""
    frames = [struct.pack(">HHHBBBH", 0xBE00 + i, 0, 5, 1, 3, 2, 0x1234) for i in range(200)]
    return b"".join(frames)


def hostile_datagrams() -> list[tuple[str, bytes]]:
    """(source address, datagram): one of each kind of bad input, from 127.0.0.1 unless
    the source is the foreign sender 127.0.0.2."""
    now = time.time()
    good = ", ".join(["7"] * 25)
    return [
        ("127.0.0.1", b"{'EHZ', nan, 1, 2, 3}"),
        ("127.0.0.1", b"{'EHZ', inf, 1, 2, 3}"),
        ("127.0.0.1", b"{'EHZ', -inf, 1, 2, 3}"),
        ("127.0.0.1", b"{'EHZ', 1e308, 1, 2, 3}"),
        ("127.0.0.1", b"{'EHZ', 5.0, 1, 2, 3}"),  # 1970
        ("127.0.0.1", datacast_packet("EHZ", now + 86400 * 365 * 50, [1, 2, 3])),
        ("127.0.0.1", datacast_packet("ENN", now + 60, [1, 2, 3])),
        ("127.0.0.1", datacast_packet("ENE", now + 1e6, [1] * 25)),
        ("127.0.0.1", f"{{'EHZ', {now:.3f}, nan, 1, 2}}".encode()),
        ("127.0.0.1", f"{{'EHZ', {now:.3f}, inf, 1, 2}}".encode()),
        ("127.0.0.1", f"{{'EHZ', {now:.3f}, 1.5, 1, 2}}".encode()),
        ("127.0.0.1", f"{{'EHZ', {now:.3f}, 1e3, 1, 2}}".encode()),
        ("127.0.0.1", f"{{'EHZ', {now:.3f}, {10**40}, 1}}".encode()),
        ("127.0.0.1", datacast_packet("EHZ", now, [1] * 21000)[:65000]),  # 64 KB
        ("127.0.0.1", datacast_packet("ENN", now - 1, [1] * 2000)),  # 20 s in one packet
        ("127.0.0.1", datacast_packet("XYZ", now, [1, 2, 3])),
        ("127.0.0.1", b"{'EHZ'}"),
        ("127.0.0.1", b"\xff\xfe" * 700),
        ("127.0.0.1", b""),
        ("127.0.0.2", f"{{'EHZ', {now - 1:.3f}, {good}}}".encode()),
    ]


def udp_attack(port: int, seconds: float) -> int:
    """Send hostile datagrams as fast as one thread can for ``seconds``; return how many."""
    kinds = hostile_datagrams()
    socks = {}
    for src in {s for s, _ in kinds}:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((src, 0))
        socks[src] = sock
    sent = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            for src, data in kinds:
                with contextlib.suppress(OSError):  # ENOBUFS when the receiver lags
                    socks[src].sendto(data, ("127.0.0.1", port))
                    sent += 1
    finally:
        for sock in socks.values():
            sock.close()
    return sent


def serial_attack(far_end: str, megabytes: int = 10) -> float:
    """Write ``megabytes`` MB without a line end into the far end of the pty pair, then a
    line end and a good line; return the seconds it took."""
    t0 = time.monotonic()
    fd = os.open(far_end, os.O_RDWR | os.O_NOCTTY)
    try:
        junk = b"x" * 65536
        left = megabytes * 1_000_000
        while left > 0:
            left -= os.write(fd, junk[: min(left, len(junk))])
            assert time.monotonic() - t0 < 60, "the line did not take 10 MB within 60 s"
        os.write(fd, b"\nlevel=2.5\n")
    finally:
        os.close(fd)
    return time.monotonic() - t0


# -- the scenarios ------------------------------------------------------------------------------


@dataclass
class Scenario:
    """One hostile peer: its device config, the attack and the check that its input
    works again afterwards."""

    devices: str
    attack: Callable[[], str]
    after: Callable[[Subscriber], None] = lambda sub: None
    log_says: list[str] = field(default_factory=list)
    cleanup: Callable[[], None] = lambda: None
    prepare: Callable[[Subscriber], None] = lambda sub: None
    log_once: list[str] = field(default_factory=list)
    """Log texts that must appear exactly once (bounded logging)."""


def _device_topic(device: str) -> str:
    return f"lifeline/test-gw/telemetry/{device}"


def _readings(sub: Subscriber, device: str) -> list[dict]:
    return [m.json() for m in sub.telemetry() if m.topic == _device_topic(device)]


def udp_scenario(tmp_path: Path) -> Scenario:
    port = free_port()
    devices = (
        f"  - id: shake\n    driver: seismic\n    format: datacast\n    udp_port: {port}\n"
        "    udp_host: 127.0.0.1\n    udp_senders: [127.0.0.1]\n"
        f"    sample_rate: {RATE}\n"
        "    channels: [{name: EHZ}, {name: ENN}, {name: ENE}]\n"
    )
    shake = Shake(port, CHANNELS, RATE)

    def after(sub: Subscriber) -> None:
        # the flood fills the socket's receive queue, so the kernel loses genuine packets
        # too while it lasts (gaps, skipped); afterwards every second is whole again
        def whole() -> bool:
            last = _readings(sub, "shake")[-3:]
            times = [parse_iso_ms(s["ts"]) for s in last]
            steps = [b - a for a, b in itertools.pairwise(times)]
            gaps = [s["points"]["gap_samples"]["value"] for s in last]
            return steps == [1000, 1000] and gaps == [0, 0, 0]

        wait_until(whole, 10, "three whole seconds of seismic summaries after the attack")

    return Scenario(
        devices,
        lambda: f"{udp_attack(port, ATTACK_S)} datagrams sent",
        after,
        ["dropped bad input", "sender", "time", "ahead", "size", "value", "channel"],
        shake.stop,
    )


def tcp_scenario(chunk: bytes, driver: str = "") -> Callable[[Path], Scenario]:
    def make(tmp_path: Path) -> Scenario:
        peer = FloodServer(chunk)
        devices = (
            f"  - id: hostile\n{driver}    host: 127.0.0.1\n    port: {peer.port}\n"
            "    unit_id: 1\n    poll_interval: 200ms\n    timeout: 300ms\n"
            "    points: [{name: v, address: 0}]\n"
        )

        def attack() -> str:
            peer.arm(ATTACK_S)
            time.sleep(ATTACK_S)
            return f"{peer.sent / 1e6:.0f} MB sent on {peer.connections} connection(s)"

        def after(sub: Subscriber) -> None:
            got = _readings(sub, "hostile")
            qualities = {q for m in got for q in [m["points"]["v"]["quality"]]}
            assert qualities & {"frame_error", "timeout"}, qualities
            assert peer.connections >= 2, "the flooded connection was never dropped"

        return Scenario(devices, attack, after, ["flood"], peer.close)

    return make


def serial_scenario(tmp_path: Path, far_end: str, agent_end: str) -> Scenario:
    devices = (
        f"  - id: gauge\n    driver: serial_line\n    serial_port: {agent_end}\n"
        "    baudrate: 115200\n    parser: {kind: kv}\n"
        "    points: [{name: level, unit: m}]\n"
    )

    def level(sub: Subscriber, value: float) -> None:
        wait_until(
            lambda: any(m["points"]["level"]["value"] == value for m in _readings(sub, "gauge")),
            10,
            f"a reading of {value} from the line",
        )

    def prepare(sub: Subscriber) -> None:
        fd = os.open(far_end, os.O_RDWR | os.O_NOCTTY)
        try:  # (the first line after opening may be partial and is dropped)
            os.write(fd, b"level=1.0\nlevel=1.5\n")
        finally:
            os.close(fd)
        level(sub, 1.5)

    return Scenario(
        devices,
        lambda: f"10 MB written in {serial_attack(far_end):.1f} s",
        lambda sub: level(sub, 2.5),
        ["longer than 512 bytes", "1 line(s) dropped (1 over-long)"],
        prepare=prepare,
    )


EVIL_PATTERN = r"^(?P<tag>(\w|\w\w)+)=(?P<level>[-0-9.]+)$"
"""Reads ``level=2.5``; backtracks without end on a long word not followed by ``=``."""
EVIL_LINE = b"1" * 40 + b"!=1\n"


def regex_scenario(tmp_path: Path, far_end: str, agent_end: str) -> Scenario:
    devices = (
        f"  - id: gauge\n    driver: serial_line\n    serial_port: {agent_end}\n"
        "    baudrate: 115200\n"
        f"    parser: {{kind: regex, pattern: '{EVIL_PATTERN}'}}\n"
        "    points: [{name: level, unit: m}]\n"
    )

    def level(sub: Subscriber, value: float) -> None:
        wait_until(
            lambda: any(m["points"]["level"]["value"] == value for m in _readings(sub, "gauge")),
            10,
            f"a reading of {value} from the line",
        )

    def write(data: bytes) -> None:
        fd = os.open(far_end, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def prepare(sub: Subscriber) -> None:
        write(b"level=1.0\nlevel=1.5\n")  # (the first line after opening may be partial)
        level(sub, 1.5)

    def attack() -> str:
        # evil lines as fast as the line takes them, for half the attack time (the first
        # is logged; the next report would come 10 s later)
        end = time.monotonic() + ATTACK_S / 2
        sent = 0
        while time.monotonic() < end:
            write(EVIL_LINE * 100)
            sent += 100
            time.sleep(0.01)
        time.sleep(0.5)
        write(b"level=2.5\n")
        return f"{sent} backtracking lines written"

    return Scenario(
        devices,
        attack,
        lambda sub: level(sub, 2.5),
        ["over the pattern's time limit"],
        prepare=prepare,
        # (the limit in force is what is left of the budget: 50 ms, or a little less when
        # the attack's first lines already used some)
        log_once=["the pattern took over "],
    )


PEERS = {
    "udp_datacast": udp_scenario,
    "modbus_tcp_bytes": tcp_scenario(os.urandom(65536)),
    "modbus_tcp_wrong_tids": tcp_scenario(wrong_tid_frames()),
    "rtu_over_tcp_bytes": tcp_scenario(os.urandom(65536), "    driver: modbus_rtu_over_tcp\n"),
    "serial_line_10_mb": None,
    "serial_line_backtracking_regex": None,
}


@pytest.fixture
def healthy() -> Iterator[ModbusSimulator]:
    """The healthy device: its level (0.500 m) is above the alarm's setpoint."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="level", address=0, type="uint16", scale=0.001)])
    sim.set_raw(1, "holding", 0, [500])
    sim.start_thread()
    yield sim
    sim.stop_thread()


@pytest.mark.fault
@pytest.mark.parametrize("peer", list(PEERS))
def test_hostile_peer_cannot_stop_the_gateway(
    peer: str,
    tmp_path: Path,
    broker: Mosquitto,
    healthy: ModbusSimulator,
    line: tuple[str, str],
) -> None:
    if peer == "serial_line_10_mb":
        scenario = serial_scenario(tmp_path, *line)
    elif peer == "serial_line_backtracking_regex":
        scenario = regex_scenario(tmp_path, *line)
    else:
        make = PEERS[peer]
        assert make is not None
        scenario = make(tmp_path)
    cfg = write_config(
        tmp_path / "agent.yaml",
        broker.port,
        healthy_device(healthy.port) + scenario.devices,
        tail=ALARM,
    )
    sub = Subscriber(broker.port, "lifeline/#")
    agent = GpioAgent(cfg, tmp_path / "agent.log", tmp_path / "pins.txt")
    agent.start()
    try:
        wait_until(lambda: (0 or agent.relay()) and agent.relay()[-1][1] == 1, 15, "relay on")
        wait_until(lambda: len(_readings(sub, "healthy")) >= 3, 10, "healthy readings")
        scenario.prepare(sub)
        base_kb = agent.status("VmRSS")
        rss = RssSampler(agent)
        t_attack = time.monotonic()
        result = scenario.attack()
        attack_s = time.monotonic() - t_attack
        scenario.after(sub)
        peak_kb = rss.stop()
        hwm_kb = agent.status("VmHWM")
        t_term = time.monotonic()
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.proc.wait(15)
        stop_s = time.monotonic() - t_term
    finally:
        scenario.cleanup()
        agent.kill()
    log = agent.log()
    times = [parse_iso_ms(m["ts"]) for m in _readings(sub, "healthy")]
    worst = max(b - a for a, b in itertools.pairwise(times))
    print(
        f"\n{peer}: attack {attack_s:.1f} s ({result}), VmRSS before {base_kb / 1024:.1f} MB, "
        f"peak {peak_kb / 1024:.1f} MB, VmHWM {hwm_kb / 1024:.1f} MB, SIGTERM to exit "
        f"{stop_s:.2f} s, longest between healthy polls {worst} ms"
    )
    assert code == 0, log[-3000:]
    assert stop_s <= STOP_LIMIT_S, f"SIGTERM took {stop_s:.1f} s"
    assert peak_kb < RSS_LIMIT_KB and hwm_kb < RSS_LIMIT_KB, (peak_kb, hwm_kb)
    # the relay went on once and stayed on until the stop
    changes = agent.relay()
    on_at = next(t for t, s in changes if s == 1)
    offs = [t for t, s in changes if s == 0 and on_at < t < t_term]
    assert not offs, f"relay dropped at {[round(t - t_attack, 2) for t in offs]} s into the attack"
    assert "stalled" not in log
    # the healthy device was polled on time all along
    assert worst <= 2 * POLL_S * 1000, f"a poll of the healthy device came {worst} ms late"
    assert all(m["points"]["level"]["quality"] == "good" for m in _readings(sub, "healthy"))
    for text in scenario.log_says:
        assert text in log, f"the log does not say {text!r}"
    for text in scenario.log_once:
        assert log.count(text) == 1, f"the log says {text!r} {log.count(text)} times"
    assert "Traceback" not in log, log[-3000:]
    assert_all_delivered(sub, tmp_path / "state")


# -- a hostile broker ------------------------------------------------------------------------------


def connect_properties(body: bytes) -> bytes | None:
    """The properties of an MQTT 5 CONNECT body (MQTT 5.0 section 3.1.2.11), or None for
    an MQTT 3.1.1 one."""
    if body[6] != 5:  # protocol level after the protocol name (0x00 0x04 'MQTT')
        return None
    pos, length, mult = 10, 0, 1  # after level, flags and keep-alive
    while True:
        byte = body[pos]
        pos += 1
        length += (byte & 0x7F) * mult
        mult *= 128
        if not byte & 0x80:
            return body[pos : pos + length]


class HostileBroker:
    """A TCP peer on the broker's address that speaks enough MQTT to be taken for a
    broker: it answers CONNECT with CONNACK (in the client's protocol version) and
    PINGREQ with PINGRESP, and closes on DISCONNECT. For ``seconds`` after :meth:`arm` it
    attacks every connection right after the CONNACK (``kind``):

    - ``huge_publish``: a PUBLISH whose remaining length announces 200 MB, then its body
      streamed as fast as the connection takes it;
    - ``qos2_flood``: QoS 2 PUBLISHes of 4 KB on a topic never subscribed to, message ids
      1..65535 over and over, never a PUBREL;
    - ``reply_flood``: PINGREQ and PUBREL packets, each of which paho answers, while it
      reads nothing the client sends;
    - ``malformed``: PUBACKs cut short (a one-byte message id).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.until = 0.0
        self.sent = 0
        self.connections = 0
        self.connects: list[bytes] = []
        """The body of every CONNECT received."""
        self._armed = threading.Event()
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds
        self._armed.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        reading = threading.Event()
        reading.set()
        with contextlib.suppress(OSError), conn:
            first, body = read_packet(conn)
            assert first == 0x10, f"expected CONNECT, got {first:#x}"
            self.connects.append(body)
            v5 = connect_properties(body) is not None
            conn.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
            if self.kind == "reply_flood":
                reading.clear()  # the client's answers pile up on its side
            answerer = threading.Thread(
                target=self._answer, args=(conn, lock, reading), daemon=True
            )
            answerer.start()
            while not self._closed and not self._armed.wait(0.1):
                pass
            attack = {
                "huge_publish": self._huge_publish,
                "qos2_flood": self._qos2_flood,
                "reply_flood": self._reply_flood,
                "malformed": self._malformed,
            }[self.kind]
            attack(conn, lock, v5)
            reading.set()  # then a quiet broker until the client leaves
            while not self._closed and answerer.is_alive():
                answerer.join(0.1)

    def _answer(self, conn: socket.socket, lock: threading.Lock, reading: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while not self._closed:
                if not reading.is_set():
                    time.sleep(0.1)
                    continue
                first, _ = read_packet(conn)
                if first == 0xC0:  # PINGREQ
                    with lock:
                        conn.sendall(b"\xd0\x00")
                elif first == 0xE0:  # DISCONNECT
                    conn.shutdown(socket.SHUT_RDWR)
                    return

    def _send(self, conn: socket.socket, lock: threading.Lock, data: bytes) -> None:
        with lock:
            conn.sendall(data)
        self.sent += len(data)

    def _huge_publish(self, conn: socket.socket, lock: threading.Lock, v5: bool) -> None:
        size = 200_000_000
        self._send(conn, lock, b"\x30" + mqtt_length(size) + b"\x00\x01t")
        chunk = os.urandom(65536)
        left = size - 3
        while left > 0 and not self._closed and time.monotonic() < self.until:
            self._send(conn, lock, chunk[:left])
            left -= len(chunk)

    def _qos2_flood(self, conn: socket.socket, lock: threading.Lock, v5: bool) -> None:
        payload = os.urandom(4096)
        props = b"\x00" if v5 else b""
        head = b"\x34" + mqtt_length(3 + 2 + len(props) + len(payload)) + b"\x00\x01t"
        mids = itertools.cycle(range(1, 65536))
        while not self._closed and time.monotonic() < self.until:
            batch = [head + next(mids).to_bytes(2, "big") + props + payload for _ in range(64)]
            self._send(conn, lock, b"".join(batch))

    def _reply_flood(self, conn: socket.socket, lock: threading.Lock, v5: bool) -> None:
        mids = itertools.cycle(range(1, 65536))
        while not self._closed and time.monotonic() < self.until:
            batch = [b"\xc0\x00\x62\x02" + next(mids).to_bytes(2, "big") for _ in range(1000)]
            self._send(conn, lock, b"".join(batch))

    def _malformed(self, conn: socket.socket, lock: threading.Lock, v5: bool) -> None:
        while not self._closed and time.monotonic() < self.until:
            self._send(conn, lock, b"\x40\x01\x00" * 1000)

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


BROKER_ATTACKS = {
    # kind: (protocol, cause counted by the agent, what its log says)
    "huge_publish": ("3.1.1", "too_large", "sent a packet of 200000005 bytes"),
    "qos2_flood": ("5", "publish", "sent a PUBLISH on 't', which this client never subscribed"),
    "reply_flood": ("3.1.1", "pingreq", "sent a PINGREQ (only a client sends it"),
    "malformed": ("3.1.1", "malformed", "sent a malformed packet (type 4)"),
}


@pytest.mark.fault
@pytest.mark.parametrize("kind", list(BROKER_ATTACKS))
def test_hostile_broker_cannot_stop_the_gateway(
    kind: str, tmp_path: Path, broker: Mosquitto, healthy: ModbusSimulator
) -> None:
    protocol, cause, says = BROKER_ATTACKS[kind]
    hostile = HostileBroker(kind)
    extra = f'  protocol: "{protocol}"\n'
    cfg = write_config(
        tmp_path / "agent.yaml", hostile.port, healthy_device(healthy.port), extra, tail=ALARM
    )
    agent = GpioAgent(cfg, tmp_path / "agent.log", tmp_path / "pins.txt")
    agent.start()
    try:
        wait_until(lambda: (0 or agent.relay()) and agent.relay()[-1][1] == 1, 15, "relay on")
        wait_until(lambda: hostile.connects, 10, "the agent to connect to the hostile broker")
        time.sleep(3 * POLL_S)
        base_kb = agent.status("VmRSS")
        rss = RssSampler(agent)
        t_attack = time.monotonic()
        hostile.arm(ATTACK_S)
        time.sleep(ATTACK_S)
        peak_kb = rss.stop()
        hwm_kb = agent.status("VmHWM")
        t_term = time.monotonic()
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.proc.wait(15)
        stop_s = time.monotonic() - t_term
    finally:
        hostile.close()
        agent.kill()
    log = agent.log()
    pending, last_seq = buffer_rows(tmp_path / "state")
    print(
        f"\n{kind} (MQTT {protocol}): {hostile.sent / 1e6:.0f} MB sent on "
        f"{hostile.connections} connection(s), VmRSS before {base_kb / 1024:.1f} MB, peak "
        f"{peak_kb / 1024:.1f} MB, VmHWM {hwm_kb / 1024:.1f} MB, SIGTERM to exit "
        f"{stop_s:.2f} s, {pending} message(s) buffered"
    )
    assert code == 0, log[-3000:]
    assert stop_s <= STOP_LIMIT_S, f"SIGTERM took {stop_s:.1f} s"
    assert peak_kb < RSS_LIMIT_KB and hwm_kb < RSS_LIMIT_KB, (peak_kb, hwm_kb)
    changes = agent.relay()
    on_at = next(t for t, s in changes if s == 1)
    offs = [t for t, s in changes if s == 0 and on_at < t < t_term]
    assert not offs, f"relay dropped at {[round(t - t_attack, 2) for t in offs]} s into the attack"
    assert "stalled" not in log
    assert "Traceback" not in log, log[-3000:]
    # every connection under attack was dropped at once, and said so once
    assert hostile.connections >= 3, "the agent did not drop the hostile connection"
    assert log.count(says) == 1, log[-3000:]
    assert f"broke the MQTT protocol: {cause} " in log, log[-3000:]
    assert "same client id" not in log  # the drops are not taken for a takeover
    if protocol == "5":  # Maximum Packet Size in every CONNECT (MQTT 5.0 section 3.1.2.11.4)
        wanted = b"\x27" + MAX_INBOUND_PACKET.to_bytes(4, "big")
        assert all(wanted in (connect_properties(c) or b"") for c in hostile.connects)
    assert pending > 0 and last_seq >= pending

    # the same state on a real broker: every reading taken is delivered, on time
    write_config(tmp_path / "agent.yaml", broker.port, healthy_device(healthy.port), extra, ALARM)
    sub = Subscriber(broker.port, "lifeline/#")
    again = GpioAgent(cfg, tmp_path / "again.log", tmp_path / "pins-again.txt")
    again.start()
    try:
        wait_until(
            lambda: {m.json()["seq"] for m in sub.sequenced()} >= set(range(1, last_seq + 1)),
            30,
            f"the {last_seq} messages of the attacked run",
        )
        assert again.stop() == 0, again.log()[-3000:]
    finally:
        again.kill()
    readings = [m for m in _readings(sub, "healthy") if m["seq"] <= last_seq]
    times = sorted({parse_iso_ms(m["ts"]) for m in readings})
    worst = max(b - a for a, b in itertools.pairwise(times))
    print(f"{len(times)} polls of the healthy device, longest between two {worst} ms")
    assert times[-1] / 1000 > time.time() - (time.monotonic() - t_term) - 2 * POLL_S
    assert worst <= 2 * POLL_S * 1000, f"a poll of the healthy device came {worst} ms late"
    assert all(m["points"]["level"]["quality"] == "good" for m in readings)
    assert_all_delivered(sub, tmp_path / "state")
