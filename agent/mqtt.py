"""A paho-mqtt 2.x client driven by the agent's asyncio loop (no paho thread).

paho's socket callbacks register its socket with the event loop (the pattern paho documents
for external event loops, ``examples/loop_asyncio.py``). This module owns connecting and
reconnecting: exponential backoff with full jitter (tenacity's ``wait_random_exponential``),
reset after a connection that held for a while. paho's own automatic reconnect is unused.

QoS 1 messages that were in flight when the connection dropped stay in paho's queue and are
resent (DUP=1) by paho after the next CONNACK; the buffer keeps its rows until PUBACK anyway.

Several brokers (``mqtt.brokers``, :mod:`agent.failover`): after ``failover_after`` failed
attempts in a row the next broker of the list is tried; while on another than the first,
the first is probed every ``return_after`` and, once it answers, the link leaves the
current broker cleanly (retained ``offline`` there, then DISCONNECT) and goes back.

TLS (:mod:`agent.tls`): the context handed to paho reads its files again for every attempt;
a failed handshake is a failed attempt, its cause logged once in plain words. The password
is read (from its file or credential) before every attempt too.

The broker is an input like any other (:class:`BoundedClient`): an inbound packet larger
than :data:`MAX_INBOUND_PACKET` is refused from its fixed header, before its body is read;
a packet a server never sends unasked (a PUBLISH matching no subscription of ours or above
the QoS subscribed with, a PUBREL for no QoS 2 message of the broker's, a PINGREQ) or one
that cannot be decoded drops the connection; one wake-up of the loop reads at most
:data:`PACKETS_PER_READ` packets. Each such drop is a lost connection: the usual reconnect
with backoff, nothing buffered lost.

The only subscription is the downlink commands' (``agent.commands``, or ThingsBoard's
``v1/gateway/rpc`` with that format): their PUBLISHes go to :attr:`MqttLink.on_message`,
which takes them in O(1) with its own rate and queue bounds.

Output formats (``mqtt.format``): the native contract is published as it is handed in; any
other format is a :class:`WireFormat` (``agent.sparkplug.node`` for ``sparkplug_b``,
``agent.formats.thingsboard`` for ``thingsboard``) that :meth:`MqttLink.publish` applies
to each message, that gives the will of each CONNECT and the messages that follow each
CONNACK, and that takes the commands of its own subscriptions. The buffer, the
publisher's order and the alarms see native messages only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from agent import failover
from agent import tls as tlsmod

if TYPE_CHECKING:
    from agent.config.model import MqttConfig


log = logging.getLogger(__name__)

PubackHandler = Callable[[int, bool, str], None]
MessageHandler = Callable[["Inbound"], None]

MAX_INBOUND_PACKET = 65536
"""Largest MQTT packet taken from the broker, bytes, fixed header included (the Packet
Size of MQTT 5.0 section 3.1.2.11.4). The broker sends this client only CONNACK, PUBACK,
PINGRESP and DISCONNECT, each a few bytes; a remaining length can announce 256 MB (MQTT
3.1.1 section 2.2.3). With MQTT 5 it is also sent in CONNECT as Maximum Packet Size."""
READ_CHUNK = 65536
"""Most bytes asked of the socket at once (paho asks for the whole rest of a packet)."""
PACKETS_PER_READ = 100
"""Most packets handled in one wake-up of the event loop; a TLS socket still holding
decrypted bytes is read again at the next loop iteration (``call_soon``)."""


SUBSCRIBE_QOS = 1
"""QoS of every subscription (the downlink commands): at least once, deduplicated by the
command layer (``agent.commands``)."""
REBIRTH_MIN_S = 2.0
"""Shortest time between two births a format makes on request (a flood of requests is
answered by one birth at the end of the interval)."""


class Inbound:
    """One PUBLISH received on a subscription.

    Attributes:
        topic: its topic name.
        payload: its payload (at most :data:`MAX_INBOUND_PACKET` bytes).
        retain: its RETAIN flag: set when the broker sends a retained message on
            subscribing (MQTT 3.1.1 section 3.3.1.3, MQTT 5.0 section 3.3.1.3).
        response_topic: MQTT 5 Response Topic property (section 3.3.2.3.5), or None.
        correlation: MQTT 5 Correlation Data property (section 3.3.2.3.6), or None.
    """

    __slots__ = ("correlation", "payload", "response_topic", "retain", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        retain: bool,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self.response_topic = response_topic
        self.correlation = correlation


class WireFormat(Protocol):
    """An output format other than the native contract (``mqtt.format``)."""

    @property
    def command_filters(self) -> list[str]:
        """Topic filters of the commands this format takes (subscribed after every
        CONNACK)."""

    def configure(self, devices: list[Any]) -> None:
        """The configured devices after a config reload (the next births carry them)."""

    def will(self) -> tuple[str, bytes]:
        """The will (topic, payload; QoS 1, not retained) of the next CONNECT."""

    def births(self) -> list[tuple[str, bytes]]:
        """Messages (QoS 0, not retained) that go first after a CONNACK, or when
        :meth:`command` asks for them."""

    def outbound(self, topic: str, body: bytes) -> list[tuple[str, bytes, int, bool]]:
        """One native message as (topic, payload, QoS, retain) messages of the format;
        the one with QoS 1 stands for it. Empty: no form in this format."""

    def resequence(self, topic: str, payload: bytes) -> bytes | None:
        """A message of an earlier connection that goes again after the births, as it
        must read now (None: unchanged)."""

    def command(self, topic: str, payload: bytes) -> bool:
        """A command on :attr:`command_filters`; True when it asks for the births
        again. Raises ValueError for a payload that is not of the format."""


PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
"""The reason of every PUBACK without one (success), shared: never changed."""
NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
"""The properties of every PUBACK without any, shared: never changed."""


class BrokerViolation(OSError):
    """The broker sent what no broker may send this client (paho treats the OSError
    from a socket read as a lost connection)."""


class BoundedClient(mqtt.Client):
    """paho's client, taking from the broker only what this client can have asked for.

    paho-mqtt (2.2.0) has no limit on inbound packets: it reads a packet's whole
    announced remaining length (up to 256 MB) into memory before looking at it, keeps
    every QoS 2 PUBLISH in ``_in_messages`` until its PUBREL, answers every PINGREQ and
    PUBREL (queueing without limit when the broker does not read), and ``loop_read``
    ignores its ``max_packets`` (it reads as many packets as messages are in flight). It
    offers no hook for any of this, so this subclass overrides its internal
    ``_sock_recv`` and ``_packet_handle`` and reads packets itself (:meth:`read_packets`)
    with ``_packet_read`` and ``_loop_rc_handle``; ``_in_packet`` is paho's state of the
    packet being read. Checked against paho-mqtt 2.2.0 (``tests/test_hostile_peers.py`` fails if
    an upgrade changes them).

    Two more overrides are for CPU, both measured in a backlog drain of 1,000 messages in
    flight (``bench/drain.py``):

    - paho's ``_update_inflight`` runs at every PUBACK and walks every message in flight
      looking for one queued behind the in-flight limit: 33 % of the loop's time. Here it
      runs only while a message may be queued (:meth:`publish` queued one, or a reconnect
      re-queued them); a walk that finds none ends that.
    - paho reads a PUBACK with three ``recv`` calls (the type, the length, the packet
      identifier): 10 % of the loop. :meth:`_sock_recv` reads up to :data:`READ_CHUNK`
      bytes at a time and hands paho its pieces from there (:attr:`buffered`).

    Attributes:
        subscriptions: topic filters this client subscribes to (QoS :data:`SUBSCRIBE_QOS`);
            a PUBLISH on any other topic, or with a higher QoS, is refused (MQTT 3.1.1
            section 3.3 and 3.8.4, MQTT 5.0 section 3.3 and 3.8.4: a server sends PUBLISH to
            a client for its matching subscriptions only, at most at the granted QoS).
            Empty: the client subscribes to nothing.
        violation: ``(key, text)`` of the last refused packet, taken by the link when the
            connection drops (None: none since).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subscriptions: list[str] = []
        self.violation: tuple[str, str] | None = None
        self._connack_seen = False
        self._may_queue = False
        self._rbuf = b""
        self._rpos = 0
        self.before_connect_packet: Callable[[], None] | None = None
        """Called just before each CONNECT packet is built (after TCP and TLS are up):
        the will of a format that counts CONNECT packets (Sparkplug's bdSeq)."""

    def _send_connect(self, keepalive: int) -> MQTTErrorCode:
        self._connack_seen = False  # (a new network connection)
        self._rbuf, self._rpos = b"", 0
        if self.before_connect_packet is not None:
            self.before_connect_packet()
        return super()._send_connect(keepalive)

    def publish(self, *args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
        info = super().publish(*args, **kwargs)
        msg = self._out_messages.get(info.mid)
        if msg is not None and msg.state == mqtt.mqtt_ms_queued:
            self._may_queue = True
        return info

    def _messages_reconnect_reset_out(self) -> None:
        super()._messages_reconnect_reset_out()
        self._may_queue = True  # (beyond the in-flight limit they wait queued)

    def _update_inflight(self) -> MQTTErrorCode:
        if not self._may_queue:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        rc = super()._update_inflight()
        self._may_queue = any(m.state == mqtt.mqtt_ms_queued for m in self._out_messages.values())
        return rc

    def _refuse(self, key: str, text: str) -> MQTTErrorCode:
        self.violation = (key, text)
        return MQTTErrorCode.MQTT_ERR_PROTOCOL

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if packet["have_remaining"]:  # the fixed header is read: the size is known
            size = 1 + len(packet["remaining_count"]) + packet["remaining_length"]
            if size > MAX_INBOUND_PACKET:
                self.violation = (
                    "too_large",
                    f"sent a packet of {size} bytes (type {packet['command'] >> 4}), over "
                    f"this client's limit of {MAX_INBOUND_PACKET}",
                )
                raise BrokerViolation(self.violation[1])
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_CHUNK)
            if not data:
                return data  # the connection ended
            self._rbuf, self._rpos = data, 0
        pos = self._rpos
        piece = self._rbuf[pos : pos + min(bufsize, READ_CHUNK)]
        self._rpos = pos + len(piece)
        return piece

    @property
    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet (no selector says so)."""
        return len(self._rbuf) - self._rpos

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    def _packet_handle(self) -> MQTTErrorCode:
        command = self._in_packet["command"]
        cmd = command & 0xF0
        if cmd == mqtt.PUBACK:
            return self._puback(command)
        if cmd == mqtt.CONNACK:
            if self._connack_seen:
                return self._refuse(
                    "connack_twice",
                    "sent a second CONNACK on one connection (a server answers the one "
                    "CONNECT of a connection with one CONNACK: MQTT 3.1.1 section 3.2, "
                    "MQTT 5.0 section 3.2, [MQTT-3.2.0-2])",
                )
            self._connack_seen = True
        if cmd == mqtt.PUBLISH:
            topic = self._publish_topic()
            if not any(mqtt.topic_matches_sub(f, topic) for f in self.subscriptions):
                return self._refuse(
                    "publish",
                    f"sent a PUBLISH on {topic[:80]!r}, which this client never subscribed "
                    "to (a server sends PUBLISH only for matching subscriptions, MQTT 3.1.1 "
                    "and 5.0 section 3.3)",
                )
            qos = (self._in_packet["command"] & 0x06) >> 1
            if qos > SUBSCRIBE_QOS:
                return self._refuse(
                    "publish_qos",
                    f"sent a PUBLISH with QoS {qos} on {topic[:80]!r}, above the QoS "
                    f"{SUBSCRIBE_QOS} subscribed with (MQTT 3.1.1 and 5.0 section 3.8.4)",
                )
        elif cmd == mqtt.PINGREQ:
            return self._refuse(
                "pingreq",
                "sent a PINGREQ (only a client sends it, MQTT 3.1.1 and 5.0 section 3.12)",
            )
        elif cmd == mqtt.PUBREL and not self._in_messages:
            return self._refuse(
                "pubrel",
                "sent a PUBREL for no QoS 2 message it delivered (MQTT 3.1.1 and 5.0 section 3.6)",
            )
        return self._handle_malformed(super()._packet_handle)

    def _puback(self, command: int) -> MQTTErrorCode:
        """A PUBACK: refused with reserved flags set (MQTT 3.1.1 section 2.2.2, MQTT 5.0
        section 2.1.3: the connection is closed), or for a message of this client that
        is not waiting for one (queued behind the in-flight limit, never sent: an
        acknowledgement of it would delete a reading nobody received; paho 2.2.0 takes
        it). A packet identifier alone is success (MQTT 3.1.1 section 3.4; MQTT 5.0
        section 3.4.2.1, reason code 0x00 left out), handled as paho's
        ``_handle_pubackcomp`` does without a ``ReasonCode`` and a ``Properties`` made for
        each; anything longer goes to paho."""
        if command & 0x0F:
            return self._refuse(
                "puback_flags",
                f"sent a PUBACK with reserved flags 0x{command & 0x0F:X} (MQTT 3.1.1 section "
                "2.2.2, 5.0 section 2.1.3)",
            )
        packet = self._in_packet["packet"]
        if len(packet) < 2:
            return self._handle_malformed(super()._packet_handle)
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            msg = self._out_messages.get(mid)
            if msg is None:
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # not ours (any more): ignored, as paho does
            if msg.state != mqtt.mqtt_ms_wait_for_puback:
                return self._refuse(
                    "puback_unsent",
                    f"sent a PUBACK for packet id {mid}, a message this client has not sent "
                    "(a PUBACK answers a QoS 1 PUBLISH, MQTT 3.1.1 and 5.0 section 3.4)",
                )
            if len(packet) == 2:
                return self._do_on_publish(mid, PUBACK_SUCCESS, NO_PROPERTIES)
        if self._protocol == MQTTProtocolVersion.MQTTv5 and not properties_fit(packet, 3):
            return self._refuse(
                "malformed",
                "sent a PUBACK whose properties do not end where the packet ends (MQTT 5.0 "
                "sections 3.4.2.2 and 4.13: a malformed packet closes the connection)",
            )
        return self._handle_malformed(super()._packet_handle)

    def _handle_malformed(self, handle: Callable[[], MQTTErrorCode]) -> MQTTErrorCode:
        try:
            return handle()
        except MalformedPacket as exc:  # paho's _packet_read drops the connection
            cmd = self._in_packet["command"] & 0xF0
            self.violation = ("malformed", f"sent a malformed packet (type {cmd >> 4}): {exc}")
            raise

    def _publish_topic(self) -> str:
        """The topic of the PUBLISH in ``_in_packet`` (MQTT 3.1.1 section 3.3.2.1: a
        two-byte length, then UTF-8); invalid UTF-8 is shown escaped."""
        body = self._in_packet["packet"]
        size = int.from_bytes(body[:2], "big")
        return bytes(body[2 : 2 + size]).decode("utf-8", "backslashreplace")

    def read_packets(self, limit: int = PACKETS_PER_READ) -> bool:
        """Read and handle at most ``limit`` packets (``loop_read`` without its unbounded
        count); True when the limit was reached with the connection still up, so more may
        be waiting."""
        for _ in range(limit):
            if self._sock is None:
                return False
            rc = self._packet_read()
            if rc > 0:
                self._loop_rc_handle(rc)
                return False
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return False
        return self._sock is not None


def properties_fit(packet: bytes | bytearray, at: int) -> bool:
    """Whether the MQTT 5 properties that may start at offset ``at`` of a packet's
    variable header end exactly at its end: nothing there, or a Property Length (a
    Variable Byte Integer of 1 to 4 bytes, MQTT 5.0 section 1.5.5) followed by that many
    bytes (section 2.2.2.1). Pure."""
    if len(packet) <= at:
        return True
    length = 0
    for i in range(4):
        if at + i >= len(packet):
            return False
        byte = packet[at + i]
        length |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return at + i + 1 + length == len(packet)
    return False  # a fifth byte: not a Variable Byte Integer


def _refusal_hint(reason: str) -> str:
    """What to check for a CONNACK refusal (MQTT 3.1.1 section 3.2.2.3, MQTT 5.0 section
    3.2.2.2 reason codes)."""
    low = reason.lower()
    if "not authorized" in low or "user name or password" in low:
        return (
            "; check mqtt.username and its password (password_file, password_credential) "
            "against the broker's accounts"
        )
    if "identifier" in low:
        return "; the broker does not accept this client id (mqtt.client_id)"
    return ""


class MqttLink:
    """One MQTT session to the broker (one of ``mqtt.brokers`` at a time), kept up for the
    life of the agent.

    Args:
        cfg: the ``mqtt`` config section; from then on :attr:`cfg` is the section as it
            applies to the broker in use (one of :attr:`MqttConfig.endpoints`, with the
            ``host``, ``port`` and ``tls`` of that broker).
        client_id: MQTT client identifier.
        will_topic: the retained status topic; ``offline`` is set as last will (QoS 1).
        clock_synced: whether the wall clock is trusted now (:class:`agent.clock.Clock`),
            for the hint on an expired or not yet valid broker certificate.

    Attributes:
        on_connected: called (in the loop) after every successful CONNACK.
        on_puback: called with ``(mid, ok, reason)`` when a QoS 1 publish is acknowledged.
        on_message: called (in the loop) with each :class:`Inbound` PUBLISH received on
            :attr:`BoundedClient.subscriptions` that no format takes; it must not block (paho
            acknowledges a QoS 1 PUBLISH when it returns).
        format: the output format (None: the native contract; :meth:`use_format`).
        choice: which broker, and when to probe the first (:class:`agent.failover.BrokerChoice`).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        will_topic: str,
        clock_synced: Callable[[], bool] = lambda: True,
    ) -> None:
        self.endpoints = cfg.endpoints
        self.cfg = self.endpoints[0]
        self.choice = failover.BrokerChoice(
            len(self.endpoints), cfg.failover_after, cfg.return_after
        )
        self._will_topic = will_topic
        self._leaving = False
        self._clock_synced = clock_synced
        self.client_id = client_id
        self.on_connected: Callable[[], None] = lambda: None
        self.on_puback: PubackHandler = lambda mid, ok, reason: None
        self.on_message: MessageHandler = lambda msg: None
        self.format: WireFormat | None = None
        self._no_form_mid = 0
        self._last_birth = 0.0
        self._birth_timer: asyncio.TimerHandle | None = None
        self.births = 0
        """Births a format made on request (rebirths) since the start."""
        self.connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._connack: asyncio.Future[bool] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._cause: str | None = None
        """Key of the connection problem last logged loudly (None after a CONNACK)."""
        self._write_soon = False
        self._short_drop = False
        self.ever_connected = False
        self.failed_attempts = 0
        """Connection attempts that did not end in a CONNACK, since the start."""
        self._sock: socket.socket | None = None
        self._misc_task: asyncio.Task[None] | None = None
        self._short_sessions: collections.deque[float] = collections.deque(maxlen=5)
        self._read_soon = False
        self.violations: collections.Counter[str] = collections.Counter()
        """Connections dropped because the broker broke the protocol, by cause."""
        self._connected_at = 0.0
        self.connects = 0
        """CONNACKs received since the start (the reconnects are one less)."""
        self.since_ms: int | None = None
        """When the connection last went up or down (UTC ms; None: never connected)."""
        self.problem: str | None = None
        """The last connection problem, for people (None after a CONNACK)."""
        v5 = cfg.protocol == "5"
        self.client = BoundedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else cfg.clean_session,
            reconnect_on_failure=False,
        )
        c = self.client
        c.max_inflight_messages_set(cfg.max_inflight)
        c.max_queued_messages_set(0)
        c.will_set(will_topic, b"offline", qos=1, retain=True)
        self._contexts = [
            None if v.tls_settings is None else tlsmod.ReloadingContext(v.tls_settings)
            for v in self.endpoints
        ]
        self.tls = self.cfg.tls_settings
        self._context = self._contexts[0]
        self.expiry = tlsmod.CertExpiry()
        self._aim(0)
        if self.tls is not None and self.tls.cert_file is not None:
            self.expiry.not_after["client"] = tlsmod.cert_file_not_after(self.tls.cert_file)
        for _, message in tlsmod.security_warnings(cfg):
            log.warning("%s", message)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write

    @property
    def port(self) -> int:
        """The port of the broker in use."""
        return self.cfg.broker_port

    @property
    def address(self) -> str:
        """``host:port`` of the broker in use (health's ``broker``)."""
        return f"{self.cfg.host}:{self.port}"

    def _aim(self, index: int) -> None:
        """Make broker ``index`` of :attr:`endpoints` the one to connect to: its TLS context
        (or none) goes to the client. paho's ``tls_set_context`` may be called only once, so
        this sets what it sets (``_ssl``, ``_ssl_context``, ``_tls_insecure``: paho-mqtt
        2.2.0 ``Client.tls_set_context``); its host and port go to ``connect()``."""
        self.cfg = self.endpoints[index]
        self.tls = self.cfg.tls_settings
        self._context = self._contexts[index]
        c = self.client
        c._ssl = self._context is not None
        c._ssl_context = self._context
        c._tls_insecure = self._context is not None and not self._context.check_hostname

    # -- paho callbacks (may run on an executor thread during connect) -------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop.is_closed():  # paho's __del__ after shutdown
            return
        # On the loop's own thread run at once (no self-pipe wake-up per packet); from the
        # executor thread of connect()/reconnect() hand over thread-safely.
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call(self._add_reader, sock)

    def _add_reader(self, sock: socket.socket) -> None:
        if sock.fileno() < 0:
            return
        self._sock = sock
        self._loop.add_reader(sock, self._read)
        if self._misc_task is None or self._misc_task.done():
            self._misc_task = self._loop.create_task(self._misc(), name="mqtt-misc")

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call(self._remove, sock)

    def _remove(self, sock: socket.socket) -> None:
        for fn in (self._loop.remove_reader, self._loop.remove_writer):
            with contextlib.suppress(ValueError, OSError):  # already closed
                fn(sock)
        if self._sock is sock:
            self._sock = None

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call(self._add_writer, sock)

    def _add_writer(self, sock: socket.socket) -> None:
        # Write once at the end of this loop iteration (all publishes of a batch together);
        # only a full socket buffer needs the selector to say when it is writable again.
        if not self._write_soon:
            self._write_soon = True
            self._loop.call_soon(self._flush, sock)

    def _flush(self, sock: socket.socket) -> None:
        self._write_soon = False
        self.client.loop_write()
        if self.client.want_write() and sock.fileno() >= 0:
            self._loop.add_writer(sock, self._write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call(self._remove_writer, sock)

    def _remove_writer(self, sock: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _read(self) -> None:
        self._read_soon = False
        self.client.read_packets()
        sock = self._sock
        if sock is None or sock.fileno() < 0:
            return
        # Bytes held on this side of the socket wake no selector (those the kernel holds
        # do, the selector being level-triggered): the client's read-ahead, and decrypted
        # bytes in the TLS layer. Read on at the next loop iteration, after whatever else
        # is due.
        held = self.client.buffered > 0 or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)
        if held and not self._read_soon:
            self._read_soon = True
            self._loop.call_soon(self._read)

    def _write(self) -> None:
        self.client.loop_write()

    async def _misc(self) -> None:
        while self._sock is not None:
            sock = self._sock
            if isinstance(sock, ssl.SSLSocket) and sock.pending() and not self._read_soon:
                self._read()
            if self.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            # keep-alive is counted in whole seconds; TLS may hold decrypted bytes back
            await asyncio.sleep(0.5 if isinstance(sock, ssl.SSLSocket) else 1.0)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        ok = not reason.is_failure
        self._call(self._connack_done, ok, str(reason))

    def _connack_done(self, ok: bool, reason: str) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(ok)
        if ok:
            self._cause = None
            self.ever_connected = True
            if self._short_drop:
                self._short_drop = False
                self._count_short_session()
            self._connected_at = time.monotonic()
            self.connects += 1
            self.since_ms = time.time_ns() // 1_000_000
            self.problem = None
            self._disconnected.clear()
            self.connected.set()
            self._log_connected()
            fmt = self.format
            if fmt is not None:  # the format's births go first
                for topic, payload in fmt.births():
                    self.client.publish(topic, payload, qos=0)
                self._last_birth = time.monotonic()
            # clean session or not: subscribe again after every CONNACK (a broker that
            # lost a persistent session would otherwise leave the client deaf)
            for topic_filter in self.client.subscriptions:
                self.client.subscribe(topic_filter, qos=SUBSCRIBE_QOS)
            self.on_connected()
            if fmt is not None:
                self._resequence(fmt)
        else:
            self._problem(
                logging.ERROR,
                f"refused:{reason}",
                f"broker {self.cfg.host}:{self.port} refused the connection: {reason}"
                + _refusal_hint(reason),
            )

    def _log_connected(self) -> None:
        where = f"{self.cfg.host}:{self.port} as {self.client_id!r}"
        sock = self._sock if self._sock is not None else self.client.socket()
        if self.tls is None or not isinstance(sock, ssl.SSLSocket):
            log.info("connected to mqtt://%s", where)
            return
        self.expiry.not_after["server"] = tlsmod.peer_not_after(sock)
        if self._context is not None and self._context.client_not_after is not None:
            self.expiry.not_after["client"] = self._context.client_not_after
        version = sock.version()
        if self.tls.insecure:
            log.warning(
                "connected to mqtts://%s (%s) WITHOUT verifying the broker's certificate "
                "(mqtt.tls.insecure): anyone on the path can pose as the broker",
                where,
                version,
            )
        else:
            name = self.tls.server_name or self.cfg.host
            log.info(
                "connected to mqtts://%s (%s, certificate verified for %s)", where, version, name
            )

    def _problem(self, level: int, key: str, text: str) -> None:
        """Log a connection problem loudly once per cause (a changed cause is logged
        again); repeats of the same cause go to DEBUG until a CONNACK."""
        log.log(logging.DEBUG if key == self._cause else level, "%s", text)
        self._cause = key
        self.problem = text

    def _where(self) -> tlsmod.Where:
        assert self.tls is not None
        client = self._context.client_not_after if self._context is not None else None
        return tlsmod.Where(self.cfg.host, self.port, self.tls, self._clock_synced(), client)

    def _failed(self, exc: BaseException) -> None:
        """Log why a connection attempt failed (once per cause)."""
        cause = None
        if self.tls is not None:
            sock = self._context.last_socket if self._context is not None else None
            cause = tlsmod.explain_close(sock, self._where(), exc)
        if cause is not None:
            self._problem(logging.ERROR, cause.key, f"cannot connect: {cause.text}")
            return
        if isinstance(exc, tlsmod.SecretError):
            self._problem(logging.ERROR, f"secret:{exc}", f"cannot connect: {exc}; retrying")
            return
        self._problem(
            logging.WARNING,
            f"os:{type(exc).__name__}:{getattr(exc, 'errno', None)}",
            f"cannot connect to broker {self.cfg.host}:{self.port}: {exc}; retrying with backoff",
        )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._call(self._disconnect_done, str(reason))

    def _disconnect_done(self, reason: str) -> None:
        was = self.connected.is_set()
        violation, self.client.violation = self.client.violation, None
        if violation is not None:
            self._violated(*violation)
        self.connected.clear()
        self._disconnected.set()
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(False)
            sock = self._context.last_socket if self._context is not None else None
            cause = tlsmod.explain_close(sock, self._where()) if self.tls is not None else None
            if self._stopping:
                pass
            elif cause is not None:
                self._problem(logging.ERROR, cause.key, f"cannot connect: {cause.text}")
            else:
                self._problem(
                    logging.WARNING,
                    f"closed:{reason}",
                    f"{self.cfg.host}:{self.port} closed the connection before answering "
                    f"CONNECT ({reason}): is it an MQTT broker, and does it expect TLS "
                    "(mqtt.tls) on this port?",
                )
        if was:
            self.since_ms = time.time_ns() // 1_000_000
            self.problem = f"lost the connection ({reason})"
        if self._stopping or (was and self._leaving):
            return
        if was and violation is not None:
            log.debug("dropped the connection to %s:%d; buffering", self.cfg.host, self.port)
        elif was:
            held = time.monotonic() - self._connected_at
            log.warning(
                "lost connection to broker %s:%d (%s) after %.1fs; buffering",
                self.cfg.host,
                self.port,
                reason,
                held,
            )
            if "taken over" in reason.lower():  # MQTT 5 reason code 0x8E
                self._duplicate_id_hint()
            elif held < 5.0:
                # a takeover if the broker takes us back at once; a broker restart if the
                # next connect attempt fails (see run())
                self._short_drop = True

    def _violated(self, key: str, text: str) -> None:
        """Log (loudly the first time for each cause) and count a connection dropped
        because the broker broke the protocol."""
        self.violations[key] += 1
        log.log(
            logging.WARNING if self.violations[key] == 1 else logging.DEBUG,
            "broker %s:%d %s: dropped the connection, reconnecting with backoff; buffered "
            "messages are kept (is it the broker, and is it healthy? further drops for "
            "this cause are counted and logged at debug level)",
            self.cfg.host,
            self.port,
            text,
        )

    def _duplicate_id_hint(self) -> None:
        log.error(
            "the broker keeps dropping this client right after it connects while accepting "
            "new connections: probably another client uses the same client id %r (cloned "
            "SD card?). Set a unique mqtt.client_id, or regenerate /etc/machine-id.",
            self.client_id,
        )

    def _count_short_session(self) -> None:
        now = time.monotonic()
        self._short_sessions.append(now)
        if len(self._short_sessions) == 5 and now - self._short_sessions[0] < 60:
            self._duplicate_id_hint()
            self._short_sessions.clear()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        if reason is PUBACK_SUCCESS:
            self._call(self._puback, mid, True, "Success")
            return
        ok = not getattr(reason, "is_failure", False)
        self._call(self._puback, mid, ok, str(reason))

    def _puback(self, mid: int, ok: bool, reason: str) -> None:
        self.on_puback(mid, ok, reason)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        refused = [str(r) for r in reasons if getattr(r, "is_failure", False)]
        if refused:  # MQTT 3.1.1 section 3.9.3 (0x80), MQTT 5.0 section 3.9.3
            self._call(
                log.error,
                "broker %s:%d refused the subscription to %s (%s): downlink commands do "
                "not arrive; check the broker's ACL for this client",
                self.cfg.host,
                self.port,
                ", ".join(self.client.subscriptions),
                ", ".join(refused),
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # paho reads packets on the loop's thread only (read_packets from _read)
        fmt = self.format
        if fmt is not None and any(
            mqtt.topic_matches_sub(f, msg.topic) for f in fmt.command_filters
        ):
            self._format_command(fmt, msg.topic, bytes(msg.payload), bool(msg.retain))
            return
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        self.on_message(
            Inbound(
                msg.topic,
                bytes(msg.payload),
                bool(msg.retain),
                response if isinstance(response, str) else None,
                bytes(corr) if isinstance(corr, bytes | bytearray) else None,
            )
        )

    def _format_command(self, fmt: WireFormat, topic: str, payload: bytes, retain: bool) -> None:
        """A command of the format: a request for births is answered on this connection
        (no reconnect), at most once per :data:`REBIRTH_MIN_S`; a retained one is
        ignored (it was stored before this session, its sender is not waiting)."""
        if retain:
            log.info("ignored a retained command on %s", topic[:200])
            return
        try:
            wanted = fmt.command(topic, payload)
        except ValueError as exc:
            log.warning("ignored a command on %s: %s", topic[:200], exc)
            return
        if not wanted or self._birth_timer is not None:
            return
        wait = self._last_birth + REBIRTH_MIN_S - time.monotonic()
        if wait > 0:
            self._birth_timer = self._loop.call_later(wait, self._rebirth)
        else:
            self._rebirth()

    def _rebirth(self) -> None:
        self._birth_timer = None
        fmt = self.format
        if fmt is None or not self.connected.is_set():
            return  # the next CONNACK brings the births
        log.info("births sent again on request (same connection)")
        for topic, payload in fmt.births():
            self.client.publish(topic, payload, qos=0)
        self._last_birth = time.monotonic()
        self.births += 1

    def _resequence(self, fmt: WireFormat) -> None:
        """After the births of a CONNACK: the messages of the earlier connection that
        paho sends again now (after this callback, in their order) read as the format
        needs (Sparkplug: the next ``seq``). paho keeps them in ``_out_messages`` (2.2.0),
        state ``mqtt_ms_publish`` once reset for a resend."""
        for m in self.client._out_messages.values():
            if m.state == mqtt.mqtt_ms_publish:
                payload = fmt.resequence(m.topic, bytes(m.payload))
                if payload is not None:
                    m.payload = payload

    def use_format(self, fmt: WireFormat) -> None:
        """Publish in ``fmt`` from now on (before :meth:`run`): its will, its births,
        its commands. paho then queues nothing (no in-flight limit of its own: the
        publisher's window bounds the buffered rows), so that every message goes on the
        wire in the order it was published."""
        self.format = fmt
        self.client.max_inflight_messages_set(0)

        def will() -> None:  # on the connecting thread, before the CONNECT packet
            topic, payload = fmt.will()
            self.client.will_set(topic, payload, qos=1, retain=False)

        self.client.before_connect_packet = will
        self.client.subscriptions.extend(fmt.command_filters)

    # -- public ---------------------------------------------------------------------------

    def _attempt(self, first: bool) -> None:
        """One connection attempt (on an executor thread): the password as it is now,
        then TCP, TLS handshake (files read afresh) and CONNECT."""
        if self._context is not None:
            self._context.last_socket = None  # this attempt's socket, once it has one
        username = tlsmod.username_of(self.cfg)
        if username is not None:
            self.client.username_pw_set(username, tlsmod.password_of(self.cfg))
        if first:
            props = None
            if self.cfg.protocol == "5":
                # MQTT 5.0 section 3.1.2.11.4 (paho leaves Properties untyped)
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.MaximumPacketSize = MAX_INBOUND_PACKET
            # a format's session starts clean every time (Sparkplug 3.0,
            # tck-id-message-flow-edge-node-birth-publish-connect: Clean Start, no expiry)
            # (MQTT 3.1.1: clean_session, which the config requires for such a format)
            v5_format = self.format is not None and self.cfg.protocol == "5"
            clean = True if v5_format else mqtt.MQTT_CLEAN_START_FIRST_ONLY
            self.client.connect(
                self.cfg.host,
                self.port,
                keepalive=int(self.cfg.keepalive),
                properties=props,
                clean_start=clean,
            )
        else:
            self.client.reconnect()

    def tls_health(self) -> dict[str, Any]:
        """Health fields: ``tls`` (None for plain MQTT, else ``verify``,
        ``server_cert_expires``, ``client_cert_expires``) and ``tls_verify`` with TLS."""
        if self.tls is None:
            return {"tls": None}
        verify = not self.tls.insecure
        return {"tls": {"verify": verify, **self.expiry.health()}, "tls_verify": verify}

    def tls_notices(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``cert_expiring`` notices due now (:meth:`agent.tls.CertExpiry.notices`)."""
        if self._context is not None and self._context.client_not_after is not None:
            self.expiry.not_after["client"] = self._context.client_not_after
        return self.expiry.notices()

    async def run(self) -> None:
        """Connect and stay connected until :meth:`stop`; never raises for network errors."""
        wait = wait_random_exponential(
            multiplier=self.cfg.reconnect_min, max=self.cfg.reconnect_max
        )
        state = RetryCallState(AsyncRetrying(), None, (), {})
        first = True  # (also after a switch of broker: connect() to its host)
        while not self._stopping:
            self._connack = self._loop.create_future()
            try:
                await self._loop.run_in_executor(None, self._attempt, first)
                first = False
                async with asyncio.timeout(30):
                    ok = await asyncio.shield(self._connack)
            except (OSError, TimeoutError, mqtt.WebsocketConnectionError) as exc:
                ok = False
                self._short_drop = False  # the broker was away: not a client-id takeover
                self._failed(exc)
                if self.client.socket() is not None:
                    self.client.disconnect()
            if ok:
                self.choice.connected(time.monotonic())
                if await self._hold():
                    first = True  # back to the first broker, at once
                    continue
                if time.monotonic() - self._connected_at > 30:
                    state.attempt_number = 1
            else:
                self.failed_attempts += 1
                if not self._stopping and self.choice.failed():
                    self._fail_over()
                    first = True
                    continue  # the first attempt to the next broker at once
            if self._stopping:
                break
            delay = wait(state)
            state.attempt_number += 1
            log.debug("reconnecting to broker in %.2fs", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_event.wait()

    def _fail_over(self) -> None:
        """The attempts to the current broker failed ``failover_after`` times in a row:
        aim at the next of the list (:attr:`choice` has moved on)."""
        was = f"{self.cfg.host}:{self.port}"
        self._aim(self.choice.current)
        self._cause = None  # the next broker's problems are logged loudly again
        log.warning(
            "broker %s failed %d connection attempts in a row: trying broker %d of %d, "
            "%s:%d; buffering meanwhile",
            was,
            self.cfg.failover_after,
            self.choice.current + 1,
            len(self.endpoints),
            self.cfg.host,
            self.port,
        )

    async def _hold(self) -> bool:
        """While connected: wait for the connection to drop; on another broker than the
        first, probe the first every ``return_after`` meanwhile (:func:`agent.failover.probe`
        on an executor thread) and, once it answers, leave the current broker
        (:meth:`_leave`). True: aimed at the first broker again."""
        while True:
            delay = self.choice.probe_in(time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._disconnected.wait()
            if self._disconnected.is_set() or self._stopping:
                self.choice.lost()
                return False
            first = self.endpoints[0]
            result = await self._loop.run_in_executor(
                None,
                functools.partial(
                    failover.probe, first, self.client_id, cancelled=lambda: self._stopping
                ),
            )
            if self._stopping:
                return False
            if not self.choice.probed(result.ok, time.monotonic()):
                log.debug(
                    "first broker %s:%d still not usable: %s; staying on %s:%d",
                    first.host,
                    first.broker_port,
                    result.reason,
                    self.cfg.host,
                    self.port,
                )
                continue
            if self.connected.is_set():
                await self._leave(first)
            self._aim(0)
            return True

    async def _leave(self, first: MqttConfig, timeout: float = 5.0) -> None:
        """Leave the broker in use for ``first``: the retained status ``offline`` there
        (with a :attr:`format`, what the format makes of it: Sparkplug's NDEATH), then
        DISCONNECT, on which the broker discards the will (MQTT 3.1.1 section 3.14.4, MQTT
        5.0 section 3.1.2.5). The status goes with QoS 0, on the wire ahead of the
        DISCONNECT on the same connection: it is in place when the connection is, and it
        never waits in the client's queue to reach ``first``. Messages still
        unacknowledged stay in that queue and go to ``first`` after its CONNACK."""
        log.info(
            "first broker %s:%d answers again: leaving %s:%d (retained status offline "
            "there) for it",
            first.host,
            first.broker_port,
            self.cfg.host,
            self.port,
        )
        self._leaving = True
        try:
            fmt = self.format
            offline = b"offline"
            if fmt is None:
                self.client.publish(self._will_topic, offline, qos=0, retain=True)
            else:
                for topic, payload, _, retain in fmt.outbound(self._will_topic, offline):
                    self.client.publish(topic, payload, qos=0, retain=retain)
            self.client.disconnect()
            async with asyncio.timeout(timeout):
                await self._disconnected.wait()
        except TimeoutError:
            log.warning(
                "%s:%d did not close the connection in %.0fs: closing it",
                self.cfg.host,
                self.port,
                timeout,
            )
            self._disconnect_done("left without an answer")
        finally:
            self._leaving = False

    @property
    def outage(self) -> bool:
        """The broker is known to be out of reach: not connected, and since the start an
        attempt failed or the connection was lost. While the first attempt after the start
        is under way there is no outage yet."""
        return not self.connected.is_set() and (self.failed_attempts > 0 or self.ever_connected)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> int:
        """Queue a publish; return its message id (PUBACK arrives via ``on_puback``).
        ``correlation``: MQTT 5 Correlation Data (section 3.3.2.3.6), sent only with
        protocol 5 and the native contract.

        With a :attr:`format`, the message as the format has it: the id is that of its
        QoS 1 message; a message with no QoS 1 form gets a negative id, acknowledged
        (``on_puback``) at the next loop iteration."""
        fmt = self.format
        if fmt is None:
            props = None
            if correlation is not None and self.cfg.protocol == "5":
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = correlation
            info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            return int(info.mid)
        mid = None
        for t, p, q, r in fmt.outbound(topic, payload):
            info = self.client.publish(t, p, qos=q, retain=r)
            if q > 0:
                mid = int(info.mid)
        if mid is None:
            self._no_form_mid -= 1
            mid = self._no_form_mid
            self._loop.call_soon(self.on_puback, mid, True, "")
        return mid

    async def stop(self, timeout: float = 2.0) -> None:
        """Send DISCONNECT (the broker then discards the will) and close the socket."""
        self._stopping = True
        self._stop_event.set()
        if self._birth_timer is not None:
            self._birth_timer.cancel()
        if self.connected.is_set():
            self.client.disconnect()
            try:
                async with asyncio.timeout(timeout):
                    await self._disconnected.wait()
            except TimeoutError:
                log.warning("broker did not close the connection in %.1fs", timeout)
        sock = self._sock
        if sock is not None:
            self._remove(sock)
        if self._misc_task is not None:
            self._misc_task.cancel()
        if self.violations:
            log.warning(
                "connections dropped because the broker broke the MQTT protocol: %s",
                ", ".join(f"{k} {n}" for k, n in sorted(self.violations.items())),
            )
