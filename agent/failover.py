"""Several brokers (``mqtt.brokers``): which one to connect to, and the probe of the first.

The choice (:class:`BrokerChoice`) is a pure state machine; :class:`agent.mqtt.MqttLink`
feeds it the outcome of every connection attempt and the clock:

- It starts with the first broker of the list.
- ``failover_after`` failed attempts in a row to the current broker (no TCP connection,
  no TLS handshake, no CONNACK, or a CONNACK refusing the connection) move it to the next
  broker of the list, after the last to the first again. The usual reconnect backoff
  (``reconnect_min`` … ``reconnect_max``) goes on across a switch, so with every broker
  down the attempts slow down as they do with one broker; the first attempt to the next
  broker is made at once.
- While connected to another broker than the first, the first is probed every
  ``return_after`` (:func:`probe`: an MQTT connect and disconnect of its own); once it
  answers, the link leaves the current broker cleanly and connects to the first.

Nothing buffered is lost across a switch: the paho client keeps its unacknowledged QoS 1
messages over every connection, to whichever broker, and sends them again (DUP=1) after the
next CONNACK, while the buffer keeps their rows until a PUBACK (at-least-once,
``docs/mqtt.md``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import tls as tlsmod

if TYPE_CHECKING:
    from agent.config.model import MqttConfig


log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
"""Longest a probe waits for the CONNACK after its TCP connection and TLS handshake
(each of which has paho's connect timeout, 5 s)."""


class BrokerChoice:
    """Which broker of an ordered list to connect to (pure: the caller gives the time).

    Args:
        count: how many brokers (1 or more); broker 0 is the preferred one.
        failover_after: failed attempts in a row before moving to the next broker.
        return_after: seconds between probes of broker 0 while connected to another.

    Attributes:
        current: index of the broker to connect to (or connected to).
        failures: failed attempts in a row to :attr:`current`.
    """

    def __init__(self, count: int, failover_after: int, return_after: float) -> None:
        if count < 1 or failover_after < 1 or return_after <= 0:
            raise ValueError("count and failover_after at least 1, return_after positive")
        self.count = count
        self.failover_after = failover_after
        self.return_after = return_after
        self.current = 0
        self.failures = 0
        self._probe_at: float | None = None

    def failed(self) -> bool:
        """An attempt to :attr:`current` failed; True when this moves to the next broker."""
        self.failures += 1
        if self.count == 1 or self.failures < self.failover_after:
            return False
        self.current = (self.current + 1) % self.count
        self.failures = 0
        return True

    def connected(self, now: float) -> None:
        """A CONNACK from :attr:`current` at monotonic time ``now`` (seconds)."""
        self.failures = 0
        self._probe_at = None if self.current == 0 else now + self.return_after

    def lost(self) -> None:
        """The connection to :attr:`current` went down: no probing while reconnecting."""
        self._probe_at = None

    def probe_in(self, now: float) -> float | None:
        """Seconds until broker 0 is to be probed (0: now); None: no probe (on broker 0,
        or not connected)."""
        return None if self._probe_at is None else max(0.0, self._probe_at - now)

    def probed(self, ok: bool, now: float) -> bool:
        """The outcome of a probe of broker 0; True: go back to it now (:attr:`current`
        is 0 from here on), False: probe again after ``return_after``."""
        if not ok:
            self._probe_at = now + self.return_after
            return False
        self.current = 0
        self.failures = 0
        self._probe_at = None
        return True


@dataclass(frozen=True)
class ProbeResult:
    """What a probe found: ``ok`` when the broker accepted an MQTT connection; ``reason``
    says why not, for the log."""

    ok: bool
    reason: str


def probe(
    cfg: MqttConfig,
    client_id: str,
    timeout: float = PROBE_TIMEOUT_S,
    cancelled: Callable[[], bool] = lambda: False,
) -> ProbeResult:
    """Whether the broker of ``cfg`` (one of :attr:`MqttConfig.endpoints`) accepts an MQTT
    connection now: TCP, TLS as configured (files read afresh), CONNECT with the gateway's
    client id and credentials, clean session and no will, then DISCONNECT (MQTT 3.1.1
    section 3.14, MQTT 5.0 section 3.14: a DISCONNECT discards a will; there is none).

    Blocking (at most about ``timeout`` + 10 s, less once ``cancelled()`` says so, as at a
    stop): run it on an executor thread. The broker
    is another input: its answers go through :class:`agent.mqtt.BoundedClient` (which
    refuses any PUBLISH: the probe subscribes to nothing). Never raises for network or TLS
    errors: they are the ``reason``.
    """
    from agent.mqtt import BoundedClient  # (agent.mqtt imports this module)

    v5 = cfg.protocol == "5"
    client = BoundedClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else True,
        reconnect_on_failure=False,
    )
    answer: list[ProbeResult] = []

    def on_connect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        answer.append(ProbeResult(not reason.is_failure, str(reason)))

    client.on_connect = on_connect
    settings = cfg.tls_settings
    if settings is not None:
        client.tls_set_context(tlsmod.ReloadingContext(settings))
    where = f"{cfg.host}:{cfg.broker_port}"
    try:
        if cfg.username is not None:
            client.username_pw_set(cfg.username, tlsmod.password_of(cfg))
        client.connect(cfg.host, cfg.broker_port, keepalive=int(cfg.keepalive))
        deadline = time.monotonic() + timeout
        while not answer and time.monotonic() < deadline and not cancelled():
            if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                break
        if not answer:
            return ProbeResult(False, f"{where} did not answer CONNECT")
        if answer[0].ok:
            client.disconnect()
            client.loop(timeout=0.2)
        return answer[0]
    except (OSError, ValueError, tlsmod.SecretError) as exc:
        return ProbeResult(False, f"{where}: {exc}")
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()
