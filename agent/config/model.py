"""Typed config models of the agent (pydantic 2, unknown keys forbidden).

The YAML layout is documented in ``config/agent.example.yaml``; every key there maps to a
field here.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    model_validator,
)

from agent.config.alarms import AlarmRule, GpioConfig, OutputConfig
from agent.tls import is_loopback, mqtt_string_problem
from drivers.common import Duration, HostName, Name, Size, StrictModel, at_least
from drivers.modbus.config import (
    ModbusRtuDevice,
    ModbusRtuOverTcpDevice,
    ModbusTcpDevice,
)
from drivers.names import control_character, short_repr, topic_prefix_problem
from drivers.seismic_config import SeismicDevice
from drivers.serial_config import SerialLineDevice


def _topic_prefix(value: str) -> str:
    problem = topic_prefix_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]
"""``mqtt.topic_prefix``: safe topic levels (:func:`drivers.names.topic_prefix_problem`)."""

CLIENT_ID_MAX = 128
"""Longest ``mqtt.client_id``, characters."""
_CLIENT_ID_RE = re.compile(rf"[A-Za-z0-9_.:-]{{1,{CLIENT_ID_MAX}}}")
CLIENT_ID_RULE = (
    f"a client id is 1 to {CLIENT_ID_MAX} letters, digits, '-', '_', '.' or ':' (no spaces, "
    "'/', '+', '#' or control characters)"
)
PORTABLE_CLIENT_ID_MAX = 23
"""Every MQTT 3.1.1 server accepts client ids of 1 to 23 letters and digits; longer ones,
or other characters, it MAY refuse (MQTT 3.1.1 section 3.1.3.1)."""


def client_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be ``mqtt.client_id``, with a fix; None if it can.

    Allowed: 1 to :data:`CLIENT_ID_MAX` of ``A-Z a-z 0-9 - _ . :``. MQTT allows any UTF-8
    string but U+0000 (MQTT 3.1.1 section 1.5.3), and servers may refuse what is not 1 to
    23 letters and digits (section 3.1.3.1); brokers take the id into ACL patterns
    (mosquitto's ``%c``), log lines and file names of persisted sessions, where ``/``,
    ``+``, ``#``, white space and control characters do harm.
    """
    if _CLIENT_ID_RE.fullmatch(value):
        return None
    if not value:
        why = "it is empty (leave client_id out for the default '<gateway_id>-<machine>')"
    elif len(value) > CLIENT_ID_MAX:
        why = f"it is {len(value)} characters long"
    elif (bad := control_character(value)) is not None:
        why = f"it holds the control character U+{ord(bad):04X}"
    else:
        odd = next(c for c in value if not _CLIENT_ID_RE.fullmatch(c))
        why = f"{odd!r} is not allowed"
    fix = re.sub(r"[^A-Za-z0-9_.:-]+", "-", value[: CLIENT_ID_MAX * 2]).strip("-")
    fix = fix[:CLIENT_ID_MAX].rstrip("-")
    hint = f"; try '{fix}'" if fix and fix != value else ""
    return f"{short_repr(value)} is not allowed: {why}; {CLIENT_ID_RULE}{hint}"


def _client_id(value: str) -> str:
    problem = client_id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


ClientId = Annotated[str, AfterValidator(_client_id)]
"""``mqtt.client_id``: see :func:`client_id_problem`."""


def _driver_of(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("driver", "modbus_tcp"))
    return str(getattr(value, "driver", "modbus_tcp"))


Device = Annotated[
    Annotated[ModbusTcpDevice, Tag("modbus_tcp")]
    | Annotated[ModbusRtuDevice, Tag("modbus_rtu")]
    | Annotated[ModbusRtuOverTcpDevice, Tag("modbus_rtu_over_tcp")]
    | Annotated[SerialLineDevice, Tag("serial_line")]
    | Annotated[SeismicDevice, Tag("seismic")],
    Discriminator(_driver_of),
]
"""Every device kind the agent knows, chosen by ``driver`` (default ``modbus_tcp``)."""


def _credential_name(value: str) -> str:
    if value in (".", ".."):
        raise ValueError(
            f"{value!r} is not a credential name: use the NAME of LoadCredential=NAME:…"
        )
    return value


CredentialName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_.@-]{1,255}$",
        description="Name of a systemd credential (LoadCredential=NAME:...), a file name",
    ),
    AfterValidator(_credential_name),
]
"""A systemd credential name: a file name in ``$CREDENTIALS_DIRECTORY`` (systemd.exec(5),
"Credentials")."""


class TlsConfig(StrictModel):
    """TLS towards the broker. Relative paths are relative to the config file.

    The broker's certificate is always verified (against ``ca_file``, or the system's CA
    store without it) and must name the host connected to, or ``server_name``; TLS 1.2 is
    the least version offered. See :mod:`agent.tls`.
    """

    ca_file: str | None = Field(
        default=None, description="CA bundle (PEM) to verify the broker (default: system CAs)"
    )
    cert_file: str | None = Field(default=None, description="Client certificate (PEM)")
    key_file: str | None = Field(default=None, description="Client private key (PEM)")
    key_credential: CredentialName | None = Field(
        default=None,
        description="The client key as a systemd credential (LoadCredential=), instead of key_file",
    )
    server_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Name checked against the broker's certificate and sent as SNI, when "
        "connecting by IP address (default: mqtt.host)",
    )
    insecure: bool = Field(
        default=False,
        description="Do not verify the broker's certificate at all (testing only; warned "
        "about at every start and connect)",
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if self.key_file is not None and self.key_credential is not None:
            raise ValueError("key_file and key_credential both given: use one of them")
        has_key = self.key_file is not None or self.key_credential is not None
        if (self.cert_file is not None) == has_key:
            return self
        if self.cert_file is None:
            raise ValueError("a client key needs its certificate: give cert_file too")
        raise ValueError(
            "cert_file and key_file go together: give the client key as key_file (or "
            "key_credential)"
        )

    __plain_computed__: ClassVar[tuple[str, ...]] = ("has_client_cert",)

    @property
    def has_client_cert(self) -> bool:
        """Whether a client certificate is configured (mutual TLS)."""
        return self.cert_file is not None


def _mqtt_string(value: str) -> str:
    problem = mqtt_string_problem(value)
    if problem is not None:
        raise ValueError(f"it {problem}")
    return value


def _mqtt_secret(value: SecretStr) -> SecretStr:
    problem = mqtt_string_problem(value.get_secret_value())
    if problem is not None:  # the value is never part of the message
        raise ValueError(f"the password {problem}; the value is not repeated here")
    return value


MqttString = Annotated[str, AfterValidator(_mqtt_string)]
"""A UTF-8 string of the MQTT protocol: no U+0000, no surrogates, at most 65,535 bytes
(MQTT 3.1.1 section 1.5.3; :func:`agent.tls.mqtt_string_problem`)."""
MqttSecret = Annotated[SecretStr, AfterValidator(_mqtt_secret)]
"""A secret :data:`MqttString` (the password)."""


def _tls_kind(value: Any) -> str:
    return "mapping" if isinstance(value, dict | TlsConfig) else "switch"


TlsSetting = Annotated[
    Annotated[TlsConfig, Tag("mapping")] | Annotated[bool, Tag("switch")],
    Discriminator(_tls_kind),
]
"""``mqtt.tls``: ``true``/``false`` or a mapping of TLS settings."""

MAX_BROKERS = 8
"""Most entries of ``mqtt.brokers``."""


class BrokerConfig(StrictModel):
    """One entry of ``mqtt.brokers``: where to connect and with which TLS; everything
    else (credentials, client id, protocol, timing) is the ``mqtt`` section's."""

    host: HostName
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Default: 8883 with TLS, 1883 without"
    )
    tls: TlsSetting | None = Field(
        default=None,
        description="Absent: mqtt.tls applies (itself absent: TLS unless host is a loopback "
        "address); false; true; or a mapping of settings for this broker alone",
    )
    server_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Name checked against this broker's certificate and sent as SNI, in "
        "place of its TLS settings' server_name (default: host)",
    )


class ThingsBoardConfig(StrictModel):
    """``mqtt.thingsboard``: the gateway device's credentials on a ThingsBoard platform
    (``mqtt.format: thingsboard``). Its access token is the MQTT user name (ThingsBoard,
    MQTT Device API); it is a secret, so it is read from a file or a systemd credential,
    never written in the config. Basic MQTT credentials go in ``username`` and
    ``password_file`` instead, as for any broker."""

    access_token_file: str | None = Field(
        default=None,
        min_length=1,
        description="File holding the gateway device's access token (trailing newline "
        "ignored); relative: to the config file",
    )
    access_token_credential: CredentialName | None = Field(
        default=None,
        description="systemd credential holding the access token (LoadCredential=NAME:FILE)",
    )

    @model_validator(mode="after")
    def _check(self) -> ThingsBoardConfig:
        if self.access_token_file is not None and self.access_token_credential is not None:
            raise ValueError("access_token_file and access_token_credential both given: use one")
        return self


class SparkplugConfig(StrictModel):
    """Ids of the gateway as a Sparkplug B Edge Node (``mqtt.format: sparkplug_b``;
    Eclipse Sparkplug Specification v3.0.0, 1.4.1.8: each a valid MQTT topic level, here
    an id of the safe set)."""

    group_id: Name = Field(description="Sparkplug Group ID (letters, digits, '_', '.', '-')")
    edge_node_id: Name | None = Field(
        default=None, description="Sparkplug Edge Node ID; defaults to gateway_id"
    )


class MqttConfig(StrictModel):
    """Connection to the city platform's MQTT broker.

    ``tls`` absent means TLS towards any host that is not a loopback address
    (:func:`agent.tls.is_loopback`) and towards port 8883, plain MQTT to a loopback one
    otherwise; ``false`` turns it off,
    ``true`` turns it on with the system's CAs. ``port`` defaults to 8883 with TLS and 1883
    without (use :attr:`broker_port`, :attr:`tls_settings`).
    """

    host: HostName = Field(default="127.0.0.1")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Default: 8883 with TLS, 1883 without"
    )
    brokers: list[BrokerConfig] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_BROKERS,
        description="Several brokers in order of preference, instead of host and port: the "
        "next after failover_after failed attempts, back to the first once it answers",
    )
    failover_after: int = Field(
        default=3,
        ge=1,
        le=100,
        description="With brokers: failed connection attempts in a row to one broker before "
        "the next is tried",
    )
    return_after: Annotated[Duration, at_least("1s")] = Field(
        default=300.0,
        description="With brokers, while connected to another than the first: how often the "
        "first is probed (a connect and disconnect); back to it once it answers",
    )
    protocol: Annotated[Literal["3.1.1", "5"], BeforeValidator(str)] = Field(
        default="3.1.1", description="MQTT protocol version: 3.1.1 or 5"
    )
    topic_prefix: TopicPrefix = Field(
        default="lifeline",
        description="First topic level(s), e.g. 'lifeline' or 'city/zz/lifeline': ids "
        "separated by single '/', at most 100 characters, no leading '$'",
    )
    client_id: ClientId | None = Field(
        default=None,
        description="1 to 128 letters, digits, '-', '_', '.' or ':'; defaults to "
        "'<gateway_id>-<8 hex of /etc/machine-id>'",
    )
    username: MqttString | None = None
    password: MqttSecret | None = Field(
        default=None,
        description="The password itself (prefer password_file or password_credential)",
    )
    password_file: str | None = Field(
        default=None,
        min_length=1,
        description="File holding the password (trailing newline ignored); relative: to "
        "the config file",
    )
    password_credential: CredentialName | None = Field(
        default=None,
        description="systemd credential holding the password (LoadCredential=NAME:FILE)",
    )
    allow_plaintext_credentials: bool = Field(
        default=False,
        description="Allow username/password without TLS to a host that is not a loopback "
        "address (they cross the network in clear)",
    )
    tls: TlsSetting | None = Field(
        default=None,
        description="Absent: TLS unless host is a loopback address; false; true; or a "
        "mapping of settings",
    )
    keepalive: Annotated[Duration, at_least("5s")] = Field(
        default=60.0, description="MQTT keep-alive, e.g. '60s'"
    )
    clean_session: bool = Field(
        default=True,
        description="MQTT clean session / clean start; the disk buffer is kept either way",
    )
    reconnect_min: Annotated[Duration, at_least("100ms")] = Field(
        default=1.0, description="First reconnect delay"
    )
    reconnect_max: Duration = Field(default=60.0, description="Longest reconnect delay")
    max_inflight: int = Field(default=64, ge=1, le=65535, description="Unacknowledged messages")
    payload: Literal["verbose", "compact"] = Field(
        default="verbose",
        description="Telemetry payload: verbose (telemetry/1: every point with its unit and "
        "quality) or compact (telemetry_compact/1: values only, in the order info lists "
        "the points; quality only where not good)",
    )
    max_batch_delay: Duration = Field(
        default=0.0,
        ge=0,
        le=60,
        description="Compact payload only: polls of one device within this long go into one "
        "message, e.g. '5s' (0: one message per poll). They wait in memory until then: a "
        "crash or power cut loses up to this much of each device's readings",
    )
    format: Literal["native", "sparkplug_b", "thingsboard"] = Field(
        default="native",
        description="Output format: native (this project's JSON contract, docs/mqtt.md), "
        "sparkplug_b (Eclipse Sparkplug 3.0: NBIRTH/DBIRTH/DDATA/DDEATH, NDEATH as will; "
        "needs the sparkplug section) or thingsboard (the ThingsBoard gateway MQTT API)",
    )
    sparkplug: SparkplugConfig | None = Field(
        default=None, description="Sparkplug ids (format: sparkplug_b)"
    )
    compression: Literal["none", "zlib"] = Field(
        default="none",
        description="Compact payload only: zlib deflates every telemetry message with the "
        "contract's preset dictionary (docs/mqtt.md, Compression)",
    )
    thingsboard: ThingsBoardConfig | None = Field(
        default=None,
        description="format thingsboard: access_token_file or access_token_credential",
    )

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        sources = [
            k
            for k in ("password", "password_file", "password_credential")
            if getattr(self, k) is not None
        ]
        if len(sources) > 1:
            raise ValueError(f"{' and '.join(sources)} both given: use one of them")
        if sources and self.username is None:
            raise ValueError(f"{sources[0]} given without username")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must not be shorter than reconnect_min")
        if self.keepalive > 65535:
            raise ValueError("keepalive must be at most 65535s (MQTT 3.1.1 section 3.1.2.10)")
        if self.format == "sparkplug_b":
            if self.sparkplug is None:
                raise ValueError("format: sparkplug_b needs 'sparkplug: {group_id: ...}'")
            if self.payload != "verbose":
                raise ValueError(
                    "format: sparkplug_b has its own binary encoding: use payload: verbose"
                )
            if not self.clean_session:
                raise ValueError(
                    "format: sparkplug_b needs clean_session: true (Sparkplug 3.0, "
                    "message flow: an Edge Node's session starts clean)"
                )
        elif self.sparkplug is not None:
            raise ValueError("sparkplug applies to format: sparkplug_b only")
        views = self.endpoints if self.brokers is not None else []
        for i, (broker, view) in enumerate(zip(self.brokers or [], views, strict=True)):
            if broker.server_name is not None and view.tls_settings is None:
                raise ValueError(
                    f"brokers[{i}].server_name is for TLS, which is off towards {broker.host}"
                )
        if self.payload == "verbose":
            if self.max_batch_delay > 0:
                raise ValueError("max_batch_delay needs payload: compact")
            if self.compression != "none":
                raise ValueError("compression needs payload: compact")
        self._check_thingsboard()
        return self

    def _check_thingsboard(self) -> None:
        tb = self.thingsboard
        token = tb is not None and (
            tb.access_token_file is not None or tb.access_token_credential is not None
        )
        if tb is not None and self.format != "thingsboard":
            raise ValueError("thingsboard settings need format: thingsboard")
        if self.format == "thingsboard":
            if self.payload != "verbose":
                raise ValueError(
                    "format thingsboard sends its own telemetry shape: payload compact "
                    "is for the native format"
                )
            if token and self.username is not None:
                raise ValueError(
                    "thingsboard access token and username both given: the token is the "
                    "user name (or use username and a password for basic MQTT credentials)"
                )

    __plain_computed__: ClassVar[tuple[str, ...]] = (
        "tls_settings",
        "endpoints",
        "broker_port",
        "password_source",
    )

    @property
    def tls_settings(self) -> TlsConfig | None:
        """The TLS settings in force, or None for plain MQTT (see the class docstring)."""
        if isinstance(self.tls, TlsConfig):
            return self.tls
        if self.tls is None:  # 8883 is MQTT over TLS (IANA): never plain MQTT there
            plain = is_loopback(self.host) and self.port != 8883
            return None if plain else TlsConfig()
        return TlsConfig() if self.tls else None

    @property
    def endpoints(self) -> list[MqttConfig]:
        """The brokers to connect to, in order of preference, each as an ``mqtt`` section
        of its own (``host``, ``port`` and ``tls`` its own, the rest this section's, no
        ``brokers``): this section alone without ``brokers``."""
        if self.brokers is None:
            return [self]
        out: list[MqttConfig] = []
        for b in self.brokers:
            view = self.model_copy(
                update={
                    "host": b.host,
                    "port": b.port,
                    "tls": self.tls if b.tls is None else b.tls,
                    "brokers": None,
                }
            )
            settings = view.tls_settings
            if b.server_name is not None and settings is not None:
                named = settings.model_copy(update={"server_name": b.server_name})
                view = view.model_copy(update={"tls": named})
            out.append(view)
        return out

    @property
    def broker_port(self) -> int:
        """``port``, or 8883 (MQTT over TLS, IANA) with TLS and 1883 without."""
        if self.port is not None:
            return self.port
        return 8883 if self.tls_settings is not None else 1883

    @property
    def password_source(self) -> str | None:
        """Which key gives the password (``password``, ``password_file``,
        ``password_credential``), or None."""
        for key in ("password", "password_file", "password_credential"):
            if getattr(self, key) is not None:
                return key
        return None


class BufferConfig(StrictModel):
    """The durable store-and-forward buffer (SQLite, WAL) under ``state_dir``."""

    max_messages: int = Field(
        default=200_000,
        ge=10,
        description="Cap on unsent messages; beyond it the oldest telemetry is dropped",
    )
    max_bytes: Size | None = Field(
        default=None,
        ge=1_000_000,
        description="Cap on the database size, e.g. '200MB'; beyond it the oldest telemetry "
        "is dropped (alarm events never)",
    )
    min_free: Size = Field(
        default=50_000_000,
        description="Free space to leave on the filesystem, e.g. '50MB': below it the "
        "buffer stops growing and drops its oldest telemetry for new readings",
    )
    drain_rate: int = Field(
        default=2000,
        ge=0,
        description="Most backlog messages published per second after an outage (0: no "
        "limit); live readings and alarm events go out at once, ahead of the backlog",
    )
    disk_retry: Annotated[Duration, at_least("1s")] = Field(
        default=30.0,
        description="With the buffer in memory (read-only or full filesystem at start): how "
        "often the disk is tried again",
    )
    stall_after: Annotated[Duration, at_least("1s")] = Field(
        default=30.0,
        description="When no buffer commit has succeeded for this long (the file locked by "
        "another program, a disk that stops answering), health says buffer_error and a "
        "buffer_stalled notice is queued; readings wait in memory meanwhile",
    )
    commit_every: Duration = Field(
        default=0.0,
        ge=0,
        le=60,
        description="Least time between two buffer commits (0: one commit per polling "
        "cycle); longer groups more polls per write (less SD-card wear), at the price of "
        "that much latency and power-cut window. Alarm events are committed at once",
    )
    synchronous: Literal["normal", "full"] = Field(
        default="normal",
        description="SQLite synchronous level: normal (no corruption, may lose the last "
        "commits on power loss) or full (fsync every commit, more SD-card wear)",
    )


class ClockConfig(StrictModel):
    """Whether the wall clock can be trusted (see ``docs/reliability.md``, "Clock trust")."""

    sync: Literal["auto", "kernel", "file", "assume"] = Field(
        default="auto",
        description="What says the clock is synchronised: auto (the kernel's NTP status or "
        "sync_file), kernel, file, or assume (always: a GNSS-disciplined clock)",
    )
    sync_file: str = Field(
        default="/run/systemd/timesync/synchronized",
        description="File whose existence means synchronised (systemd-timesyncd creates "
        "this one at its first synchronisation)",
    )
    not_before: date | None = Field(
        default=None,
        description="Time stamps before this date (UTC) are never trusted (default: the "
        "release date of the agent)",
    )

    @model_validator(mode="after")
    def _check(self) -> ClockConfig:
        if not self.sync_file.strip():
            raise ValueError("sync_file is empty: give the path of the flag file")
        if self.not_before is not None and self.not_before > date.today():
            raise ValueError(
                f"not_before {self.not_before} is in the future: the clock would never be "
                "trusted; use a date in the past, such as the day this gateway was set up"
            )
        return self

    __plain_computed__: ClassVar[tuple[str, ...]] = ("not_before_ms",)

    @property
    def not_before_ms(self) -> int | None:
        """:attr:`not_before` as UTC milliseconds (None: the default)."""
        if self.not_before is None:
            return None
        start = datetime.combine(self.not_before, datetime.min.time(), tzinfo=UTC)
        return int(start.timestamp()) * 1000


class AvailabilityConfig(StrictModel):
    """When a device counts as offline (``{prefix}/{gateway_id}/availability/{device}``)."""

    offline_after: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Consecutive polls without an answer that make a polled device offline",
    )
    stream_timeout: Annotated[Duration, at_least("1s")] = Field(
        default=10.0,
        description="Silence that makes a streaming sensor (serial line without request, "
        "seismic) offline",
    )


COMMAND_NAMES = ("ping", "read", "ack", "set_interval", "write", "reload")
"""Every downlink command the agent knows (``docs/mqtt.md``, Commands)."""

CommandName = Literal["ping", "read", "ack", "set_interval", "write", "reload"]


class CommandsConfig(StrictModel):
    """Downlink commands from the platform (``{prefix}/{gateway_id}/cmd/{name}``, see
    :mod:`agent.commands`). Every command but ``ping`` is refused unless listed in
    ``allow``."""

    allow: list[CommandName] = Field(
        default_factory=list,
        description="Commands the platform may send besides ping: read, ack, set_interval, "
        "write, reload",
    )
    max_age: Annotated[Duration, at_least("1s")] = Field(
        default=60.0,
        description="A request whose sent_at is older than this (by the gateway's trusted "
        "clock) is refused",
    )
    rate: float = Field(
        default=2.0,
        gt=0,
        le=1000,
        description="Requests taken per second on average; more are dropped (counted)",
    )
    burst: int = Field(
        default=20, ge=1, le=1000, description="Requests taken at once before 'rate' applies"
    )
    min_interval: Annotated[Duration, at_least("50ms")] = Field(
        default=1.0, description="set_interval: shortest poll interval it may set"
    )
    max_interval: Annotated[Duration, at_least("50ms")] = Field(
        default=3600.0, description="set_interval: longest poll interval it may set"
    )
    max_for: Annotated[Duration, at_least("1s")] = Field(
        default=86400.0, description="set_interval: longest time a changed interval lasts"
    )

    @model_validator(mode="after")
    def _check(self) -> CommandsConfig:
        if self.max_interval < self.min_interval:
            raise ValueError("max_interval must not be shorter than min_interval")
        if len(set(self.allow)) != len(self.allow):
            raise ValueError("a command is listed twice in 'allow'")
        return self


class AgentConfig(StrictModel):
    """The root of the config file."""

    version: Literal[1] = Field(default=1, description="Config schema version")
    gateway_id: Name = Field(description="Names this gateway in topics, payloads, client id")
    state_dir: str = Field(
        default="/var/lib/edge-agent", description="Where the buffer lives (relative: to file)"
    )
    profiles_dir: str | None = Field(
        default=None, description="Directory of device profiles (default: profiles/ beside file)"
    )
    include: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = (
        Field(default_factory=list, description="Further files (globs) each holding devices")
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    clock: ClockConfig = Field(default_factory=ClockConfig)
    availability: AvailabilityConfig = Field(default_factory=AvailabilityConfig)
    devices: list[Device] = Field(default_factory=list)
    alarms: list[AlarmRule] = Field(default_factory=list, description="On-device alarm rules")
    outputs: list[OutputConfig] = Field(
        default_factory=list, description="GPIO outputs driven by alarms"
    )
    gpio: GpioConfig = Field(default_factory=GpioConfig)
    commands: CommandsConfig = Field(default_factory=CommandsConfig)

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if not self.devices:
            raise ValueError("no devices configured: add at least one under 'devices'")
        buses: dict[str, tuple[str, str, tuple[object, ...]]] = {}
        for d in self.devices:
            settings = getattr(d, "line_settings", ())
            first = buses.setdefault(d.bus, (d.id, d.driver, settings))
            if d.driver in ("serial_line", "seismic") and first[0] != d.id:
                raise ValueError(
                    f"devices {first[0]!r} and {d.id!r} share {d.bus}: a {d.driver} sensor "
                    "needs a port of its own"
                )
            if first[1] != d.driver:
                raise ValueError(
                    f"devices {first[0]!r} ({first[1]}) and {d.id!r} ({d.driver}) share "
                    f"{d.bus} but not the driver: one endpoint speaks one protocol"
                )
            if first[2] != settings:
                what = (
                    "baudrate, parity, stopbits, bytesize, framing, local_echo"
                    if isinstance(d, ModbusRtuDevice)
                    else "framing"
                )
                where = f"serial port {d.serial_port}" if isinstance(d, ModbusRtuDevice) else d.bus
                raise ValueError(
                    f"devices {first[0]!r} and {d.id!r} share {where} but not its settings "
                    f"{first[2]} vs {settings} ({what}): one line has one setting"
                )
        return self
