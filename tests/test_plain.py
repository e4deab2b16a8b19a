"""The config as plain twins (drivers.plain): what the running agent holds instead of the
pydantic models. Every value and every computed property of every model of a config that
uses every section must reach the twin unchanged."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from agent.config.loader import load_config
from agent.contract.info import config_hash
from drivers.plain import Plain, Secret, plain_data, to_plain, twin_class
from tests.helpers import REPO
from tests.pki import make_ca

EXAMPLE = REPO / "config"

EXTRA_DEVICES = """
  - id: rain-gauge
    driver: serial_line
    serial_port: /dev/ttyUSB7
    terminator: CRLF
    parser: {kind: regex, pattern: 'R=(?P<rain>[0-9.]+)'}
    points:
      - {name: rain, unit: mm}
  - id: quake-1
    driver: seismic
    udp_port: 8888
    format: datacast
    udp_senders: [192.168.1.50, 10.0.0.0/24]
    udp_host: 0.0.0.0
    sample_rate: 100
    channels: [{name: EHZ}, {name: ENE}, {name: ENN, scale: 0.5}]
"""

MQTT = """mqtt:
  username: gw017
  password: not-a-real-secret-3141
  tls: {ca_file: ca.pem}
  failover_after: 2
  brokers:
    - host: broker-a.city.example
    - {host: 10.1.1.1, port: 18883, server_name: broker-b.city.example}
    - {host: 127.0.0.1, port: 1883, tls: false}
  topic_prefix: lifeline
"""


@pytest.fixture
def rich(tmp_path: Path) -> Path:
    """The example config (every Modbus transport, profiles, alarms, outputs, GPIO,
    commands) with a text-line sensor, a seismic sensor and three brokers added."""
    shutil.copytree(EXAMPLE, tmp_path / "config")
    path = tmp_path / "config" / "agent.example.yaml"
    text = path.read_text()
    head, rest = text.split("\nmqtt:\n", 1)
    _, rest = rest.split("\nbuffer:\n", 1)
    text = head + "\n" + MQTT + "\nbuffer:\n" + rest
    text = text.replace("state_dir: /var/lib/edge-agent", f"state_dir: {tmp_path / 'state'}")
    text = text.replace("\ndevices:\n", "\ndevices:\n" + EXTRA_DEVICES.lstrip("\n"), 1)
    path.write_text(text)
    ca = make_ca(tmp_path, "Test CA")
    (tmp_path / "config" / "ca.pem").write_bytes(ca.cert.read_bytes())
    return path


def walk(model: BaseModel, twin: Any, where: str, seen: set[str]) -> None:
    """Assert ``twin`` mirrors ``model``: class name, every field (recursively), every
    computed value."""
    cls = type(model)
    seen.add(cls.__name__)
    assert isinstance(twin, Plain), where
    assert type(twin).__name__ == cls.__name__, where
    assert tuple(type(twin).model_fields) == tuple(cls.model_fields), where
    for name in cls.model_fields:
        same(getattr(model, name), getattr(twin, name), f"{where}.{name}", seen)
    for name in getattr(cls, "__plain_computed__", ()):
        if name == "endpoints" and getattr(model, name) == [model]:
            assert getattr(twin, name) == [twin]  # itself, not a copy
            continue
        same(getattr(model, name), getattr(twin, name), f"{where}.{name}()", seen)


def same(value: Any, twin: Any, where: str, seen: set[str]) -> None:
    from pydantic import SecretStr

    if isinstance(value, BaseModel):
        walk(value, twin, where, seen)
    elif isinstance(value, SecretStr):
        assert isinstance(twin, Secret), where
        assert twin.get_secret_value() == value.get_secret_value(), where
    elif isinstance(value, list | tuple):
        assert type(twin) is type(value) and len(twin) == len(value), where
        for i, (v, t) in enumerate(zip(value, twin, strict=True)):
            same(v, t, f"{where}[{i}]", seen)
    elif isinstance(value, dict):
        assert list(twin) == list(value), where
        for k in value:
            same(value[k], twin[k], f"{where}[{k!r}]", seen)
    elif isinstance(value, float) and math.isnan(value):  # a fault rule's clear_level
        assert math.isnan(twin), where
    else:
        assert twin == value and type(twin) is type(value), where


def test_every_field_and_computed_value_reaches_the_twin(rich: Path) -> None:
    model = load_config(rich, True)
    twin = to_plain(model)
    seen: set[str] = set()
    walk(model, twin, "config", seen)
    # the config really used what this test is about
    assert {
        "MqttConfig",
        "BrokerConfig",
        "TlsConfig",
        "ModbusTcpDevice",
        "ModbusRtuDevice",
        "ModbusRtuOverTcpDevice",
        "ModbusPoint",
        "SerialLineDevice",
        "LineParser",
        "LinePoint",
        "SeismicDevice",
        "SeismicChannel",
        "AlarmRule",
        "OutputConfig",
        "GpioConfig",
        "CommandsConfig",
        "BufferConfig",
        "ClockConfig",
    } <= seen
    assert len(twin.mqtt.endpoints) == 3
    assert twin.mqtt.endpoints[1].tls_settings.server_name == "broker-b.city.example"
    assert twin.mqtt.endpoints[2].tls_settings is None


def test_a_twin_survives_pickle_and_compares_like_the_model(rich: Path) -> None:
    model = load_config(rich, True)
    twin = to_plain(model)
    back = pickle.loads(pickle.dumps(twin, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == twin and back is not twin
    assert back.mqtt.endpoints[0].endpoints == [back.mqtt.endpoints[0]]
    assert plain_data(back) == plain_data(twin)
    assert config_hash(back) == config_hash(model)
    # equal fields: equal twins and hashes; one field changed: not equal
    point = next(d for d in back.devices if d.driver == "modbus_tcp").points[0]
    assert point.model_copy() == point
    assert hash(back.buffer.model_copy()) == hash(back.buffer) == hash(twin.buffer)
    moved = point.model_copy(update={"address": point.address + 1})
    assert moved != point and moved.address == point.address + 1
    with pytest.raises(KeyError):
        point.model_copy(update={"register_count": 9})  # computed: follows the fields


def test_a_twin_is_frozen_and_keeps_its_secret(rich: Path) -> None:
    twin = to_plain(load_config(rich, True))
    with pytest.raises(AttributeError):
        twin.gateway_id = "other"
    with pytest.raises(AttributeError):
        del twin.devices[0].points[0].name
    password = twin.mqtt.password
    assert isinstance(password, Secret)
    assert password.get_secret_value() == "not-a-real-secret-3141"
    shown = repr(twin) + str(password) + repr(password) + str(plain_data(twin))
    assert "not-a-real-secret-3141" not in shown
    assert "**********" in repr(password)


def test_twin_classes_are_one_per_spec_and_refuse_bad_names() -> None:
    spec = ("Thing", ("a", "b"), ("c",))
    assert twin_class(spec) is twin_class(spec)
    with pytest.raises(ValueError, match="bad twin spec"):
        twin_class(("Evil", ("a", "__class__; import os"), ()))
    with pytest.raises(ValueError, match="bad twin spec"):
        twin_class(("Twice", ("a", "a"), ()))


def test_a_pydantic_type_without_a_plain_form_is_refused() -> None:
    from pydantic import SecretBytes

    with pytest.raises(TypeError, match="SecretBytes"):
        to_plain([SecretBytes(b"x")])
