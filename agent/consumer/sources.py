"""Where messages come from: an MQTT broker (a shared subscription scales out over several
consumer processes) or a RabbitMQ queue over AMQP 0-9-1 (competing consumers).

A source hands out batches of :class:`Incoming` (:meth:`take`) and acknowledges a batch
only when the consumer says it is stored (:meth:`ack`): a message taken but not
acknowledged when the consumer or the broker goes away is delivered again, to this or
another consumer (at least once; the sink's dedup on (gateway, seq) absorbs the copy).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("edge-agent.consume")


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message as the transport gave it: the MQTT topic, the payload, and what the
    transport needs to acknowledge it."""

    topic: str
    payload: bytes
    token: Any = None


class Source(Protocol):
    """What the consumer loop reads from."""

    def take(self, max_n: int, wait_s: float) -> list[Incoming]:
        """Up to ``max_n`` messages, waiting at most ``wait_s`` for the first ones."""

    def ack(self, batch: list[Incoming]) -> None:
        """Acknowledge ``batch`` (stored): the broker will not deliver it again."""

    def close(self) -> None:
        """Disconnect; what was taken and not acknowledged is delivered again later."""


SESSION_EXPIRY_S = 7 * 24 * 3600
"""MQTT 5 session expiry asked for (MQTT 5 section 3.1.2.11.2): a consumer away for up to
a week finds what arrived meanwhile (within the broker's own queue limits)."""


class MqttSource:
    """A persistent MQTT session (MQTT 5 clean start 0 with :data:`SESSION_EXPIRY_S`, or
    MQTT 3.1.1 clean session 0) subscribed with QoS 1 to ``filters``, acknowledged by hand
    (paho ``manual_ack``): the PUBACK of a message (MQTT 3.1.1 and 5.0 section 3.4) goes
    only after :meth:`ack`, so that a consumer killed with a batch in hand gets it again.

    With ``share``, the filters are subscribed as ``$share/{share}/{filter}`` (MQTT 5
    section 4.8.2; mosquitto ≥ 1.6, EMQX, HiveMQ and VerneMQ also take it from MQTT 3.1.1
    clients): the broker hands each message to one of the consumers of the group. Retained
    messages are not sent to a shared subscription (MQTT 5 section 4.8.2), so the
    ``info_filters`` (the retained ``info`` the decoders may need) are also subscribed
    without sharing.

    Raises:
        OSError: ``ca_file`` or ``password_file`` cannot be read.
    """

    def __init__(
        self,
        host: str,
        port: int,
        filters: list[str],
        client_id: str,
        share: str | None = None,
        info_filters: list[str] | None = None,
        protocol: str = "5",
        username: str | None = None,
        password_file: str | None = None,
        ca_file: str | None = None,
        receive_maximum: int = 1000,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._q: queue.Queue[Incoming] = queue.Queue()
        self.v5 = protocol == "5"
        subs = [f"$share/{share}/{f}" if share else f for f in filters]
        if share:
            subs += info_filters or []
        self.subs = subs
        self.connected = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else False,
            manual_ack=True,
        )
        client.reconnect_delay_set(1, 5)
        if username is not None:
            password = None
            if password_file is not None:
                password = Path(password_file).read_text(encoding="utf-8").rstrip("\n")
            client.username_pw_set(username, password)
        if ca_file is not None:
            client.tls_set(ca_certs=ca_file)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = receive_maximum
            props.MaximumPacketSize = (1 << 20) + 65536
        self.client = client
        client.connect_async(host, port, keepalive=30, clean_start=False, properties=props)
        client.loop_start()

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.warning("MQTT broker refused the connection: %s", rc)
            return
        c.subscribe([(s, 1) for s in self.subs])
        log.info(
            "connected (session %s), subscribed to %s",
            "resumed" if flags.session_present else "new",
            ", ".join(self.subs),
        )
        self.connected.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected.clear()
        log.info("disconnected from the MQTT broker (%s); reconnecting", rc)

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        self._q.put(Incoming(msg.topic, bytes(msg.payload), (msg.mid, msg.qos)))

    def take(self, max_n: int, wait_s: float) -> list[Incoming]:
        out: list[Incoming] = []
        deadline = time.monotonic() + wait_s
        while len(out) < max_n:
            try:
                out.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return out

    def ack(self, batch: list[Incoming]) -> None:
        for m in batch:
            mid, qos = m.token
            if qos > 0:
                self.client.ack(mid, qos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def amqp_routing_key(mqtt_filter: str) -> str:
    """An MQTT topic filter as the binding key of RabbitMQ's MQTT plugin on ``amq.topic``:
    ``/`` and ``.`` swap places, ``+`` is ``*`` (AMQP 0-9-1 topic exchanges; RabbitMQ MQTT
    plugin guide, "Topic Level Separator and Wildcards")."""
    swapped = mqtt_filter.translate(str.maketrans("/.", "./"))
    return ".".join("*" if w == "+" else w for w in swapped.split("."))


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic a routing key of RabbitMQ's MQTT plugin stands for."""
    return routing_key.translate(str.maketrans("/.", "./"))


class AmqpSource:
    """Competing consumers on a durable RabbitMQ queue bound to ``amq.topic`` (where
    RabbitMQ's MQTT plugin publishes what gateways send) with the binding keys of
    ``filters``; QoS 1 publishes arrive there persistent. ``prefetch`` bounds the
    unacknowledged messages held (``basic.qos``); a batch is acknowledged with one
    ``basic.ack`` (``multiple``). A lost connection is opened again every ``retry_s``;
    deliveries not acknowledged on it come again.

    The queue is declared (durable) at the first connect: gateways' messages routed before
    it exists are not kept, so declare it before they publish.

    Raises:
        pika.exceptions.AMQPError: the first connection failed (wrong URL, refused).
    """

    def __init__(
        self,
        url: str,
        queue_name: str,
        filters: list[str],
        prefetch: int = 1000,
        retry_s: float = 1.0,
    ) -> None:
        import pika

        self._pika = pika
        self.params = pika.URLParameters(url)
        self.queue = queue_name
        self.keys = [amqp_routing_key(f) for f in filters]
        self.prefetch = prefetch
        self.retry_s = retry_s
        self._got: list[Incoming] = []
        self._conn: Any = None
        self._ch: Any = None
        self._down = False
        self._next_attempt = 0.0
        logging.getLogger("pika").setLevel(logging.CRITICAL)  # its errors are said here
        self._open()

    def _open(self) -> None:
        self._conn = self._pika.BlockingConnection(self.params)
        ch = self._conn.channel()
        ch.queue_declare(self.queue, durable=True)
        for key in self.keys:
            ch.queue_bind(self.queue, "amq.topic", routing_key=key)
        ch.basic_qos(prefetch_count=self.prefetch)
        ch.basic_consume(self.queue, self._on_message)
        self._ch = ch
        self._got = []
        log.info("consuming queue %s (bound to amq.topic: %s)", self.queue, ", ".join(self.keys))

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self._got.append(Incoming(mqtt_topic(method.routing_key), body, (ch, method.delivery_tag)))

    def take(self, max_n: int, wait_s: float) -> list[Incoming]:
        errors = self._pika.exceptions
        deadline = time.monotonic() + wait_s
        while len(self._got) < max_n:
            now = time.monotonic()
            if self._conn is None and now < self._next_attempt:
                time.sleep(max(0.0, min(deadline, self._next_attempt) - now))
                if time.monotonic() >= deadline:
                    break
                continue
            try:
                if self._conn is None:
                    self._open()
                    log.info("AMQP: connected again")
                self._conn.process_data_events(time_limit=max(0.0, min(deadline - now, 0.05)))
            except (errors.AMQPError, OSError) as exc:
                if not self._down:
                    log.warning("AMQP: %r; reconnecting every %.0f s", exc, self.retry_s)
                self._down = True
                self._drop()
                self._next_attempt = time.monotonic() + self.retry_s
            else:
                self._down = False
            if time.monotonic() >= deadline:
                break
        out, self._got = self._got[:max_n], self._got[max_n:]
        return out

    def _drop(self) -> None:
        conn, self._conn, self._ch, self._got = self._conn, None, None, []
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                conn.close()

    def ack(self, batch: list[Incoming]) -> None:
        if not batch:
            return
        ch, tag = batch[-1].token
        if ch is not self._ch or ch is None:
            return  # that channel is gone: the broker delivers these again
        try:
            ch.basic_ack(delivery_tag=tag, multiple=True)
        except (self._pika.exceptions.AMQPError, OSError) as exc:
            log.warning("AMQP ack failed: %r (the batch comes again)", exc)
            self._drop()

    def close(self) -> None:
        self._drop()
