"""The reference consumer (``edge-agent consume``, docs/platform.md) against real agent
processes, a real mosquitto, a RabbitMQ node of the test's own and the machine's
PostgreSQL (127.0.0.1:5432, a throwaway database per test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agent.consumer.decode import Context, Invalid, decode_native
from agent.consumer.ledger import RangeSet
from agent.consumer.sinks import JsonLinesSink
from agent.consumer.sources import amqp_routing_key, mqtt_topic
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    REPO,
    AgentProcess,
    Mosquitto,
    TcpProxy,
    buffer_rows,
    free_listen_port,
    one_point_device,
    wait_until,
    write_config,
)

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@pytest.fixture
def pg() -> Iterator[str]:
    """The DSN of a new empty database, dropped after the test."""
    name = f"edge_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield f"host=127.0.0.1 port=5432 user=postgres dbname={name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


CONSUMERS: list[Consumer] = []
"""Consumer processes a test started; stopped after it, also when it failed."""


@pytest.fixture(autouse=True)
def _no_consumer_left_behind() -> Iterator[None]:
    yield
    while CONSUMERS:
        CONSUMERS.pop().stop()


class Consumer:
    """``python -m agent consume ARGS`` as a child process, its log in a file."""

    def __init__(self, log: Path, *args: str) -> None:
        CONSUMERS.append(self)
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "consume", *args],
            stdout=self._log,
            stderr=self._log,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            cwd=REPO,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, self.log()
            return text in self.log()

        wait_until(seen, timeout, f"{text!r} in the consumer's log")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            if not self._log.closed:
                self._log.close()


def rabbitmq_bin(name: str) -> str:
    # the scripts themselves: /usr/sbin's wrappers switch to the rabbitmq user, who could
    # not write the test's directory
    path = Path("/usr/lib/rabbitmq/bin") / name
    if not path.exists():
        raise RuntimeError(
            "the RabbitMQ test needs rabbitmq-server: apt-get install -y rabbitmq-server"
        )
    return str(path)


class RabbitMQ:
    """A RabbitMQ node of the test's own: its own node name, ports (AMQP, MQTT plugin,
    distribution), data directory, plugins file (``rabbitmq_mqtt``) and Erlang cookie
    (``HOME``), so that the machine's own node, if any, is never touched; stop/start
    keep its data (durable queues, persistent messages)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "home").mkdir(exist_ok=True)
        self.node = f"edgetest{os.getpid()}x{uuid.uuid4().hex[:6]}@localhost"
        self.amqp_port = free_listen_port()
        self.mqtt_port = free_listen_port()
        self.dist_port = free_listen_port()
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
        )
        self.env = dict(
            os.environ,
            HOME=str(workdir / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(workdir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(workdir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(workdir / "rabbitmq.conf"),
            RABBITMQ_PID_FILE=str(workdir / "pid"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(workdir / "plugins"),
        )
        for d in ("mnesia", "log"):
            (workdir / d).mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    def ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [rabbitmq_bin("rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        (self.workdir / "pid").unlink(missing_ok=True)
        out = open(self.workdir / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [rabbitmq_bin("rabbitmq-server")], env=self.env, stdout=out, stderr=out
        )
        out.close()
        self.ctl("wait", "--timeout", "60", str(self.workdir / "pid"), timeout=90)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=30)
            finally:
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        self.proc = None


def gateways(tmp_path: Path, port: int, sim: ModbusSimulator, n: int) -> list[AgentProcess]:
    """``n`` agent processes, gateways ``gw0``.., two devices polled every 100 ms each."""
    agents = []
    for i in range(n):
        devices = one_point_device(sim.port, "100ms", "a") + one_point_device(
            sim.port, "100ms", "b"
        )
        cfg = write_config(tmp_path / f"gw{i}" / "agent.yaml", port, devices)
        text = cfg.read_text().replace("test-gw", f"gw{i}")
        cfg.write_text(text)
        agents.append(AgentProcess(cfg, tmp_path / f"gw{i}" / "agent.log"))
    return agents


def last_seqs(tmp_path: Path, agents: list[AgentProcess]) -> dict[str, int]:
    """After the agents stopped: each gateway's last seq; nothing left in its buffer."""
    out = {}
    for i, agent in enumerate(agents):
        assert agent.stop() == 0, agent.log()
        pending, last = buffer_rows(tmp_path / f"gw{i}" / "state")
        assert pending == 0, f"gw{i}: {pending} messages still buffered"
        out[f"gw{i}"] = last
    return out


def stored(dsn: str) -> dict[str, tuple[int, int, int, int]]:
    """Per gateway: (rows, distinct seqs, min seq, max seq) of ``edge_messages``."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT gateway, count(*), count(DISTINCT seq), min(seq), max(seq) "
            "FROM edge_messages GROUP BY gateway"
        ).fetchall()
    return {gw: (n, d, lo, hi) for gw, n, d, lo, hi in rows}


def check_every_seq_once(dsn: str, last: dict[str, int], consumers: int) -> None:
    """Every seq 1..last of every gateway stored exactly once, by all ``consumers``; the
    gap report (``edge-agent consume --gaps``) is empty and nothing was refused."""
    want = {gw: (n, n, 1, n) for gw, n in last.items()}
    try:
        wait_until(lambda: stored(dsn) == want, 20, f"every seq in PostgreSQL ({want})")
    except AssertionError as exc:
        with psycopg.connect(dsn) as conn:
            gaps = conn.execute("SELECT * FROM edge_gaps").fetchall()
        raise AssertionError(f"{exc}; stored {stored(dsn)}; gaps {gaps[:20]}") from None
    report = subprocess.run(
        [sys.executable, "-m", "agent", "consume", "--postgres", dsn, "--gaps"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert (report.returncode, report.stdout) == (0, ""), report
    with psycopg.connect(dsn) as conn:
        by = dict(
            conn.execute("SELECT consumer, count(*) FROM edge_messages GROUP BY 1").fetchall()
        )
        refused = conn.execute("SELECT topic, reason FROM edge_rejected").fetchall()
        retained = conn.execute("SELECT count(*) FROM edge_retained WHERE kind = 'info'").fetchone()
    assert not refused
    assert len(by) == consumers and all(n > 0 for n in by.values()), by
    assert retained == (len(last),)


@pytest.mark.timeout(120)
def test_five_gateways_two_shared_consumers_and_a_broker_restart(
    tmp_path: Path, broker: Mosquitto, pg: str
) -> None:
    """Five agent processes publish 20 polls/s each; two consumers share one MQTT
    subscription (``$share/platform/lifeline/+/#``, persistent sessions, QoS 1) into one
    PostgreSQL database; the broker stops for 2 s and starts again from its persistence
    file. Every seq of every gateway is in the table exactly once; the gap report is
    empty.

    mosquitto 2.0.11 (Debian 12) restores a persistent session's plain subscriptions
    from its persistence file but not its shared ones: until a consumer subscribes again,
    what gateways publish to the group is routed to no one. So here, as docs/platform.md
    asks of a deployment on it, the gateways reach the broker through a port that opens
    again only once the consumers are back (a TCP relay standing for that listener)."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)], {"v": lambda t: int(t * 10) % 1000})
    sim.start_thread()
    consumers = [
        Consumer(
            tmp_path / f"consumer{i}.log",
            "--mqtt",
            f"127.0.0.1:{broker.port}",
            "--share",
            "platform",
            "--client-id",
            f"platform-{i}",
            "--postgres",
            pg,
        )
        for i in range(2)
    ]
    for c in consumers:
        c.wait_for("subscribed to $share/platform/lifeline/+/#")
    uplink = TcpProxy(broker.port)
    agents = gateways(tmp_path, uplink.port, sim, 5)
    for a in agents:
        a.start()
    time.sleep(6)
    connects = [a.log().count("connected to mqtt://") for a in agents]
    uplink.close()
    broker.stop()
    time.sleep(2)
    broker.start()
    wait_until(lambda: all("session resumed" in c.log() for c in consumers), 15, "resumed")
    uplink.open()
    wait_until(
        lambda: all(
            a.log().count("connected to mqtt://") > n for a, n in zip(agents, connects, strict=True)
        ),
        15,
        "every gateway connected again",
    )
    time.sleep(2)  # what each buffered during the outage goes out
    last = last_seqs(tmp_path, agents)
    uplink.close()
    sim.stop_thread()
    assert all(n >= 100 for n in last.values()), last
    check_every_seq_once(pg, last, 2)
    for c in consumers:
        assert c.stop() == 0, c.log()
        assert "seq(s) missing" in c.log()


@pytest.mark.timeout(150)
def test_five_gateways_into_rabbitmq_two_amqp_consumers_and_a_node_restart(
    tmp_path: Path, pg: str
) -> None:
    """The same through RabbitMQ: the gateways publish to its MQTT plugin (a node of the
    test's own), two consumers compete on one durable queue bound to ``amq.topic`` over
    AMQP; the node stops and starts again in the middle. Every seq of every gateway is
    in the table exactly once; the gap report is empty."""
    rabbit = RabbitMQ(tmp_path / "rabbitmq")
    rabbit.start()
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)], {"v": lambda t: int(t * 10) % 1000})
    sim.start_thread()
    try:
        consumers = [
            Consumer(
                tmp_path / f"consumer{i}.log",
                "--amqp",
                rabbit.url,
                "--queue",
                "platform",
                "--client-id",
                f"platform-{i}",
                "--postgres",
                pg,
            )
            for i in range(2)
        ]
        for c in consumers:
            c.wait_for("consuming queue platform (bound to amq.topic: lifeline.*.#)")
        agents = gateways(tmp_path, rabbit.mqtt_port, sim, 5)
        for a in agents:
            a.start()
        time.sleep(6)
        connects = [a.log().count("connected to mqtt://") for a in agents]
        rabbit.stop()
        time.sleep(1)
        rabbit.start()
        wait_until(
            lambda: all(
                a.log().count("connected to mqtt://") > n
                for a, n in zip(agents, connects, strict=True)
            ),
            30,
            "every gateway connected again",
        )
        time.sleep(2)  # what each buffered during the restart goes out
        last = last_seqs(tmp_path, agents)
        assert all(n >= 100 for n in last.values()), last
        check_every_seq_once(pg, last, 2)
        for c in consumers:
            assert c.stop() == 0, c.log()
            assert "AMQP" in c.log(), "the consumer saw the node go"
    finally:
        sim.stop_thread()
        rabbit.stop()


def test_json_lines_of_one_consumer_account_for_every_seq(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Without a database: one consumer writes JSON lines; a message published twice is
    written once, and the gap report at the end is empty."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.start_thread()
    out = tmp_path / "messages.jsonl"
    consumer = Consumer(
        tmp_path / "consumer.log",
        "--mqtt", f"127.0.0.1:{broker.port}",
        "--client-id", "platform-lines",
        "--output", str(out),
    )  # fmt: skip
    consumer.wait_for("subscribed to lifeline/+/#")
    (agent,) = gateways(tmp_path, broker.port, sim, 1)
    agent.start()
    wait_until(lambda: out.exists() and out.read_text().count('"record":"message"') >= 20, 20, "20")
    # a resend, as after a lost PUBACK: the same bytes again
    first = next(json.loads(x) for x in out.read_text().splitlines() if '"record":"message"' in x)
    from paho.mqtt import publish

    publish.single(
        first["topic"], json.dumps(first["payload"]), qos=1, hostname="127.0.0.1", port=broker.port
    )
    time.sleep(0.5)
    last = last_seqs(tmp_path, [agent])["gw0"]
    sim.stop_thread()
    wait_until(lambda: out.read_text().count('"record":"message"') >= last, 10, f"{last} messages")
    assert consumer.stop() == 0, consumer.log()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    seqs = [x["seq"] for x in lines if x["record"] == "message"]
    assert sorted(seqs) == list(range(1, last + 1))
    assert not [x for x in lines if x["record"] in ("gaps", "invalid")]
    assert "duplicates 1," in consumer.log()


def test_compact_batched_and_compressed_telemetry_is_read_through_the_gateways_info(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A gateway in compact mode with batches of 300 ms and zlib: the consumer inflates
    each message, names its values from the retained ``info`` and writes readings whose
    values are the simulator's; every seq once, no gap."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.set_value(1, "v", 1234)
    sim.start_thread()
    out = tmp_path / "messages.jsonl"
    consumer = Consumer(
        tmp_path / "consumer.log",
        "--mqtt", f"127.0.0.1:{broker.port}",
        "--client-id", "platform-compact",
        "--output", str(out),
    )  # fmt: skip
    consumer.wait_for("subscribed to lifeline/+/#")
    cfg = write_config(
        tmp_path / "gw0" / "agent.yaml",
        broker.port,
        one_point_device(sim.port, "100ms", "a"),
        extra="  payload: compact\n  max_batch_delay: 300ms\n  compression: zlib\n",
    )
    cfg.write_text(cfg.read_text().replace("test-gw", "gw0"))
    agent = AgentProcess(cfg, tmp_path / "gw0" / "agent.log")
    agent.start()
    wait_until(
        lambda: out.exists() and out.read_text().count('"telemetry_compact/1"') >= 5, 20, "batches"
    )
    last = last_seqs(tmp_path, [agent])["gw0"]
    sim.stop_thread()
    wait_until(lambda: out.read_text().count('"record":"message"') >= last, 10, f"{last} messages")
    assert consumer.stop() == 0, consumer.log()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["seq"] for x in lines if x["record"] == "message") == list(range(1, last + 1))
    assert not [x for x in lines if x["record"] in ("gaps", "invalid")], lines
    batches = [
        x["payload"]
        for x in lines
        if x["record"] == "message" and x["payload"].get("schema") == "telemetry_compact/1"
    ]
    readings = [r for b in batches for r in b["readings"]]
    assert any(len(b["readings"]) > 1 for b in batches), "several polls in one message"
    assert {(r["point"], r["value"], r["quality"]) for r in readings} == {("v", 1234, "good")}


def _telemetry(seq: int, clock: str | None = None, gw: str = "g1") -> bytes:
    doc = {
        "seq": seq,
        "schema": "telemetry/1",
        "gateway": gw,
        "device": "d1",
        "ts": "2026-01-01T00:00:00.000Z",
        "points": {"v": {"value": 1, "unit": "m", "quality": "good"}},
    }
    if clock:
        doc["clock"] = clock
    return json.dumps(doc).encode()


def _notice(seq: int, kind: str, **members: int) -> bytes:
    doc = {"seq": seq, "schema": "notice/1", "gateway": "g1", "type": kind, "message": "m"}
    return json.dumps({**doc, **members, "ts": "2026-01-01T00:00:00.000Z"}).encode()


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("lifeline/g1/telemetry/d1", b"{", "not JSON"),
        ("lifeline/g1/telemetry/d1", _telemetry(1).replace(b"1,", b"NaN,", 1), "not JSON"),
        ("lifeline/g1/telemetry/d1", _telemetry(1).replace(b"1,", b"1e999,", 1), "not JSON"),
        ("lifeline/g2/telemetry/d1", _telemetry(1), "gateway of the payload"),
        ("lifeline/g1/telemetry/d2", _telemetry(1), "device of the payload"),
        ("lifeline/g1/notice", _telemetry(1), "not one the notice topic carries"),
        ("lifeline/g1/telemetry/d1", _telemetry(0), "telemetry/1"),
        ("lifeline/g1/telemetry/d1", _telemetry(2**62), "seq beyond"),
        (
            "lifeline/g1/notice",
            _notice(3, "dropped", count=1, first_seq=2**63, last_seq=1),
            "beyond",
        ),
        ("lifeline/g1/telemetry/d1", b"", "empty payload"),
        ("lifeline/g1/telemetry/d1", b" " * (1 << 21), "over"),
        ("lifeline/g1/status", b"\xff", "UTF-8"),
        ("lifeline/g1/status", b"maybe", "status/1"),
        ("elsewhere/g1/status", b"online", "not a topic"),
    ],
)
def test_what_breaks_the_contract_is_refused_with_the_reason(
    topic: str, payload: bytes, reason: str
) -> None:
    with pytest.raises(Invalid, match=reason):
        decode_native(topic, payload, Context())


def test_json_lines_dedup_drops_and_restamps_in_any_order(tmp_path: Path) -> None:
    """Seqs 1..12 of a gateway: 4 never arrives, 6..8 reported dropped, 2 twice; a
    clock_restamp for 1..3 arrives between the unsynced messages 1 and 3."""
    ctx = Context()
    msgs = [_telemetry(1, "unsynced"), _telemetry(2), _telemetry(2)]
    msgs += [_notice(9, "clock_restamp", first_seq=1, last_seq=3, correction_ms=5000)]
    msgs += [_telemetry(3, "unsynced"), _telemetry(5), _telemetry(10), _telemetry(12)]
    msgs += [_notice(11, "dropped", count=3, first_seq=6, last_seq=8)]
    topics = {b'"notice/1"': "lifeline/g1/notice"}
    out = tmp_path / "out.jsonl"
    with out.open("w") as f:
        sink = JsonLinesSink(f)
        sink.write(
            [
                decode_native(
                    next((t for k, t in topics.items() if k in m), "lifeline/g1/telemetry/d1"),
                    m,
                    ctx,
                )
                for m in msgs
            ]
        )
        assert sink.write_report() == {"g1": [(4, 4)]}
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_seq = {x["seq"]: x for x in lines if x["record"] == "message"}
    assert sorted(by_seq) == [1, 2, 3, 5, 9, 10, 11, 12]
    assert "ts_true" not in by_seq[1], "written before the notice came"
    assert by_seq[3]["ts_true"] == "2026-01-01T00:00:05.000Z"
    assert "ts_true" not in by_seq[5] and "ts_true" not in by_seq[2]
    restamp = next(x for x in lines if x["record"] == "restamp")
    assert (restamp["first_seq"], restamp["last_seq"], restamp["correction_ms"]) == (1, 3, 5000)
    assert lines[-1] == {"record": "gaps", "gateway": "g1", "missing": [[4, 4]]}
    assert sink.counts.duplicates == 1


def test_postgres_gap_report_and_true_time_views(pg: str) -> None:
    """The database's answer to the same messages, whatever the order of arrival and
    however often each came: gaps 4 and 13 (6..8 dropped), seq 1 and 3 corrected by the
    re-stamp notice, 2 (not flagged) not; a message PostgreSQL cannot store (a \\u0000
    in a string) is refused alone and is a gap."""
    from agent.consumer.postgres import PostgresSink, gap_report

    ctx = Context()
    tel = "lifeline/g1/telemetry/d1"
    items = [
        decode_native(tel, _telemetry(s, "unsynced" if s in (1, 3) else None), ctx)
        for s in (3, 1, 2, 5, 10, 12, 2)
    ]
    items.append(
        decode_native(
            "lifeline/g1/notice", _notice(11, "dropped", count=3, first_seq=6, last_seq=8), ctx
        )
    )
    sink = PostgresSink(pg, "c1")
    try:
        sink.write(items[:4])
        sink.write(
            [
                decode_native(
                    "lifeline/g1/notice",
                    _notice(9, "clock_restamp", first_seq=1, last_seq=3, correction_ms=-2000),
                    ctx,
                )
            ]
        )
        sink.write(items[3:])
        bad = decode_native(tel, _telemetry(13).replace(b'"m"', b'"\\u0000"'), ctx)
        sink.write([bad, decode_native(tel, _telemetry(14), ctx)])
        assert gap_report(sink.conn) == {"g1": [(4, 4), (13, 13)]}
        assert (sink.counts.stored, sink.counts.duplicates, sink.counts.rejected) == (9, 2, 1)
        true = dict(
            sink.conn.execute(
                "SELECT seq, to_char(ts_true AT TIME ZONE 'UTC', 'HH24:MI:SS') "
                "FROM edge_messages_true_time WHERE seq <= 3"
            ).fetchall()
        )
        assert true == {1: "23:59:58", 2: "00:00:00", 3: "23:59:58"}
        (reason,) = sink.conn.execute("SELECT reason FROM edge_rejected").fetchone() or ("",)
        assert "refused by PostgreSQL" in reason
    finally:
        sink.close()


def test_range_set_against_a_plain_set() -> None:
    import random

    rng = random.Random(7)
    for _ in range(200):
        rs, plain = RangeSet(), set()
        for _ in range(rng.randint(0, 60)):
            a = rng.randint(1, 80)
            b = a + rng.choice([0, 0, 0, rng.randint(0, 6)])
            rs.add(a, b)
            plain |= set(range(a, b + 1))
        assert [n for n in range(0, 100) if n in rs] == sorted(plain)
        assert all(x < y - 1 for x, y in zip(rs.ends, rs.starts[1:], strict=False)), "merged"
        holes = {n for a, b in rs.missing(90) for n in range(a, b + 1)}
        assert holes == set(range(1, 91)) - plain


def test_rabbitmq_mqtt_topics_and_routing_keys() -> None:
    """RabbitMQ's MQTT plugin swaps ``/`` and ``.`` between topic and routing key."""
    assert amqp_routing_key("lifeline/+/#") == "lifeline.*.#"
    assert mqtt_topic("lifeline.gw/1.telemetry.d/2") == "lifeline/gw.1/telemetry/d.2"


def test_the_daemon_does_not_import_the_consumer() -> None:
    code = (
        "import sys, agent.app, agent.cli; "
        "bad = [m for m in sys.modules if m.startswith(('agent.consumer', 'psycopg', 'pika', "
        "'fastjsonschema'))]; print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_commands_and_their_answers_are_not_the_consumers() -> None:
    """A platform's downlink request and the gateway's answer travel under the same
    prefix: neither is recorded nor refused."""
    request = b'{"id":"r1","sent_at":"2026-01-01T00:00:00.000Z"}'
    answer = b'{"schema":"command_response/1","id":"r1","ok":true}'
    assert decode_native("lifeline/g1/cmd/ping", request, Context()) is None
    assert decode_native("lifeline/g1/cmd/ping/response", answer, Context()) is None
    with pytest.raises(Invalid):
        decode_native("lifeline/g1/cmdx/ping", request, Context())
