"""Device faults stay with their device; the buffer survives reconnects; identity."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.app import default_client_id, machine_suffix
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    Subscriber,
    assert_all_delivered,
    buffer_rows,
    free_listen_port,
    one_point_device,
    wait_until,
    write_config,
)


class BlackHole:
    """A TCP peer that accepts Modbus requests and never answers (a hung converter)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def vent_sim() -> Iterator[ModbusSimulator]:
    """Case 017: two ventilation units; unit 1 does not implement coil 72."""
    sim = ModbusSimulator()
    temp = ModbusPoint(name="supply_temp", table="holding", address=6, type="int16", scale=0.1)
    neighbour = ModbusPoint(name="fan_speed", table="holding", address=7, type="uint16")
    sim.add_device(1, [temp, neighbour])  # no coil 72, no register 8
    sim.add_device(2, [temp, neighbour])
    sim.set_raw(1, "holding", 6, [215, 1200])
    sim.set_raw(2, "holding", 6, [0xFFEC, 900])
    sim.start_thread()
    yield sim
    sim.stop_thread()


def test_case_017_exception_and_timeout_stay_with_their_device(
    tmp_path: Path, broker: Mosquitto, vent_sim: ModbusSimulator
) -> None:
    """vent-1 answers exception 2 for coil 72 and for register 8 inside a block; dead-1
    never answers; vent-1's valid points and vent-2 keep publishing good readings. The
    unsupported points are marked so and asked again only every 10 minutes."""
    hole = BlackHole()
    devices = f"""\
  - id: vent-1
    host: 127.0.0.1
    port: {vent_sim.port}
    unit_id: 1
    poll_interval: 200ms
    points:
      - {{name: supply_temp, table: holding, address: 6, type: int16, scale: 0.1}}
      - {{name: fan_speed, table: holding, address: 7, type: uint16}}
      - {{name: filter_hours, table: holding, address: 8, type: uint16}}
      - {{name: summer_mode, table: coil, address: 72}}
  - id: vent-2
    host: 127.0.0.1
    port: {vent_sim.port}
    unit_id: 2
    poll_interval: 200ms
    points:
      - {{name: supply_temp, table: holding, address: 6, type: int16, scale: 0.1}}
  - id: dead-1
    host: 127.0.0.1
    port: {hole.port}
    unit_id: 1
    poll_interval: 200ms
    timeout: 300ms
    points:
      - {{name: level, table: holding, address: 0, type: uint16}}
"""
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    time.sleep(4)
    assert agent.stop() == 0, agent.log()
    hole.close()
    assert_all_delivered(sub, tmp_path / "state")
    msgs = {m.json()["seq"]: m.json() for m in sub.telemetry()}
    by_dev: dict[str, list[dict]] = {}
    for doc in msgs.values():
        by_dev.setdefault(doc["device"], []).append(doc["points"])
    # vent-2 is untouched by its neighbour's faults: ~20 good polls in 4 s
    assert len(by_dev["vent-2"]) >= 15
    assert all(
        p["supply_temp"] == {"value": -2.0, "unit": None, "quality": "good"}
        for p in by_dev["vent-2"]
    )
    # vent-1: valid points of the failing block still read; the bad ones named
    assert len(by_dev["vent-1"]) >= 15
    for p in by_dev["vent-1"]:
        assert p["supply_temp"]["value"] == 21.5 and p["supply_temp"]["quality"] == "good"
        assert p["fan_speed"]["value"] == 1200
        for bad in ("filter_hours", "summer_mode"):
            assert p[bad]["quality"] == "unsupported"
            assert p[bad]["exception_code"] == 2
            assert "illegal data address" in p[bad]["error"]
            assert "asked again every 10 min" in p[bad]["error"]
            assert p[bad]["value"] is None
    # the silent device: bad quality every poll, not silence
    assert len(by_dev["dead-1"]) >= 5
    assert all(p["level"]["quality"] in ("timeout", "no_connection") for p in by_dev["dead-1"])
    log = agent.log()
    # loud once, not once per poll
    assert log.count("device dead-1") == 1, log
    assert log.count("summer_mode (address 72): unsupported") == 1, log
    # asked once, not on every poll: one request for coil 72, one single read of
    # register 8 after the block 6..8 was refused; then blocks without them
    asked = [r for r in vent_sim.requests if r[0] == 1]
    assert asked.count((1, 1, 72, 1)) == 1, asked
    assert asked.count((1, 3, 8, 1)) == 1, asked
    assert asked.count((1, 3, 6, 3)) == 1, asked
    assert asked.count((1, 3, 6, 2)) >= 15, asked


def test_device_recovery_is_logged_once(tmp_path: Path, broker: Mosquitto) -> None:
    """A device whose server goes away gets no_connection readings, and its return is
    logged once; other buses are unaffected."""
    sim = ModbusSimulator(port=free_listen_port())  # restarted on the same port below
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.set_raw(1, "holding", 0, [42])
    sim.start_thread()
    port = sim.port
    devices = one_point_device(port, "200ms", device_id="flaky", timeout="300ms")
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: len(sub.telemetry()) >= 3, 10, "first readings")
    sim.stop_thread()
    time.sleep(2)
    sim2 = ModbusSimulator(port=port)
    sim2.add_device(1, [ModbusPoint(name="v", address=0)])
    sim2.set_raw(1, "holding", 0, [43])
    sim2.start_thread()
    wait_until(
        lambda: any(m.json()["points"]["v"]["value"] == 43 for m in sub.telemetry()),
        20,
        "readings after the device came back",
    )
    assert agent.stop() == 0
    sim2.stop_thread()
    sub.close()
    qualities = [m.json()["points"]["v"]["quality"] for m in sub.telemetry()]
    assert "good" in qualities and ("no_connection" in qualities or "timeout" in qualities)
    log = agent.log()
    assert log.count("answering again") == 1 or log.count("connected again") == 1, log


def test_case_035_buffer_survives_reconnects(tmp_path: Path, broker: Mosquitto) -> None:
    """Two broker restarts: the buffer file is never recreated (same inode), seqs keep
    increasing, and the readings buffered in between are all delivered."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.start_thread()
    devices = one_point_device(sim.port, "100ms")
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    sub = Subscriber(broker.port, "lifeline/#", client_id="platform-035")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    db = tmp_path / "state" / "buffer.db"
    wait_until(db.exists, 10, "buffer file")
    inode = os.stat(db).st_ino
    for _ in range(5):  # five short sessions within a minute, as a flapping uplink gives
        time.sleep(1)
        broker.stop()
        time.sleep(0.8)
        assert os.stat(db).st_ino == inode
        broker.start()
    time.sleep(2)
    assert agent.stop() == 0, agent.log()
    sim.stop_thread()
    assert os.stat(db).st_ino == inode
    assert_all_delivered(sub, tmp_path / "state")
    assert "same client id" not in agent.log(), "a restarting broker is no client-id clash"


def test_case_030_client_id_derived_and_stable(tmp_path: Path) -> None:
    """No client id in config: derived from gateway id + machine id, stable, and different
    on two machines (cloned images must regenerate /etc/machine-id)."""
    a = tmp_path / "machine-a"
    b = tmp_path / "machine-b"
    a.write_text("0123456789abcdef0123456789abcdef\n")
    b.write_text("fedcba9876543210fedcba9876543210\n")
    assert machine_suffix(a) == machine_suffix(a)
    assert machine_suffix(a) != machine_suffix(b)
    assert len(machine_suffix(a)) == 8
    assert machine_suffix(tmp_path / "missing") == ""
    cid = default_client_id("gw-017")
    assert cid.startswith("gw-017") and cid == default_client_id("gw-017")


def test_case_030_duplicate_client_id_is_named(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Two agents configured with one client id knock each other off; the agent says what
    is probably wrong instead of only reconnecting, and backs off."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.start_thread()
    devices = one_point_device(sim.port, "1s")
    agents = []
    for i in range(2):
        d = tmp_path / f"gw{i}"
        d.mkdir()
        cfg = write_config(d / "agent.yaml", broker.port, devices)
        agents.append(AgentProcess(cfg, d / "agent.log"))
    for a in agents:
        a.start()
    try:
        wait_until(
            lambda: any("same client id" in a.log() for a in agents),
            60,
            "the duplicate client id hint",
        )
    finally:
        for a in agents:
            a.stop()
        sim.stop_thread()
    logging.getLogger().debug("logs: %s", [a.log() for a in agents])


def test_full_disk_keeps_polling_and_loses_nothing(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Buffer writes fail with 'database or disk is full' for 2 s: polling goes on, polls
    wait in memory, and every one of them is committed and published once there is room."""
    import asyncio

    from agent.app import Agent
    from agent.config.loader import load_config
    from agent.readings import parse_iso_ms

    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)], {"v": lambda t: int(t * 10)})
    sim.start_thread()
    devices = one_point_device(sim.port, "100ms")
    cfg = load_config(write_config(tmp_path / "agent.yaml", broker.port, devices))
    sub = Subscriber(broker.port, "lifeline/#")

    async def scenario() -> Agent:
        agent = Agent(cfg)
        task = asyncio.create_task(agent.run())
        await asyncio.sleep(1.0)
        # fault injection: the real buffer, with writes failing as on a full SD card
        real_append, real_ack = agent.buffer.sync.append_many, agent.buffer.sync.ack
        full = sqlite3.OperationalError("database or disk is full")

        def failing(*args: object) -> None:
            raise full

        agent.buffer.sync.append_many = failing  # type: ignore[method-assign,assignment]
        agent.buffer.sync.ack = failing  # type: ignore[method-assign,assignment]
        await asyncio.sleep(2.0)
        assert len(agent.writer.pending) >= 10, "polls wait in memory while the disk is full"
        agent.buffer.sync.append_many = real_append  # type: ignore[method-assign]
        agent.buffer.sync.ack = real_ack  # type: ignore[method-assign]
        await asyncio.sleep(2.0)
        agent.stop_event.set()
        assert await task == 0
        return agent

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    sim.stop_thread()
    assert_all_delivered(sub, tmp_path / "state")
    docs = sorted({m.json()["seq"]: m.json() for m in sub.telemetry()}.items())
    ts = [parse_iso_ms(d["ts"]) for _, d in docs]
    # a poll every 100 ms throughout, also while the disk was full: no hole in time
    assert max(b - a for a, b in itertools.pairwise(ts)) < 400
    assert len(ts) >= 40
    assert "database or disk is full" in caplog.text
    assert "writable again" in caplog.text


def test_second_agent_on_one_state_dir_is_refused(tmp_path: Path, broker: Mosquitto) -> None:
    devices = one_point_device(1, "1s")
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    first = AgentProcess(cfg, tmp_path / "first.log")
    first.start()
    wait_until(lambda: "connected to mqtt" in first.log(), 10, "the first agent")
    second = AgentProcess(cfg, tmp_path / "second.log")
    second.start()
    assert second.proc is not None and second.proc.wait(10) == 1
    assert "another edge-agent (pid " in second.log()
    assert first.proc is not None and first.proc.poll() is None
    assert first.stop() == 0


def test_sigterm_during_a_hung_request_stops_promptly(tmp_path: Path, broker: Mosquitto) -> None:
    """A request waiting on a silent device (5 s timeout) must not hold up a clean stop."""
    hole = BlackHole()
    devices = one_point_device(hole.port, "200ms", device_id="hung", timeout="5s")
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: "bus tcp://" in agent.log(), 10, "the bus to connect")
    time.sleep(0.5)  # a request is now waiting for its 5 s timeout
    t0 = time.monotonic()
    assert agent.stop(signal.SIGTERM, timeout=10) == 0, agent.log()
    assert time.monotonic() - t0 < 3.0, agent.log()
    hole.close()


def test_size_cap_drops_exactly_what_is_counted(tmp_path: Path, broker: Mosquitto) -> None:
    """buffer.max_messages during an outage: the oldest unsent rows are dropped, the
    persistent counter and the log say how many, and the platform misses exactly those."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.start_thread()
    devices = "".join(one_point_device(sim.port, "100ms", device_id=f"d{i}") for i in range(3))
    cfg = write_config(
        tmp_path / "agent.yaml",
        broker.port,
        devices,
        extra="",
        tail="buffer:\n  max_messages: 20\n",
    )
    sub = Subscriber(broker.port, "lifeline/#", client_id="platform-cap")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    time.sleep(1)
    broker.stop()
    time.sleep(3)  # about 90 polls, 20 kept
    broker.start()
    time.sleep(2)
    assert agent.stop() == 0, agent.log()
    sim.stop_thread()
    pending, last_seq = buffer_rows(tmp_path / "state")
    assert pending == 0
    db = sqlite3.connect(tmp_path / "state" / "buffer.db")
    dropped = db.execute("SELECT value FROM counters WHERE name='dropped'").fetchone()[0]
    db.close()
    assert dropped >= 40
    wait_until(
        lambda: len({m.json()["seq"] for m in sub.sequenced()}) >= last_seq - dropped,
        10,
        "every message that was not dropped",
    )
    sub.close()
    by_seq = {m.json()["seq"]: m for m in sub.sequenced()}
    got = set(by_seq)
    missing = sorted(set(range(1, last_seq + 1)) - got)
    # the log accounts for every drop (first at once, then at most once a minute and at stop)
    reports = re.findall(r"dropped (\d+) unsent message\(s\), seq (\d+)\.\.(\d+)", agent.log())
    assert sum(int(n) for n, _, _ in reports) == dropped
    assert len(reports) <= 3, "no log line per poll"
    # A message on its way when the broker went may have reached it (and the subscriber)
    # although its PUBACK never came back: the gateway cannot know, keeps it, and counts it
    # dropped when the cap takes it. Only such messages, sent before the outage, may be both
    # counted and received: at most max_inflight (64) of them, older than every missing seq.
    spans = {s for _, a, b in reports for s in range(int(a), int(b) + 1)}
    raced = {q for q in spans & got if "/telemetry/" in by_seq[q].topic}
    assert len(missing) + len(raced) == dropped
    assert len(raced) <= 64, raced
    assert all(q < missing[0] for q in raced), "only what was sent before the outage"
    # one block of the oldest telemetry; the only seqs inside it that arrived are the
    # notices reporting the drop (priority rows, never dropped)
    notices = {m.json()["seq"] for m in sub.on("/notice")}
    inside = set(range(missing[0], missing[-1] + 1)) - set(missing)
    assert inside <= notices, "one block of the oldest"
    assert int(reports[0][1]) == min([*missing, *raced]) and int(reports[-1][2]) == missing[-1]


def test_mqtt5_refused_publish_is_retried_slowly_not_flooded(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """MQTT 5 broker ACL refuses one device's topic (PUBACK reason 0x87): that device's rows
    stay buffered and are offered again slowly; the other device is unaffected; no flood."""
    broker.stop()
    pw = tmp_path / "broker" / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pw), "gw", "pw"], check=True, capture_output=True
    )
    acl = tmp_path / "broker" / "acl"
    acl.write_text(
        "topic read #\n"
        "user gw\n"
        "topic write lifeline/test-gw/status\n"
        "topic write lifeline/test-gw/telemetry/ok\n"
    )
    for f in (pw, acl):
        f.chmod(0o644)
    broker.extra_conf = f"password_file {pw}\nacl_file {acl}\n"
    broker.start()
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.start_thread()
    devices = one_point_device(sim.port, "100ms", device_id="ok") + one_point_device(
        sim.port, "100ms", device_id="denied"
    )
    extra = '  protocol: "5"\n  username: gw\n  password: pw\n'
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices, extra)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    time.sleep(4)
    assert agent.proc is not None
    cpu = sum(
        int(x)
        for x in Path(f"/proc/{agent.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
    ) / os.sysconf("SC_CLK_TCK")
    assert agent.stop() == 0, agent.log()
    sim.stop_thread()
    sub.close()
    devices_seen = {m.json()["device"] for m in sub.telemetry()}
    assert devices_seen == {"ok"}
    assert len(sub.telemetry()) >= 25
    pending, _ = buffer_rows(tmp_path / "state")
    assert pending >= 25, "the refused rows stay in the buffer"
    log = agent.log()
    assert log.count("broker refused the message") == 1, log[-2000:]
    assert "telemetry/denied" in log and "Not authorized" in log
    assert cpu < 3.0, f"{cpu} CPU-s in 4 s: a resend loop?"


def test_stop_ends_even_when_a_library_swallows_the_cancellation() -> None:
    """Python 3.11's asyncio.wait_for (used inside pymodbus) loses a cancellation that
    arrives as the reply completes; the poller must still stop, or SIGTERM never ends."""
    import asyncio

    from agent.poller import BusPoller
    from drivers.base import PointResult
    from drivers.modbus.config import ModbusTcpDevice
    from drivers.modbus.driver import ModbusTcpBus

    class SwallowingBus(ModbusTcpBus):
        """Fault injection: every read swallows a cancellation and answers anyway."""

        @property
        def connected(self) -> bool:
            return True

        async def read_device(self, unit_id, blocks, timeout=None):  # type: ignore[no-untyped-def]
            with contextlib.suppress(asyncio.CancelledError):  # as wait_for may do
                await asyncio.sleep(0.05)
            return [PointResult("v", 1)]

    dev = ModbusTcpDevice.model_validate(
        {
            "id": "d",
            "host": "127.0.0.1",
            "poll_interval": "50ms",
            "points": [{"name": "v", "address": 0}],
        }
    )

    async def run() -> bool:
        poller = BusPoller(dev.bus, SwallowingBus("127.0.0.1", 1), [dev], lambda d, ts, rs: None)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(0.2)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        return task in done

    assert asyncio.run(run()), "the poller did not stop after its cancellation was swallowed"


def test_a_device_task_that_raises_is_logged_and_restarted_while_others_go_on(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one bus's polling (an exception nobody expected, whose text quotes a
    secret) is logged at CRITICAL with its type and place, never its text; the task is
    started again after its pause and polls again; the other bus never stops."""
    import asyncio

    from agent.app import Agent
    from agent.config.loader import load_config

    secret = "s3cr3t-in-an-exception"
    sims = [ModbusSimulator(), ModbusSimulator()]
    for sim in sims:
        sim.add_device(1, [ModbusPoint(name="v", address=0)], {"v": lambda t: int(t * 10)})
        sim.start_thread()
    devices = one_point_device(sims[0].port, "100ms", "good") + one_point_device(
        sims[1].port, "100ms", "buggy"
    )
    cfg = load_config(write_config(tmp_path / "agent.yaml", broker.port, devices))
    sub = Subscriber(broker.port, "lifeline/#")

    def count(device: str) -> int:
        return sum(1 for m in sub.telemetry() if m.topic.endswith(f"/{device}"))

    buggy_bus = ""

    async def scenario() -> None:
        agent = Agent(cfg)
        task = asyncio.create_task(agent.run())
        buggy = next(p for p in agent.pollers if p.states[0].device.id == "buggy")
        nonlocal buggy_bus
        buggy_bus = buggy.name
        real = buggy.poll_once
        failures = 0

        async def failing(st: object) -> object:
            nonlocal failures
            if failures < 2:  # fault injection: twice, then the real thing again
                failures += 1
                raise RuntimeError(f"unexpected state holding {secret}")
            return await real(st)  # type: ignore[arg-type]

        buggy.poll_once = failing  # type: ignore[method-assign,assignment]
        await asyncio.sleep(1.0)
        good_during = count("good")
        buggy_during = count("buggy")
        await asyncio.sleep(3.0)  # pauses of 1 s then 2 s, then polls again
        assert failures == 2
        assert not task.done(), "one device's failure stopped the agent"
        assert count("good") >= good_during + 20, "the other bus stopped polling"
        assert count("buggy") > buggy_during, "the failed task was not restarted"
        agent.stop_event.set()
        assert await task == 0

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    for sim in sims:
        sim.stop_thread()
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.CRITICAL] * 2, caplog.text
    first = failed[0].getMessage()
    assert first.startswith(f"task poll:{buggy_bus} failed: RuntimeError at test_faults.py:")
    assert " in failing; the other tasks go on" in first
    assert "restarting it in 1 s" in first and "restarting it in 2 s" in failed[1].getMessage()
    assert secret not in caplog.text
