"""Several brokers (``mqtt.brokers``): the choice of broker as a state machine, the config,
and failover and return against two real mosquitto processes with nothing lost."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config.loader import ConfigError, load_config
from agent.failover import BrokerChoice, probe
from agent.status import find_state_file, read_state_file
from tests.helpers import (
    AgentProcess,
    Message,
    Mosquitto,
    Subscriber,
    free_listen_port,
    one_point_device,
    wait_until,
    write_config,
)
from tests.pki import issue, make_ca
from tests.test_reliability import account, sim_one_point
from tests.test_sparkplug import (  # the test's own Sparkplug decoder
    INT64,
    SPARKPLUG,
    HostApp,
    check_session,
    metric,
    sessions,
    spb,  # noqa: F401 (a fixture)
    value,
)

# ---------------------------------------------------------------------------------------
# the choice of broker (pure)


def test_failover_after_n_failed_attempts_in_a_row_then_round_the_list() -> None:
    c = BrokerChoice(3, failover_after=3, return_after=300)
    assert [c.failed() for _ in range(3)] == [False, False, True]
    assert c.current == 1 and c.failures == 0
    c.failed()
    c.failed()
    c.connected(now=10.0)  # a success in between starts the count again
    assert c.failures == 0
    assert [c.failed() for _ in range(3)] == [False, False, True]
    assert c.current == 2
    assert [c.failed() for _ in range(3)] == [False, False, True]
    assert c.current == 0, "after the last broker, the first again"


def test_one_broker_never_switches() -> None:
    c = BrokerChoice(1, failover_after=1, return_after=5)
    assert not any(c.failed() for _ in range(50))
    assert c.current == 0
    c.connected(now=0.0)
    assert c.probe_in(now=100.0) is None


def test_probe_of_the_first_only_while_connected_to_another() -> None:
    c = BrokerChoice(2, failover_after=1, return_after=60)
    c.connected(now=0.0)
    assert c.probe_in(0.0) is None, "on the first broker nothing is probed"
    assert c.failed() and c.current == 1
    assert c.probe_in(1.0) is None, "not connected to the second yet"
    c.connected(now=100.0)
    assert c.probe_in(100.0) == 60.0
    assert c.probe_in(130.0) == 30.0
    assert c.probe_in(500.0) == 0.0
    assert not c.probed(False, now=160.0), "the first does not answer: stay"
    assert c.current == 1 and c.probe_in(160.0) == 60.0
    c.lost()
    assert c.probe_in(161.0) is None, "no probe while reconnecting"
    c.connected(now=200.0)
    assert c.probed(True, now=260.0), "the first answers: back"
    assert c.current == 0 and c.failures == 0 and c.probe_in(260.0) is None


def test_bad_arguments_are_refused() -> None:
    for args in ((0, 1, 1.0), (2, 0, 1.0), (2, 1, 0.0)):
        with pytest.raises(ValueError):
            BrokerChoice(*args)


# ---------------------------------------------------------------------------------------
# config

HEAD = "version: 1\ngateway_id: gw\nstate_dir: state\n"
DEVICE = "devices:\n  - {id: d1, host: 10.0.0.9, points: [{name: v, address: 0}]}\n"


@pytest.fixture
def cfgdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return [f"{i.line}:{i.col}: {i.path}: {i.message}" for i in exc.value.issues]


def test_brokers_inherit_the_rest_of_the_section(cfgdir: Path) -> None:
    ca = cfgdir / "ca.pem"
    make = make_ca(cfgdir, "Test CA")
    ca.write_bytes(make.cert.read_bytes())
    (cfgdir / "agent.yaml").write_text(
        HEAD + "mqtt:\n"
        "  username: gw\n"
        "  password_file: pw\n"
        "  tls: {ca_file: ca.pem}\n"
        "  failover_after: 2\n"
        "  return_after: 2min\n"
        "  brokers:\n"
        "    - host: broker-a.city.example\n"
        "    - {host: 10.1.1.1, port: 18883, server_name: broker-b.city.example}\n"
        "    - {host: 127.0.0.1, port: 1883, tls: false}\n" + DEVICE
    )
    (cfgdir / "pw").write_text("secret\n")
    (cfgdir / "pw").chmod(0o600)
    mqtt = load_config(cfgdir / "agent.yaml").mqtt
    a, b, local = mqtt.endpoints
    assert (a.host, a.broker_port, b.broker_port, local.broker_port) == (
        "broker-a.city.example",
        8883,
        18883,
        1883,
    )
    assert a.tls_settings is not None and a.tls_settings.ca_file == str(ca)
    assert b.tls_settings is not None and b.tls_settings.server_name == "broker-b.city.example"
    assert b.tls_settings.ca_file == str(ca), "the shared TLS settings, the name its own"
    assert local.tls_settings is None
    assert all(v.username == "gw" and v.password_file == str(cfgdir / "pw") for v in mqtt.endpoints)
    assert (mqtt.failover_after, mqtt.return_after) == (2, 120.0)
    # one broker: host and port as before, a list of one
    (cfgdir / "one.yaml").write_text(HEAD + "mqtt: {host: 127.0.0.1, port: 1884}\n" + DEVICE)
    (only,) = load_config(cfgdir / "one.yaml").mqtt.endpoints
    assert (only.host, only.broker_port, only.tls_settings) == ("127.0.0.1", 1884, None)


def test_host_beside_brokers_and_other_mistakes_are_errors_at_their_line(cfgdir: Path) -> None:
    path = cfgdir / "agent.yaml"
    path.write_text(
        HEAD + "mqtt:\n"
        "  host: 10.0.0.5\n"
        "  brokers:\n"
        "    - {host: 127.0.0.1, port: 1883}\n"
        "    - {host: 127.0.0.1, port: 1883}\n"
        "    - host: 10.0.0.7\n"
        "      tls: {ca_file: missing.pem}\n" + DEVICE
    )
    found = problems(path)
    assert found[0].startswith("5:9: mqtt.host: mqtt.host and mqtt.brokers both given"), found
    assert found[1].startswith("8:14: mqtt.brokers[1].host: broker 127.0.0.1:1883 is listed"), found
    assert found[2] == "10:22: mqtt.brokers[2].tls.ca_file: no such file: " + str(
        cfgdir / "missing.pem"
    ), found
    assert len(found) == 3, found
    # a name for TLS towards a broker reached without it
    path.write_text(
        HEAD + "mqtt:\n  brokers:\n    - {host: 127.0.0.1, server_name: b.example}\n" + DEVICE
    )
    (one,) = problems(path)
    assert "brokers[0].server_name is for TLS, which is off towards 127.0.0.1" in one
    # the plaintext check for each broker, at its host
    path.write_text(
        HEAD + "mqtt:\n  username: gw\n  password: pw\n  brokers:\n"
        "    - {host: 127.0.0.1}\n"
        "    - {host: 10.0.0.8, tls: false}\n" + DEVICE
    )
    (one,) = problems(path)
    assert one.startswith("9:14: mqtt.brokers[1].host: the MQTT password would cross"), one
    # an empty list, too many
    path.write_text(HEAD + "mqtt:\n  brokers: []\n" + DEVICE)
    assert "mqtt.brokers" in problems(path)[0]


def test_validate_warns_per_broker(cfgdir: Path) -> None:
    (cfgdir / "agent.yaml").write_text(
        HEAD + "mqtt:\n  brokers:\n"
        "    - {host: 127.0.0.1}\n"
        "    - {host: 10.0.0.8, tls: false}\n"
        "    - {host: 10.0.0.9, port: 1883, tls: {insecure: true}}\n" + DEVICE
    )
    result = CliRunner().invoke(main, ["validate", "agent.yaml"])
    lines = [ln for ln in result.output.splitlines() if ": warning: " in ln]
    assert any(
        ln.startswith("agent.yaml:7:24: mqtt.brokers[1].tls: warning: TLS is off towards 10.0.0.8")
        for ln in lines
    ), lines
    assert any(
        ln.startswith("agent.yaml:8:24: mqtt.brokers[2].port: warning: TLS is on but port 1883")
        for ln in lines
    ), lines
    assert any("mqtt.brokers[2].tls.insecure: warning" in ln for ln in lines), lines
    assert len(lines) == 3, lines


# ---------------------------------------------------------------------------------------
# two real brokers

PAIR: list[Mosquitto] = []


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    a, b = Mosquitto(tmp_path / "broker-a"), Mosquitto(tmp_path / "broker-b")
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def brokers_config(
    path: Path, brokers_yaml: str, devices: str, return_after: str = "3s", extra: str = ""
) -> Path:
    """The test config (:func:`write_config`) with ``mqtt.brokers`` for host and port
    (``extra``: more of the ``mqtt`` section)."""
    write_config(path, 1, devices, extra)
    text = path.read_text().replace(
        "  host: 127.0.0.1\n  port: 1\n",
        f"  failover_after: 3\n  return_after: {return_after}\n  brokers:\n{brokers_yaml}",
    )
    path.write_text(text)
    return path


class Both:
    """Two subscribers read as one platform (the messages of both, for ``account``)."""

    def __init__(self, *subs: Subscriber) -> None:
        self.subs = subs

    def sequenced(self) -> list[Message]:
        return [m for s in self.subs for m in s.sequenced()]

    def on(self, suffix: str) -> list[Message]:
        return [m for s in self.subs for m in s.on(suffix)]


def retained_status(port: int) -> bytes:
    """The retained status of the test gateway on the broker at ``port``."""
    sub = Subscriber(port, "lifeline/test-gw/status", clean=True)
    try:
        wait_until(lambda: sub.on("/status"), 5, "the retained status")
        first = sub.on("/status")[0]
        assert first.retain
        return first.payload
    finally:
        sub.close()


def status_broker(state: Path) -> Any:
    """The broker the state file of ``edge-agent status`` names."""
    path = find_state_file(state)
    return None if path is None else read_state_file(path)["uplink"]["broker"]


def health_broker(sub: Subscriber, since: float) -> Any:
    """The ``broker`` of the latest health message ``sub`` received after ``since``."""
    got = [m for m in sub.on("/health") if m.t >= since]
    return got[-1].json()["broker"] if got else None


@pytest.mark.timeout(90)
def test_stopping_the_first_broker_moves_to_the_second_and_back_with_nothing_lost(
    tmp_path: Path, pair: tuple[Mosquitto, Mosquitto]
) -> None:
    """20 readings/s; the first broker stops: the gateway is on the second within the
    reconnect backoff (3 attempts of at most 0.5 s apart); the first starts again: the
    gateway goes back within return_after (3 s) plus a probe, and the second's retained
    status is offline. The union of both subscribers holds every seq."""
    a, b = pair
    sim = sim_one_point()
    cfg = brokers_config(
        tmp_path / "agent.yaml",
        f"    - {{host: 127.0.0.1, port: {a.port}}}\n    - {{host: 127.0.0.1, port: {b.port}}}\n",
        one_point_device(sim.port, "50ms"),
    )
    sub_a = Subscriber(a.port, "lifeline/#", client_id="platform-a")
    sub_b = Subscriber(b.port, "lifeline/#", client_id="platform-b")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: len(sub_a.telemetry()) >= 10, 20, "readings on the first broker")
        assert health_broker(sub_a, 0) == f"127.0.0.1:{a.port}"
        assert not sub_b.telemetry()
        stopped = time.monotonic()
        a.stop()
        wait_until(sub_b.telemetry, 15, "readings on the second broker")
        moved = sub_b.telemetry()[0].t - stopped
        wait_until(lambda: health_broker(sub_b, 0), 5, "health on the second broker")
        assert health_broker(sub_b, 0) == f"127.0.0.1:{b.port}"
        assert retained_status(b.port) == b"online"
        wait_until(
            lambda: status_broker(tmp_path / "state") == f"127.0.0.1:{b.port}",
            5,
            "the status file to name the second broker",
        )
        time.sleep(2)
        on_a = len(sub_a.telemetry())
        restarted = time.monotonic()
        a.start()
        wait_until(lambda: len(sub_a.telemetry()) > on_a + 5, 20, "readings on the first again")
        back = time.monotonic() - restarted
        wait_until(lambda: health_broker(sub_a, restarted), 5, "health on the first again")
        assert health_broker(sub_a, restarted) == f"127.0.0.1:{a.port}"
        assert retained_status(b.port) == b"offline", "the broker left behind says offline"
        assert retained_status(a.port) == b"online"
        time.sleep(1)
    finally:
        last, distinct, dups, drops = finish_both(agent, sim, sub_a, sub_b, tmp_path / "state")
    log = agent.log()
    assert "trying broker 2 of 2" in log, log
    assert re.search(rf"first broker 127\.0\.0\.1:{a.port} answers again", log), log
    assert "Traceback" not in log, log
    print(
        f"\nfailover: on the second broker {moved:.2f} s after the first stopped; back on the "
        f"first {back:.2f} s after it started (return_after 3 s); {last} seqs, {distinct} "
        f"received, {dups} duplicates"
    )
    assert moved < 5.0, "3 failed attempts at most 0.5 s apart, then the second at once"
    assert back < 3.0 + 5.0, "a probe after return_after, then the switch"
    assert drops == []
    assert distinct == last


def finish_both(
    agent: AgentProcess, sim: Any, sub_a: Subscriber, sub_b: Subscriber, state: Path
) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """Stop the agent cleanly and account for every seq across both subscribers."""
    assert agent.stop() == 0, agent.log()
    sim.stop_thread()
    time.sleep(0.5)
    try:
        return account(Both(sub_a, sub_b), state)  # type: ignore[arg-type]
    finally:
        sub_a.close()
        sub_b.close()


@pytest.mark.timeout(90)
def test_tls_first_broker_and_plain_second_each_with_its_own_settings(
    tmp_path: Path, pair: tuple[Mosquitto, Mosquitto]
) -> None:
    """The first broker over verified TLS (its own CA file, the name its certificate
    holds as the broker's server_name), the second plain MQTT on loopback: the gateway
    goes from one to the other and back, each time with the right settings."""
    a, b = pair
    name = "broker.city.test"
    ca = make_ca(tmp_path / "pki", "City Test CA")
    cert, key = issue(ca, tmp_path / "pki" / "server", name)
    tls_port = free_listen_port()
    a.stop()
    a.extra_conf = f"listener {tls_port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n"
    a.start()
    wait_until(lambda: _listening(tls_port), 10, "the TLS listener")
    sim = sim_one_point()
    cfg = brokers_config(
        tmp_path / "agent.yaml",
        f"    - host: 127.0.0.1\n      port: {tls_port}\n      server_name: {name}\n"
        f"      tls: {{ca_file: {ca.cert}}}\n"
        f"    - {{host: 127.0.0.1, port: {b.port}}}\n",
        one_point_device(sim.port, "100ms"),
    )
    sub_a = Subscriber(a.port, "lifeline/#", client_id="platform-a")
    sub_b = Subscriber(b.port, "lifeline/#", client_id="platform-b")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: len(sub_a.telemetry()) >= 5, 20, "readings over TLS")
        a.stop()
        wait_until(sub_b.telemetry, 15, "readings on the plain second broker")
        on_a = len(sub_a.telemetry())
        a.start()
        wait_until(lambda: len(sub_a.telemetry()) > on_a + 3, 20, "readings over TLS again")
        health = [m.json() for m in sub_a.on("/health")]
        assert health[-1]["tls"]["verify"] is True and health[-1]["broker"].endswith(f":{tls_port}")
        assert any(m.json()["tls"] is None for m in sub_b.on("/health")), "plain on the second"
    finally:
        last, distinct, _, drops = finish_both(agent, sim, sub_a, sub_b, tmp_path / "state")
    log = agent.log()
    verified = rf"connected to mqtts://127\.0\.0\.1:{tls_port} as 'test-gw' \(TLSv1\.[23], "
    assert len(re.findall(verified + f"certificate verified for {name}", log)) == 2, log
    assert log.count(f"connected to mqtt://127.0.0.1:{b.port}") == 1, log
    assert drops == [] and distinct == last


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True


def test_probe_says_why_a_broker_is_not_usable(tmp_path: Path, broker: Mosquitto) -> None:
    """The probe against a real broker: accepted; a closed port: the reason; a broker
    refusing the credentials: refused."""
    (tmp_path / "agent.yaml").write_text(
        HEAD + f"mqtt: {{host: 127.0.0.1, port: {broker.port}}}\n" + DEVICE
    )
    mqtt = load_config(tmp_path / "agent.yaml").mqtt
    ok = probe(mqtt, "probe-test")
    assert ok.ok, ok
    closed = mqtt.model_copy(update={"port": free_listen_port()})
    refused = probe(closed, "probe-test", timeout=2)
    assert not refused.ok and "refused" in refused.reason.lower(), refused
    strict = Mosquitto(tmp_path / "strict")
    strict.extra_conf = "allow_anonymous false\n"
    strict.start()
    try:
        no = probe(mqtt.model_copy(update={"port": strict.port}), "probe-test", timeout=5)
    finally:
        strict.stop()
    assert not no.ok and "not authorized" in no.reason.lower(), no


@pytest.mark.timeout(90)
def test_sparkplug_leaves_the_second_broker_with_an_ndeath_of_its_session(
    tmp_path: Path,
    spb: ModuleType,  # noqa: F811 (the fixture imported above)
) -> None:
    """``mqtt.format: sparkplug_b`` with two brokers: a Sparkplug session on each broker
    in turn (NBIRTH first, consecutive seq), and on the return to the first the broker
    left gets the NDEATH carrying the bdSeq of its session's NBIRTH, before the
    DISCONNECT that discards the will."""
    a = Mosquitto(tmp_path / "broker-a", "queue_qos0_messages true\n")
    b = Mosquitto(tmp_path / "broker-b")
    a.start()
    b.start()
    sim = sim_one_point()
    host_a, host_b = HostApp(a.port, spb), HostApp(b.port, spb)
    cfg = brokers_config(
        tmp_path / "agent.yaml",
        f"    - {{host: 127.0.0.1, port: {a.port}}}\n    - {{host: 127.0.0.1, port: {b.port}}}\n",
        one_point_device(sim.port, "100ms"),
        extra=SPARKPLUG,
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: len(host_a.of("DDATA")) >= 5, 20, "DDATA on the first broker")
        a.stop()
        wait_until(lambda: len(host_b.of("DDATA")) >= 5, 20, "DDATA on the second broker")
        a.start()
        wait_until(lambda: len(host_a.of("NBIRTH")) >= 2, 20, "an NBIRTH on the first again")
        wait_until(lambda: host_b.of("NDEATH"), 5, "the NDEATH on the second")
        wait_until(lambda: len(sessions(host_a.all())[-1]) >= 5, 10, "data on the first again")
    finally:
        assert agent.stop() == 0, agent.log()
        sim.stop_thread()
        host_a.close()
        host_b.close()
        a.stop()
        b.stop()
    [on_b] = sessions(host_b.all())
    check_session(on_b)
    for session in sessions(once(host_a.all())):
        check_session(session)
    bdseq_b = value(metric(on_b[0].payload, "bdSeq"), INT64)
    death = host_b.of("NDEATH")[0]
    assert value(metric(death.payload, "bdSeq"), INT64) == bdseq_b
    assert death.t >= on_b[-1].t, "the NDEATH ends the session on the second broker"
    back = sessions(once(host_a.all()))[-1][0]
    assert value(metric(back.payload, "bdSeq"), INT64) not in (bdseq_b, None)
    assert "answers again: leaving" in agent.log()


def once(messages: list[Any]) -> list[Any]:
    """``messages`` without the broker's redeliveries to the host application (the same
    message again after the broker restarted: its PUBACK to the host was lost)."""
    seen: set[tuple[str, bytes]] = set()
    out = []
    for m in messages:
        key = (m.kind, m.payload.SerializeToString())
        if key not in seen:
            seen.add(key)
            out.append(m)
    return out
