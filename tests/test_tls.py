"""TLS towards the broker and credentials, against real mosquitto processes and
certificates made with openssl at test time (``tests/pki.py``).

Cases 048 (TLS that is not really TLS, or unverified) and 049 (TLS failures at boot,
renewed certificates) of the casebook.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import EX_CONFIG, main
from agent.config.loader import load_config
from agent.config.model import MqttConfig, TlsConfig
from agent.mqtt import PACKETS_PER_READ, MqttLink
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    REPO,
    AgentProcess,
    Mosquitto,
    Subscriber,
    assert_all_delivered,
    free_listen_port,
    one_point_device,
    read_packet,
    wait_until,
    write_config,
)
from tests.pki import Ca, issue, make_ca

NAME = "broker.city.test"


@dataclass(frozen=True)
class Pki:
    """Every certificate the tests use (made once per module)."""

    city: Ca
    rogue: Ca
    clients2: Ca
    server: dict[str, tuple[Path, Path]]
    client_old: tuple[Path, Path]
    client_new: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    city, rogue, clients2 = (make_ca(base, n) for n in ("City Test CA", "Rogue CA", "Clients 2"))
    s = base / "server"
    server = {
        "good": issue(city, s / "good", NAME),
        "good_ip": issue(city, s / "good-ip", NAME, f"DNS:{NAME},IP:127.0.0.1"),
        "unknown_ca": issue(rogue, s / "rogue", NAME),
        "hostname_mismatch": issue(city, s / "other", "other", "DNS:other.city.test"),
        "expired": issue(city, s / "expired", NAME, start="20240101000000Z", end="20250101000000Z"),
        "not_yet_valid": issue(
            city, s / "future", NAME, start="20990101000000Z", end="21000101000000Z"
        ),
    }
    c = base / "client"
    return Pki(
        city,
        rogue,
        clients2,
        server,
        issue(city, c / "old", "gw-old", "DNS:gw-old", client=True),
        issue(clients2, c / "new", "gw-new", "DNS:gw-new", client=True),
    )


BROKERS: list[TlsBroker] = []
"""Brokers a test started; stopped after each test, also a failed one."""


@pytest.fixture(autouse=True)
def _stop_brokers() -> Iterator[None]:
    yield
    while BROKERS:
        BROKERS.pop().stop()


class TlsBroker:
    """mosquitto with a plain listener (``port``, for the test's subscriber) and a TLS
    listener (``tls_port``) whose certificate and client CA can be changed by a restart."""

    def __init__(
        self,
        workdir: Path,
        server: tuple[Path, Path],
        client_ca: Path | None = None,
        extra: str = "",
    ) -> None:
        self.tls_port = free_listen_port()
        self.extra = extra
        self.broker = Mosquitto(workdir)
        BROKERS.append(self)
        self.configure(server, client_ca)
        self.broker.start()
        self._wait()

    def configure(self, server: tuple[Path, Path], client_ca: Path | None = None) -> None:
        cert, key = server
        mtls = f"cafile {client_ca}\nrequire_certificate true\nuse_identity_as_username true\n"
        self.broker.extra_conf = (
            f"listener {self.tls_port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n"
            + (mtls if client_ca is not None else "")
            + self.extra
        )

    def restart(self, server: tuple[Path, Path], client_ca: Path | None = None) -> None:
        self.broker.stop()
        self.configure(server, client_ca)
        self.broker.start()
        self._wait()

    def _wait(self) -> None:
        def up() -> bool:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.tls_port), 0.2),
            ):
                return True
            return False

        wait_until(up, 10, "the TLS listener")

    @property
    def port(self) -> int:
        return self.broker.port

    def log(self) -> str:
        return self.broker.log.read_text(errors="replace") if self.broker.log.exists() else ""

    def tls_connections(self) -> int:
        """Connections the TLS listener accepted so far: the agent's attempts (the
        listener probe of :meth:`_wait` closes before mosquitto logs it so)."""
        return len(re.findall(rf"New connection from \S+ on port {self.tls_port}\b", self.log()))

    def stop(self) -> None:
        self.broker.stop()


@pytest.fixture
def sim() -> Iterator[ModbusSimulator]:
    s = ModbusSimulator()
    s.add_device(1, [ModbusPoint(name="v", address=0)])
    s.set_raw(1, "holding", 0, [7])
    s.start_thread()
    yield s
    s.stop_thread()


def tls_block(pki: Pki, server_name: str | None = NAME, more: str = "") -> str:
    name = f"    server_name: {server_name}\n" if server_name else ""
    return f"  tls:\n    ca_file: {pki.city.cert}\n{name}{more}"


SYNCED = "clock: {sync: assume}\n"


def unsynced(tmp_path: Path) -> str:
    return f"clock: {{sync: file, sync_file: {tmp_path / 'no-such-flag'}}}\n"


def error_lines(log: str, needle: str) -> list[str]:
    return [ln for ln in log.splitlines() if needle in ln and ("ERROR" in ln or "WARNING" in ln)]


# ---------------------------------------------------------------------------------------
# verified TLS, refused certificates, retry, nothing lost

BAD = {
    # the server certificate, what the log must say, the clock
    "unknown_ca": ("unknown_ca", "verify code 20", None),
    "hostname_mismatch": ("hostname_mismatch", "verify code 62", None),
    "ip_mismatch": ("good", "verify code 64", None),
    "expired": ("expired", "verify code 10", "which is synchronised"),
    "not_yet_valid": ("not_yet_valid", "verify code 9", "which is NOT synchronised"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_case_048_049_refused_broker_certificate_retried_then_connected(
    tmp_path: Path, pki: Pki, sim: ModbusSimulator, case: str
) -> None:
    """A broker certificate that fails verification is refused (no CONNECT sent), the cause
    logged once with the verify code and (for validity dates) what the clock says, the
    attempt repeated with backoff; after the broker restarts with a good certificate the
    agent connects without a restart and every buffered seq arrives."""
    cert, needle, clock_hint = BAD[case]
    broker = TlsBroker(tmp_path / "broker", pki.server[cert])
    sub = Subscriber(broker.port)
    name = None if case == "ip_mismatch" else NAME
    tail = unsynced(tmp_path) if case == "not_yet_valid" else SYNCED
    cfg = write_config(
        tmp_path / "agent.yaml",
        broker.tls_port,
        one_point_device(sim.port, "100ms"),
        tls_block(pki, name),
        tail,
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: broker.tls_connections() >= 3, 15, "several connection attempts")
        log = agent.log()
        assert len(error_lines(log, needle)) == 1, log  # once, not per attempt
        (line,) = error_lines(log, needle)
        if clock_hint is not None:
            assert clock_hint in line, line
        if case == "ip_mismatch":
            assert "server_name" in line, line
        assert "connected to mqtt" not in log
        assert "test-gw" not in broker.log(), "no CONNECT may reach the broker"
        broker.restart(pki.server["good_ip" if case == "ip_mismatch" else "good"])
        wait_until(lambda: "connected to mqtts://" in agent.log(), 15, "the connection")
        time.sleep(0.5)
    finally:
        code = agent.stop()
        broker_log = broker.log()
    assert code == 0, agent.log()
    assert f"certificate verified for {name or '127.0.0.1'}" in agent.log()
    assert_all_delivered(sub, tmp_path / "state")
    broker.stop()
    assert "test-gw" in broker_log


# ---------------------------------------------------------------------------------------
# what goes on the wire first


class FirstBytes:
    """A TCP listener on every IPv4 address that keeps the bytes each connection sends in
    its first 0.5 s, then closes it (case 048's listener 4)."""

    def __init__(self) -> None:
        self.port = free_listen_port()
        self.seen: list[bytes] = []
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("0.0.0.0", self.port))
        self._srv.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            data = b""
            conn.settimeout(0.5)
            with contextlib.suppress(OSError):
                while chunk := conn.recv(4096):
                    data += chunk
            conn.close()
            self.seen.append(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()


def non_loopback_name() -> str:
    """A host name of this machine that is not written as a loopback address (its own
    name; else 0.0.0.0, which Linux connects to this machine)."""
    name = socket.gethostname()
    with contextlib.suppress(OSError):
        if socket.getaddrinfo(name, None, socket.AF_INET):
            return name
    return "0.0.0.0"


@pytest.mark.parametrize("variant", ["no_tls_block_remote_host", "tls_block_loopback_ip"])
def test_case_048_first_byte_is_a_tls_handshake_never_a_plain_connect(
    tmp_path: Path, pki: Pki, variant: str
) -> None:
    """Towards a host that is not a loopback address, without any ``tls`` key, and with
    a ``tls`` block towards 127.0.0.1, the agent's first byte is 0x16 (a TLS handshake
    record), never 0x10 (a plain CONNECT), and the password never crosses the wire."""
    secret = "Wire-Secret-8c41d"
    pw = tmp_path / "mqtt.pw"
    pw.write_text(secret + "\n")
    pw.chmod(0o600)
    listener = FirstBytes()
    extra = f"  username: gw017\n  password_file: {pw}\n"
    if variant == "tls_block_loopback_ip":
        extra += tls_block(pki)
    cfg = write_config(tmp_path / "agent.yaml", listener.port, one_point_device(1, "1s"), extra)
    if variant == "no_tls_block_remote_host":
        cfg.write_text(
            cfg.read_text().replace("host: 127.0.0.1", f"host: {non_loopback_name()}", 1)
        )
    loaded = load_config(cfg)
    assert loaded.mqtt.tls_settings is not None
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: len(listener.seen) >= 2, 15, "two connection attempts")
    finally:
        agent.stop()
        listener.close()
    for data in listener.seen:
        assert data[:1] == b"\x16", data[:16]  # TLS record type 22: handshake
        assert secret.encode() not in data and b"gw017" not in data
        if variant == "tls_block_loopback_ip":  # server_name went out as SNI (RFC 6066 s. 3)
            assert NAME.encode() in data
    log = agent.log()
    assert len(error_lines(log, "closed the connection during the TLS handshake")) == 1, log
    assert secret not in log


# ---------------------------------------------------------------------------------------
# mutual TLS


def test_case_049_mtls_without_client_certificate_is_refused_with_the_cause(
    tmp_path: Path, pki: Pki
) -> None:
    broker = TlsBroker(tmp_path / "broker", pki.server["good"], client_ca=pki.city.cert)
    cfg = write_config(
        tmp_path / "agent.yaml", broker.tls_port, one_point_device(1, "1s"), tls_block(pki)
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: broker.tls_connections() >= 3, 15, "several attempts")
        assert agent.proc is not None and agent.proc.poll() is None, "a TLS failure never ends it"
    finally:
        code = agent.stop()
        broker.stop()
    log = agent.log()
    assert code == 0, log
    lines = error_lines(log, "requires a client certificate")
    assert len(lines) == 1, log
    assert "mqtt.tls.cert_file" in lines[0]
    assert "connected to mqtt" not in log


def test_case_049_renewed_client_certificate_used_after_reconnect_without_restart(
    tmp_path: Path, pki: Pki, sim: ModbusSimulator
) -> None:
    """The agent connects with its client certificate; the files are replaced by a pair
    from another CA and the broker restarted to accept only that CA: the next attempt of
    the same process presents the new pair, and nothing buffered is lost."""
    cert, key = tmp_path / "gw.pem", tmp_path / "gw.key"

    def install(pair: tuple[Path, Path]) -> None:  # as a renewal tool does: write, rename
        for src, dst in zip(pair, (cert, key), strict=True):
            tmp = dst.with_suffix(".new")
            tmp.write_bytes(src.read_bytes())
            tmp.chmod(0o600)
            os.replace(tmp, dst)

    install(pki.client_old)
    broker = TlsBroker(tmp_path / "broker", pki.server["good"], client_ca=pki.city.cert)
    sub = Subscriber(broker.port)
    more = f"    cert_file: {cert}\n    key_file: {key}\n"
    cfg = write_config(
        tmp_path / "agent.yaml",
        broker.tls_port,
        one_point_device(sim.port, "100ms"),
        tls_block(pki, more=more),
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: "u'gw-old'" in broker.log(), 15, "the old certificate in use")
        install(pki.client_new)
        broker.restart(pki.server["good"], client_ca=pki.clients2.cert)
        wait_until(lambda: "u'gw-new'" in broker.log(), 15, "the renewed certificate in use")
        pid = agent.proc.pid if agent.proc else None
        time.sleep(0.3)
        assert agent.proc is not None and agent.proc.pid == pid and agent.proc.poll() is None
    finally:
        code = agent.stop()
    assert code == 0, agent.log()
    assert "u'gw-old'" not in broker.log().split("mosquitto version")[-1]  # the restarted one
    assert agent.log().count("connected to mqtts://") >= 2
    assert_all_delivered(sub, tmp_path / "state")
    broker.stop()


# ---------------------------------------------------------------------------------------
# health, notices, insecure


def test_case_048_health_says_certificate_expiry_and_expiring_notices(
    tmp_path: Path, pki: Pki, sim: ModbusSimulator
) -> None:
    """Verified mTLS: health carries both certificates' expiry dates and
    ``"tls_verify": true``; a client certificate 10 days from expiry and a server
    certificate 2 days from it each give one ``cert_expiring`` notice."""
    end = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + 10 * 86400 + 3600))
    cert, key = issue(pki.city, tmp_path / "c" / "soon", "gw-soon", "DNS:gw", client=True, end=end)
    broker = TlsBroker(tmp_path / "broker", pki.server["good"], client_ca=pki.city.cert)
    sub = Subscriber(broker.port)
    more = f"    cert_file: {cert}\n    key_file: {key}\n"
    cfg = write_config(
        tmp_path / "agent.yaml",
        broker.tls_port,
        one_point_device(sim.port, "200ms"),
        tls_block(pki, more=more),
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: sub.on("/health"), 15, "health")
        wait_until(lambda: len(sub.on("/notice")) >= 2, 10, "the expiry notices")
    finally:
        agent.stop()
    health = sub.on("/health")[-1].json()
    assert health["tls_verify"] is True
    tls = health["tls"]
    assert tls["verify"] is True
    assert tls["client_cert_expires"] == f"{end[:4]}-{end[4:6]}-{end[6:8]}T{end[8:10]}:" + (
        f"{end[10:12]}:{end[12:14]}.000Z"
    )
    server_end = (
        subprocess.run(
            ["openssl", "x509", "-noout", "-enddate", "-in", str(pki.server["good"][0])],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.split("=", 1)[1]
        .strip()
    )
    expected = time.strftime(
        "%Y-%m-%dT%H:%M:%S.000Z", time.strptime(server_end, "%b %d %H:%M:%S %Y GMT")
    )
    assert tls["server_cert_expires"] == expected
    notices = {m.json()["certificate"]: m.json() for m in sub.on("/notice")}
    assert set(notices) == {"client", "server"}
    assert notices["client"]["type"] == "cert_expiring"
    assert (
        notices["client"]["days_left"] == 10
        and notices["client"]["expires"] == tls["client_cert_expires"]
    )
    assert notices["server"]["days_left"] in (1, 2)
    assert len(sub.on("/notice")) == 2, "one per certificate, not per health cycle"
    assert_all_delivered(sub, tmp_path / "state")
    broker.stop()


def test_case_048_insecure_connects_but_warns_at_start_and_connect_and_in_health(
    tmp_path: Path, pki: Pki
) -> None:
    broker = TlsBroker(tmp_path / "broker", pki.server["unknown_ca"])
    sub = Subscriber(broker.port)
    cfg = write_config(
        tmp_path / "agent.yaml",
        broker.tls_port,
        one_point_device(1, "1s"),
        tls_block(pki, more="    insecure: true\n"),
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: sub.on("/health"), 15, "health")
        broker.restart(pki.server["unknown_ca"])  # a reconnect
        wait_until(lambda: agent.log().count("WITHOUT verifying") >= 2, 15, "the reconnect")
    finally:
        agent.stop()
        sub.close()
        broker.stop()
    log = agent.log()
    assert len(error_lines(log, "NOT verified (tls.insecure)")) == 1, log  # at start
    assert len(error_lines(log, "WITHOUT verifying the broker's certificate")) == 2, log
    health = sub.on("/health")[-1].json()
    assert health["tls_verify"] is False and health["tls"]["verify"] is False
    assert health["tls"]["server_cert_expires"] is not None  # read from the unverified DER


# ---------------------------------------------------------------------------------------
# config: TLS by default, plaintext credentials refused, warnings


def validate(cfgdir: Path, text: str) -> tuple[int, list[str]]:
    (cfgdir / "agent.yaml").write_text(text)
    result = CliRunner().invoke(main, ["validate", "agent.yaml"])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output.splitlines()


@pytest.fixture
def cfgdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return tmp_path


HEAD = "gateway_id: gw\nstate_dir: state\n"
DEVICE = "devices:\n  - {id: d1, host: 192.0.2.1, points: [{name: v, address: 0}]}\n"


def secret_file(cfgdir: Path, name: str = "mqtt.pw", text: str = "pw\n", mode: int = 0o600) -> Path:
    path = cfgdir / name
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("host", "tls", "port", "want_tls", "want_port"),
    [
        ("10.0.0.5", "", "", True, 8883),
        ("broker.city.test", "", "", True, 8883),
        ("127.0.0.1", "", "", False, 1883),
        ("127.8.9.10", "", "", False, 1883),
        ("localhost", "", "", False, 1883),
        ("'::1'", "", "", False, 1883),
        ("10.0.0.5", "  tls: false\n", "", False, 1883),
        ("127.0.0.1", "  tls: true\n", "", True, 8883),
        ("127.0.0.1", "  tls: {server_name: broker.city.test}\n", "", True, 8883),
        ("10.0.0.5", "", "  port: 1884\n", True, 1884),
        ("127.0.0.1", "", "  port: 8883\n", True, 8883),  # the TLS port: never plain
    ],
)
def test_tls_is_the_default_off_loopback_and_the_port_follows(
    cfgdir: Path, host: str, tls: str, port: str, want_tls: bool, want_port: int
) -> None:
    (cfgdir / "agent.yaml").write_text(HEAD + f"mqtt:\n  host: {host}\n" + tls + port + DEVICE)
    mqtt = load_config(cfgdir / "agent.yaml").mqtt
    assert (mqtt.tls_settings is not None) == want_tls
    assert mqtt.broker_port == want_port
    if want_tls:
        assert mqtt.tls_settings is not None and not mqtt.tls_settings.insecure


def test_case_048_password_in_clear_to_a_remote_host_is_refused_at_its_line(
    cfgdir: Path,
) -> None:
    secret_file(cfgdir)
    text = HEAD + (
        "mqtt:\n  host: 10.0.0.5\n  tls: false\n  username: gw017\n  password_file: mqtt.pw\n"
    )
    code, lines = validate(cfgdir, text + DEVICE)
    assert code == EX_CONFIG
    assert lines[0].startswith(
        "agent.yaml:7:18: mqtt.password_file: the MQTT password would cross the network in clear"
    ), lines
    assert "allow_plaintext_credentials" in lines[0]
    # the same without TLS towards a loopback address (a local bridge) is fine
    code, lines = validate(cfgdir, text.replace("10.0.0.5", "127.0.0.1") + DEVICE)
    assert code == 0, lines
    # and allowed explicitly: accepted, with warnings
    code, lines = validate(cfgdir, text + "  allow_plaintext_credentials: true\n" + DEVICE)
    assert code == 0, lines
    warnings = [ln for ln in lines if ": warning: " in ln]
    assert any(ln.startswith("agent.yaml:5:3: mqtt.tls: warning: TLS is off") for ln in warnings)
    assert any("in clear" in ln and "allow_plaintext_credentials" in ln for ln in warnings)


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ('"maybe"', "'maybe' is neither true, false nor TLS settings: write 'tls: false'"),
        ("{ca_fil: x}", "unknown key 'ca_fil' (did you mean 'ca_file'?)"),
        ("{cert_file: a.pem}", "cert_file and key_file go together"),
        ("{key_file: k, key_credential: k}", "key_file and key_credential both given"),
        ("{key_credential: ..}", "'..' is not a credential name"),
    ],
)
def test_tls_settings_mistakes_explained(cfgdir: Path, tls: str, message: str) -> None:
    code, lines = validate(cfgdir, HEAD + f"mqtt:\n  tls: {tls}\n" + DEVICE)
    assert code == EX_CONFIG
    assert lines[0].startswith("agent.yaml:4:") and message in lines[0], lines


def test_case_048_tls_false_and_insecure_are_warned(cfgdir: Path) -> None:
    code, lines = validate(cfgdir, HEAD + "mqtt:\n  host: 10.0.0.5\n  tls: false\n" + DEVICE)
    assert code == 0
    assert [ln for ln in lines if ": warning: " in ln] == [
        "agent.yaml:5:3: mqtt.tls: warning: TLS is off towards 10.0.0.5, which is not a "
        "loopback address: readings and alarms cross the network in clear and anyone on the "
        "path can forge them; remove 'tls: false' (TLS is the default)"
    ]
    code, lines = validate(
        cfgdir, HEAD + "mqtt:\n  host: 10.0.0.5\n  tls:\n    insecure: true\n" + DEVICE
    )
    assert code == 0
    (warning,) = [ln for ln in lines if ": warning: " in ln]
    assert warning.startswith(
        "agent.yaml:6:5: mqtt.tls.insecure: warning: the broker's certificate is NOT verified"
    )


def test_tls_on_the_plain_mqtt_port_is_warned(cfgdir: Path) -> None:
    """A remote broker (TLS by default) with port 1883 written: the handshake would meet
    a plain listener; validate says so at the port's line. With tls: false it does not."""
    code, lines = validate(cfgdir, HEAD + "mqtt:\n  host: 10.0.0.5\n  port: 1883\n" + DEVICE)
    assert code == 0
    (warning,) = [ln for ln in lines if ": warning: " in ln]
    assert warning.startswith("agent.yaml:5:3: mqtt.port: warning: TLS is on but port 1883")
    code, lines = validate(
        cfgdir, HEAD + "mqtt:\n  host: 127.0.0.1\n  port: 1883\n  tls: false\n" + DEVICE
    )
    assert code == 0 and not [ln for ln in lines if "port 1883" in ln]


def test_password_in_the_config_and_secret_files_readable_by_others_are_warned(
    cfgdir: Path, pki: Pki
) -> None:
    code, lines = validate(
        cfgdir, HEAD + "mqtt:\n  username: gw017\n  password: s3cret-in-yaml\n" + DEVICE
    )
    assert code == 0
    (warning,) = [ln for ln in lines if ": warning: " in ln]
    assert warning.startswith("agent.yaml:5:3: mqtt.password: warning: the password is written")
    assert "password_file" in warning and "password_credential" in warning
    assert "s3cret-in-yaml" not in "\n".join(lines)
    secret_file(cfgdir, mode=0o644)
    key = cfgdir / "gw.key"
    key.write_bytes(pki.client_old[1].read_bytes())
    key.chmod(0o644)
    code, lines = validate(
        cfgdir,
        HEAD + "mqtt:\n  host: 10.0.0.5\n  username: gw017\n  password_file: mqtt.pw\n"
        f"  tls:\n    ca_file: {pki.city.cert}\n    cert_file: {pki.client_old[0]}\n"
        "    key_file: gw.key\n" + DEVICE,
    )
    assert code == 0, lines
    warnings = [ln for ln in lines if ": warning: " in ln]
    assert len(warnings) == 2, lines
    assert warnings[0].startswith("agent.yaml:6:3: mqtt.password_file: warning: ")
    assert "readable by every user (mode 0644): chmod o-rwx" in warnings[0]
    assert warnings[1].startswith("agent.yaml:10:5: mqtt.tls.key_file: warning: ")


def test_password_file_and_systemd_credentials(
    cfgdir: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``password_file`` relative to the config, trailing newline stripped; credentials
    from ``$CREDENTIALS_DIRECTORY`` (systemd LoadCredential=): a missing one is an error
    at its line, the variable missing a warning of ``validate`` and an error of ``run``."""
    from agent.tls import password_of

    (cfgdir / "etc").mkdir()
    secret_file(cfgdir / "etc", text="from-file\n")
    (cfgdir / "etc" / "agent.yaml").write_text(
        HEAD + "mqtt:\n  username: u\n  password_file: mqtt.pw\n" + DEVICE
    )
    assert password_of(load_config(cfgdir / "etc" / "agent.yaml").mqtt) == "from-file"

    creds = cfgdir / "creds"
    creds.mkdir()
    secret_file(creds, "mqtt-password", "from-credential\n", 0o400)
    key = creds / "gw-key"
    key.write_bytes(pki.client_old[1].read_bytes())
    text = (
        HEAD + "mqtt:\n  host: 10.0.0.5\n  username: u\n  password_credential: mqtt-password\n"
        f"  tls:\n    ca_file: {pki.city.cert}\n    cert_file: {pki.client_old[0]}\n"
        "    key_credential: gw-key\n" + DEVICE
    )
    # outside systemd: validate warns that it cannot check, run refuses to start
    code, lines = validate(cfgdir, text)
    assert code == 0, lines
    warnings = [ln for ln in lines if ": warning: " in ln]
    assert warnings[0].startswith(
        "agent.yaml:6:3: mqtt.password_credential: warning: credential 'mqtt-password' not checked"
    )
    assert warnings[1].startswith("agent.yaml:10:5: mqtt.tls.key_credential: warning: ")
    result = CliRunner().invoke(main, ["run", "--config", "agent.yaml"])
    assert result.exit_code == EX_CONFIG
    assert (
        "agent.yaml:6:24: mqtt.password_credential: credential 'mqtt-password': "
        "$CREDENTIALS_DIRECTORY is not set" in result.output
    )
    assert "LoadCredential=mqtt-password:" in result.output
    # under systemd
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    code, lines = validate(cfgdir, text)
    assert code == 0 and not [ln for ln in lines if ": warning: " in ln], lines
    cfg = load_config("agent.yaml", need_secrets=True)
    assert password_of(cfg.mqtt) == "from-credential"
    key.unlink()
    code, lines = validate(cfgdir, text)
    assert code == EX_CONFIG
    assert lines[0].startswith(
        "agent.yaml:10:21: mqtt.tls.key_credential: credential "
        f"'gw-key': no file {creds / 'gw-key'}"
    ), lines


def test_encrypted_client_key_is_refused_not_prompted_for(cfgdir: Path, pki: Pki) -> None:
    key = cfgdir / "enc.key"
    subprocess.run(
        [
            "openssl",
            "ec",
            "-in",
            str(pki.client_old[1]),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(key),
        ],
        check=True,
        capture_output=True,
    )
    code, lines = validate(
        cfgdir,
        HEAD
        + f"mqtt:\n  tls:\n    cert_file: {pki.client_old[0]}\n    key_file: enc.key\n"
        + DEVICE,
    )
    assert code == EX_CONFIG
    assert lines[0].startswith("agent.yaml:6:15: mqtt.tls.key_file: the client key")
    assert "passphrase" in lines[0]


# ---------------------------------------------------------------------------------------
# the secret appears nowhere

SECRET = "Nowhere-7f3Kq9-Secret"
NUMERIC_SECRET = "7316094285"


def passwd(path: Path, users: dict[str, str]) -> None:
    path.unlink(missing_ok=True)
    for user, password in users.items():
        create = ["-c"] if not path.exists() else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(path), user, password],
            check=True,
            capture_output=True,
        )
    path.chmod(0o600)


def test_secret_appears_nowhere(
    tmp_path: Path, pki: Pki, sim: ModbusSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MQTT password, end to end with a broker that requires it over TLS: not in the
    agent's output at log level debug (through a refusal and a connection), not in what
    validate, run and read print for good and bad configs, not in any MQTT message, not
    in the buffer's files, not in the loaded config's repr or dump."""
    outputs: list[str] = []
    pw = tmp_path / "broker" / "passwd"
    pw.parent.mkdir(parents=True)
    passwd(pw, {"platform": "platform-pw", "gw017": "not-yet-the-secret"})
    broker = TlsBroker(
        tmp_path / "broker",
        pki.server["good"],
        extra=f"password_file {pw}\nallow_anonymous false\n",
    )
    sub = Subscriber(broker.port, auth=("platform", "platform-pw"))
    extra = f"  username: gw017\n  password: {SECRET}\n" + tls_block(pki)
    devices = one_point_device(sim.port, "100ms")
    cfg = write_config(tmp_path / "agent.yaml", broker.tls_port, devices, extra)
    agent = AgentProcess(cfg, tmp_path / "agent.log", args=("--log-level", "debug"))
    agent.start()
    try:
        wait_until(lambda: "refused the connection" in agent.log(), 15, "the refusal")
        passwd(pw, {"platform": "platform-pw", "gw017": SECRET})
        broker.restart(pki.server["good"])
        wait_until(lambda: sub.on("/health") and len(sub.telemetry()) >= 3, 15, "messages")
    finally:
        code = agent.stop()
    outputs.append(agent.log())
    assert code == 0 and "DEBUG" in outputs[-1] and "Not authorized" in outputs[-1]
    broker.stop()

    # what the commands print, for good configs and bad ones (a config error, a type error)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "agent", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        outputs.extend([done.stdout, done.stderr])
        return done

    assert cli("validate", str(cfg)).returncode == 0
    assert cli("read", "--config", str(cfg)).returncode == 0
    text = cfg.read_text()
    bad = {
        "list": text.replace(f"password: {SECRET}", f"password: [{SECRET}]"),
        "map": text.replace(f"password: {SECRET}", f"password: {{{SECRET}: 1}}"),
        "twice": text.replace(f"password: {SECRET}", f"password: {SECRET}\n  password: {SECRET}"),
        "both": text.replace(f"password: {SECRET}", f"password: {SECRET}\n  password_file: x"),
        "number": text.replace(f"password: {SECRET}", f"password: {NUMERIC_SECRET}"),
        "plain": text.split("  tls:\n")[0].replace("host: 127.0.0.1", "host: 10.0.0.5", 1)
        + "  tls: false\ndevices:"
        + text.split("devices:", 1)[1],
        "bad_date": text.replace(f"password: {SECRET}", "password: 2026-13-45"),
    }
    for name, body in bad.items():  # in-process: the same output, without the start-up
        path = tmp_path / f"bad-{name}.yaml"
        path.write_text(body)
        for args in (["validate", str(path)], ["run", "--config", str(path)]):
            result = CliRunner().invoke(main, args)
            outputs.append(result.output)
            assert result.exit_code == EX_CONFIG, (name, result.output)
    assert "2026-13-45" not in "".join(outputs[-2:])
    assert "would cross the network in clear" in outputs[-3]
    # a password file readable by others: warned, not shown
    (tmp_path / "pw.txt").write_text(SECRET + "\n")
    (tmp_path / "pw.txt").chmod(0o644)
    (tmp_path / "file.yaml").write_text(
        text.replace(f"password: {SECRET}", "password_file: pw.txt")
    )
    done = cli("validate", str(tmp_path / "file.yaml"))
    assert done.returncode == 0 and "readable by every user" in done.stderr

    # the loaded config, as a program might print it
    loaded = load_config(cfg)
    outputs += [repr(loaded), str(loaded), loaded.model_dump_json(), str(loaded.model_dump())]

    # every MQTT message the platform received (topics and payloads)
    outputs += [f"{m.topic} {m.payload!r}" for m in sub.messages]
    assert_all_delivered(sub, tmp_path / "state")

    # the buffer's files, byte by byte
    state = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir() if p.is_file())
    db = sqlite3.connect(tmp_path / "state" / "buffer.db")
    dump = "\n".join(db.iterdump())
    db.close()

    everything = "\n".join(outputs) + dump
    for secret in (SECRET, NUMERIC_SECRET):
        assert secret not in everything
        assert secret.encode() not in state
        assert secret.encode("utf-16-le") not in state


# ---------------------------------------------------------------------------------------
# pure parts


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("10.0.0.5", False),
        ("128.0.0.1", False),
        ("0.0.0.0", False),
        ("localhost.city.test", False),
        ("broker", False),
    ],
)
def test_loopback_means_written_as_loopback(host: str, loopback: bool) -> None:
    from agent.tls import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.parametrize("cert", ["expired", "not_yet_valid", "good"])
def test_certificate_dates_read_as_openssl_reads_them(pki: Pki, cert: str) -> None:
    """notAfter read from the file's DER (UTCTime up to 2049, GeneralizedTime from 2050,
    RFC 5280 4.1.2.5) is the date openssl prints."""
    from datetime import UTC, datetime

    from agent.tls import cert_file_not_after

    path = pki.server[cert][0]
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    want = datetime.strptime(out.split("=", 1)[1].strip(), "%Y-%m-%d %H:%M:%SZ")
    assert cert_file_not_after(path) == want.replace(tzinfo=UTC)
    assert cert_file_not_after(pki.server[cert][1]) is None  # a key is no certificate
    assert cert_file_not_after(path.with_name("missing.pem")) is None


def test_expiry_notices_once_a_day_per_certificate() -> None:
    from datetime import UTC, datetime, timedelta

    from agent.tls import CertExpiry

    now = datetime(2026, 12, 1, tzinfo=UTC)
    e = CertExpiry()
    e.not_after = {"client": now + timedelta(days=40), "server": now + timedelta(days=29, hours=1)}
    (n,) = e.notices(now, mono=0.0)
    assert n[0] == "cert_expiring"
    assert n[2] == {"certificate": "server", "expires": "2026-12-30T01:00:00.000Z", "days_left": 29}
    assert e.notices(now, mono=3600.0) == []  # once a day
    assert [x[2]["certificate"] for x in e.notices(now, mono=86400.0)] == ["server"]
    e.not_after["server"] = now + timedelta(days=365)  # renewed: quiet
    assert e.notices(now, mono=86401.0) == []
    e.not_after["client"] = now - timedelta(days=2)  # expired: said, with days_left < 0
    (n,) = e.notices(now, mono=86402.0)
    assert n[2]["days_left"] == -2 and "expired on 2026-11-29" in n[1]
    assert e.health() == {
        "server_cert_expires": "2027-12-01T00:00:00.000Z",
        "client_cert_expires": "2026-11-29T00:00:00.000Z",
    }


# ---------------------------------------------------------------------------------------
# hostile peers on the TLS port


class Peer:
    """A TLS port that misbehaves: ``silent`` accepts and never answers the ClientHello
    (case 049 D); ``tls1.1`` is a broker offering TLS 1.0/1.1 only."""

    def __init__(self, mode: str, cert: tuple[Path, Path]) -> None:
        import ssl
        import warnings

        self.mode = mode
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(*cert)
        with warnings.catch_warnings():  # the versions are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            self._ctx.minimum_version = ssl.TLSVersion.TLSv1
            self._ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        self._ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(8)
        self.port = int(self._srv.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "silent":
                self._held.append(conn)
                continue
            with contextlib.suppress(OSError):
                self._ctx.wrap_socket(conn, server_side=True).close()
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()
        for c in self._held:
            c.close()


@pytest.mark.parametrize(
    ("mode", "needle"),
    [("tls1.1", "share no TLS version"), ("silent", "did not complete the TLS handshake")],
)
def test_case_049_tls_port_that_answers_wrong_is_a_failed_attempt(
    tmp_path: Path, pki: Pki, mode: str, needle: str
) -> None:
    """A broker offering only TLS 1.1 is refused (TLS 1.2 at least) and a port that never
    answers the ClientHello times out (paho's 5 s): each a failed attempt, never
    "connected", retried, the cause logged once, the process up."""
    peer = Peer(mode, pki.server["good"])
    cfg = write_config(
        tmp_path / "agent.yaml", peer.port, one_point_device(1, "1s"), tls_block(pki)
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: peer.accepted >= 2, 20, "a second attempt")
        time.sleep(0.2)
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        code = agent.stop()
        peer.close()
    log = agent.log()
    assert code == 0, log
    assert len(error_lines(log, needle)) == 1, log
    assert "connected to mqtt" not in log


def test_case_048_tls_towards_a_plain_mqtt_port_says_which_port(
    tmp_path: Path, pki: Pki, broker: Mosquitto
) -> None:
    """TLS towards a broker's plain MQTT listener (it hangs up on the ClientHello): a
    failed attempt whose cause names the port mix-up, logged once over several attempts."""
    cfg = write_config(
        tmp_path / "agent.yaml", broker.port, one_point_device(1, "1s"), tls_block(pki)
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    needle = "closed the connection during the TLS handshake"
    try:
        wait_until(lambda: needle in agent.log(), 10, "the cause")
        time.sleep(1.5)  # several more attempts (reconnect_max 500 ms)
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        code = agent.stop()
    log = agent.log()
    assert code == 0, log
    assert len(error_lines(log, needle)) == 1, log
    assert "is this the broker's TLS port?" in log and "connected to mqtt" not in log
    assert log.count("Connection reset by peer") <= 1, log


AS_VALIDATE = [sys.executable, "-m", "agent", "validate", "agent.yaml"]
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@contextlib.contextmanager
def traversable_by_others(path: Path) -> Iterator[None]:
    """While inside: ``path`` and its parents may be passed through by any user (``o+x``,
    not listed), so that ``nobody`` reaches the checkout and its ``.venv`` (a clone in a
    fresh ``mktemp -d`` is mode 700); the modes are put back after."""
    changed = []
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & 0o001 and os.geteuid() == p.stat().st_uid:
            p.chmod(mode | 0o001)
            changed.append((p, mode))
    try:
        yield
    finally:
        for p, mode in changed:
            p.chmod(mode)


def test_unreadable_secret_files_are_each_named(pki: Pki) -> None:
    """validate run as the service's user (here: nobody, by setpriv: root or password-less
    sudo, as the disk-fault tests) on files only root can read: the password file and the
    key are each named at their own line, in one run (the certificate, readable, is not
    blamed)."""
    d = Path(tempfile.mkdtemp(prefix="perm-", dir="/tmp"))
    try:
        d.chmod(0o755)
        cert, key = pki.client_old
        for src, name, mode in ((pki.city.cert, "ca.pem", 0o644), (cert, "gw.pem", 0o644)):
            shutil.copy(src, d / name)
            (d / name).chmod(mode)
        shutil.copy(key, d / "gw.key")
        (d / "gw.key").chmod(0o600)
        (d / "mqtt.pw").write_text("pw\n")
        (d / "mqtt.pw").chmod(0o600)
        (d / "agent.yaml").write_text(
            "gateway_id: gw\nstate_dir: state\nmqtt:\n  host: 10.0.0.5\n  username: gw\n"
            "  password_file: mqtt.pw\n  tls:\n    ca_file: ca.pem\n    cert_file: gw.pem\n"
            "    key_file: gw.key\n" + DEVICE
        )
        (d / "agent.yaml").chmod(0o644)
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        with traversable_by_others(REPO):
            done = subprocess.run(
                [*sudo, *AS_NOBODY, *AS_VALIDATE],
                cwd=d,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                check=False,
            )
    finally:
        shutil.rmtree(d)
    assert done.returncode == 78, done.stderr
    lines = done.stderr.splitlines()
    assert any(ln.startswith("agent.yaml:6:18: mqtt.password_file: cannot read") for ln in lines)
    assert any(
        ln.startswith("agent.yaml:10:15: mqtt.tls.key_file: cannot read") and "gw.key" in ln
        for ln in lines
    ), lines
    assert not [ln for ln in lines if "cert_file" in ln], lines


class AckBurstBroker:
    """A TLS peer speaking just enough MQTT 3.1.1: CONNACK, then it reads ``n`` QoS 1
    PUBLISHes and answers them all with one ``sendall`` of ``n`` PUBACKs (one TLS record),
    noting when (:attr:`sent_at`, monotonic)."""

    def __init__(self, server: tuple[Path, Path], n: int) -> None:
        self.n = n
        self.sent_at = 0.0
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*server)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            raw, _ = self.sock.accept()
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                assert read_packet(conn)[0] == 0x10  # CONNECT
                conn.sendall(b"\x20\x02\x00\x00")
                mids = []
                while len(mids) < self.n:
                    first, body = read_packet(conn)
                    if first & 0xF0 == 0x30:
                        size = int.from_bytes(body[:2], "big")
                        mids.append(body[2 + size : 4 + size])
                conn.sendall(b"".join(b"\x40\x02" + mid for mid in mids))
                self.sent_at = time.monotonic()
                while read_packet(conn)[0] != 0xE0:  # until DISCONNECT
                    pass

    def close(self) -> None:
        self.sock.close()


def test_more_packets_than_one_read_in_one_tls_record_are_read_at_once(pki: Pki) -> None:
    """One wake-up of the loop handles at most PACKETS_PER_READ packets; the rest of a TLS
    record, already decrypted and so invisible to the selector, is read at the next loop
    iteration, not at the link's next 0.5 s tick."""
    n = 3 * PACKETS_PER_READ
    peer = AckBurstBroker(pki.server["good_ip"], n)

    async def run() -> list[float]:
        tls = TlsConfig(ca_file=str(pki.city.cert), server_name=NAME)
        cfg = MqttConfig(port=peer.port, tls=tls, max_inflight=1000)
        link = MqttLink(cfg, "burst", "lifeline/burst/status")
        acked: list[float] = []
        done = asyncio.Event()

        def on_puback(mid: int, ok: bool, reason: str) -> None:
            acked.append(time.monotonic())
            if len(acked) == n:
                done.set()

        link.on_puback = on_puback
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                await link.connected.wait()
            for i in range(n):
                link.publish("lifeline/burst/x", str(i).encode())
            async with asyncio.timeout(10):
                await done.wait()
        finally:
            await link.stop()
            task.cancel()
        return acked

    try:
        acked = asyncio.run(run())
    finally:
        peer.close()
    late = max(acked) - peer.sent_at
    print(f"\n{n} PUBACKs in one TLS record, the last handled {late * 1000:.1f} ms after")
    assert len(acked) == n
    assert late < 0.3, f"the last PUBACK was handled {late:.2f} s after it was sent"
