"""A paho-mqtt 2.x client driven by the agent's asyncio loop (no paho thread).

paho's socket callbacks register its socket with the event loop (the pattern paho documents
for external event loops, ``examples/loop_asyncio.py``). This module owns connecting and
reconnecting: exponential backoff with full jitter (tenacity's ``wait_random_exponential``),
reset after a connection that held for a while. paho's own automatic reconnect is unused.

QoS 1 messages that were in flight when the connection dropped stay in paho's queue and are
resent (DUP=1) by paho after the next CONNACK; the buffer keeps its rows until PUBACK anyway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from agent.config.model import MqttConfig

log = logging.getLogger(__name__)

PubackHandler = Callable[[int, bool, str], None]


class MqttLink:
    """One MQTT session to the broker, kept up for the life of the agent.

    Args:
        cfg: the ``mqtt`` config section.
        client_id: MQTT client identifier.
        will_topic: the retained status topic; ``offline`` is set as last will (QoS 1).

    Attributes:
        on_connected: called (in the loop) after every successful CONNACK.
        on_puback: called with ``(mid, ok, reason)`` when a QoS 1 publish is acknowledged.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        will_topic: str,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.on_connected: Callable[[], None] = lambda: None
        self.on_puback: PubackHandler = lambda mid, ok, reason: None
        self.connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._connack: asyncio.Future[bool] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._problem_logged = False
        self._write_soon = False
        self._short_drop = False
        self.ever_connected = False
        self._sock: socket.socket | None = None
        self._misc_task: asyncio.Task[None] | None = None
        self._short_sessions: collections.deque[float] = collections.deque(maxlen=5)
        self._connected_at = 0.0
        v5 = cfg.protocol == "5"
        self.client = mqtt.Client(
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
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            t = cfg.tls
            c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file)
            c.tls_insecure_set(t.insecure)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write

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
        self.client.loop_read(max_packets=1000)

    def _write(self) -> None:
        self.client.loop_write()

    async def _misc(self) -> None:
        while self._sock is not None:
            sock = self._sock
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                self.client.loop_read(max_packets=1000)
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
            self._problem_logged = False
            self.ever_connected = True
            if self._short_drop:
                self._short_drop = False
                self._count_short_session()
            self._connected_at = time.monotonic()
            self._disconnected.clear()
            self.connected.set()
            log.info(
                "connected to mqtt://%s:%d as %r", self.cfg.host, self.cfg.port, self.client_id
            )
            self.on_connected()
        else:
            self._problem(logging.ERROR, "broker %s:%d refused the connection: %s", reason)

    def _problem(self, level: int, msg: str, detail: object) -> None:
        """Log a connection problem loudly once; repeats go to DEBUG until a CONNACK."""
        log.log(
            logging.DEBUG if self._problem_logged else level,
            msg,
            self.cfg.host,
            self.cfg.port,
            detail,
        )
        self._problem_logged = True

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._call(self._disconnect_done, str(reason))

    def _disconnect_done(self, reason: str) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self._disconnected.set()
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(False)
            if not self._stopping:
                self._problem(
                    logging.WARNING,
                    "%s:%d closed the connection before answering CONNECT (%s): is it an MQTT "
                    "broker, and does it expect TLS (mqtt.tls) on this port?",
                    reason,
                )
        if self._stopping:
            return
        if was:
            held = time.monotonic() - self._connected_at
            log.warning(
                "lost connection to broker %s:%d (%s) after %.1fs; buffering",
                self.cfg.host,
                self.cfg.port,
                reason,
                held,
            )
            if "taken over" in reason.lower():  # MQTT 5 reason code 0x8E
                self._duplicate_id_hint()
            elif held < 5.0:
                # a takeover if the broker takes us back at once; a broker restart if the
                # next connect attempt fails (see run())
                self._short_drop = True

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
        ok = not getattr(reason, "is_failure", False)
        self._call(self._puback, mid, ok, str(reason))

    def _puback(self, mid: int, ok: bool, reason: str) -> None:
        self.on_puback(mid, ok, reason)

    # -- public ---------------------------------------------------------------------------

    def _connect_blocking(self) -> None:
        self.client.connect(self.cfg.host, self.cfg.port, keepalive=int(self.cfg.keepalive))

    async def run(self) -> None:
        """Connect and stay connected until :meth:`stop`; never raises for network errors."""
        wait = wait_random_exponential(
            multiplier=self.cfg.reconnect_min, max=self.cfg.reconnect_max
        )
        state = RetryCallState(AsyncRetrying(), None, (), {})
        first = True
        while not self._stopping:
            self._connack = self._loop.create_future()
            try:
                if first:
                    await self._loop.run_in_executor(None, self._connect_blocking)
                else:
                    await self._loop.run_in_executor(None, self.client.reconnect)
                first = False
                async with asyncio.timeout(30):
                    ok = await asyncio.shield(self._connack)
            except (OSError, ssl.SSLError, TimeoutError, mqtt.WebsocketConnectionError) as exc:
                ok = False
                self._short_drop = False  # the broker was away: not a client-id takeover
                self._problem(
                    logging.WARNING,
                    "cannot connect to broker %s:%d: %s; retrying with backoff",
                    exc,
                )
                if self.client.socket() is not None:
                    self.client.disconnect()
            if ok:
                await self._disconnected.wait()
                if time.monotonic() - self._connected_at > 30:
                    state.attempt_number = 1
            if self._stopping:
                break
            delay = wait(state)
            state.attempt_number += 1
            log.debug("reconnecting to broker in %.2fs", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_event.wait()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; return its message id (PUBACK arrives via ``on_puback``)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return int(info.mid)

    async def stop(self, timeout: float = 2.0) -> None:
        """Send DISCONNECT (the broker then discards the will) and close the socket."""
        self._stopping = True
        self._stop_event.set()
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
