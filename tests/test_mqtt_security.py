"""TLS (CA + client certificate), username/password and MQTT 5 against a real mosquitto."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    free_port,
    one_point_device,
    wait_until,
    write_config,
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    for f in d.iterdir():
        f.chmod(0o644)


@dataclass
class SecureBroker:
    broker: Mosquitto
    pki: Path
    tls_port: int


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The certificates of :func:`make_pki`, made once for this file's tests (which only
    read them)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("this test needs the openssl command (apt-get install openssl)")
    pki = tmp_path_factory.mktemp("pki")
    make_pki(pki)
    return pki


@pytest.fixture
def secure_broker(tmp_path: Path, pki_dir: Path) -> Iterator[SecureBroker]:
    pki = pki_dir
    pw = tmp_path / "broker" / "passwd"
    pw.parent.mkdir(parents=True)
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pw), "gw017", "s3cret"],
        check=True,
        capture_output=True,
    )
    pw.chmod(0o644)
    tls_port = free_port()
    b = Mosquitto(
        tmp_path / "broker",
        extra_conf=(
            f"listener {tls_port} 127.0.0.1\n"
            f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\n"
            f"keyfile {pki / 'server.key'}\nrequire_certificate true\n"
            f"password_file {pw}\nallow_anonymous false\n"
        ),
    )
    b.start()
    wait_until(lambda: _port_open(tls_port), 10, "TLS listener")
    yield SecureBroker(b, pki, tls_port)
    b.stop()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_tls_client_cert_auth_and_protocols(
    tmp_path: Path, secure_broker: SecureBroker, protocol: str
) -> None:
    pki, tls_port = secure_broker.pki, secure_broker.tls_port
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.set_raw(1, "holding", 0, [7])
    sim.start_thread()
    # the platform reads over TLS too, as a second client with the same CA
    got: list[bytes] = []
    sub = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="platform", protocol=MQTTProtocolVersion.MQTTv5
    )
    sub.tls_set(
        ca_certs=str(pki / "ca.pem"),
        certfile=str(pki / "client.pem"),
        keyfile=str(pki / "client.key"),
        cert_reqs=ssl.CERT_REQUIRED,
    )
    sub.username_pw_set("gw017", "s3cret")
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect("127.0.0.1", tls_port)
    sub.subscribe("lifeline/#", qos=1)
    sub.loop_start()
    devices = one_point_device(sim.port, "200ms")
    extra = (
        f'  protocol: "{protocol}"\n'
        "  username: gw017\n"
        "  password: s3cret\n"
        "  tls:\n"
        f"    ca_file: {pki / 'ca.pem'}\n"
        f"    cert_file: {pki / 'client.pem'}\n"
        f"    key_file: {pki / 'client.key'}\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", tls_port, devices, extra)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: sum(b'"seq"' in p for p in got) >= 3, 15, "telemetry over TLS")
        assert b"online" in got
    finally:
        code = agent.stop()
        sub.loop_stop()
        sim.stop_thread()
    assert code == 0, agent.log()


def test_wrong_password_is_reported_not_fatal(tmp_path: Path, secure_broker: SecureBroker) -> None:
    pki, tls_port = secure_broker.pki, secure_broker.tls_port
    devices = one_point_device(1, "1s")
    extra = (
        "  username: gw017\n  password: wrong\n  tls:\n"
        f"    ca_file: {pki / 'ca.pem'}\n    cert_file: {pki / 'client.pem'}\n"
        f"    key_file: {pki / 'client.key'}\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", tls_port, devices, extra)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: "refused the connection" in agent.log(), 10, "the refusal in the log")
    assert agent.proc is not None and agent.proc.poll() is None, "still running"
    assert agent.stop() == 0
    log = agent.log()
    assert "Not authorized" in log or "Bad user name or password" in log, log
    assert "check mqtt.username and its password" in log, log
