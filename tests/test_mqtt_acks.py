"""PUBACKs a broker may not send: one for a message the agent has not sent yet, one with
reserved flags. Against a raw TCP peer that speaks just enough MQTT (CONNACK, then what the
test scripts), with the agent's own MQTT link."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable

import pytest

from agent.config.model import MqttConfig
from agent.mqtt import MqttLink
from tests.helpers import TcpPeer, read_packet

Script = Callable[[socket.socket, "ScriptedBroker", int], None]


def ack(mid: int) -> bytes:
    """A PUBACK of a packet identifier alone (MQTT 3.1.1 section 3.4)."""
    return b"\x40\x02" + mid.to_bytes(2, "big")


class ScriptedBroker(TcpPeer):
    """Answers CONNECT with CONNACK; records the packet id of every QoS 1 PUBLISH on
    ``t/x``; ``script(conn, broker, n)`` runs beside that on connection ``n`` (from 1);
    a connection after the scripted ones acknowledges every PUBLISH at once."""

    def __init__(self, script: Script, scripted: int = 1) -> None:
        super().__init__(self._serve)
        self.actions = script
        self.scripted = scripted
        self.on_wire: list[int] = []
        """Packet ids of the PUBLISHes received, in order, over all connections."""
        self.got = threading.Condition()

    def _serve(self, conn: socket.socket) -> None:
        n = self.connections
        _, body = read_packet(conn)
        v5 = body[6] == 5
        conn.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
        scripted = n <= self.scripted
        if scripted:
            threading.Thread(target=self.actions, args=(conn, self, n), daemon=True).start()
        while True:
            first, body = read_packet(conn)
            if first >> 4 == 3 and (first >> 1) & 3:
                size = int.from_bytes(body[:2], "big")
                mid = int.from_bytes(body[2 + size : 4 + size], "big")
                if body[2 : 2 + size] != b"t/x":
                    conn.sendall(ack(mid))
                    continue
                with self.got:
                    self.on_wire.append(mid)
                    self.got.notify_all()
                if not scripted:
                    conn.sendall(ack(mid))
            elif first == 0xC0:
                conn.sendall(b"\xd0\x00")

    def wait_for(self, count: int, timeout: float = 5.0) -> list[int]:
        with self.got:
            self.got.wait_for(lambda: len(self.on_wire) >= count, timeout)
            return list(self.on_wire)


async def run_link(
    broker: ScriptedBroker, protocol: str, count: int, max_inflight: int = 1
) -> tuple[MqttLink, list]:
    """Publish ``count`` messages on ``t/x`` with an in-flight limit of ``max_inflight``;
    return the link and its acknowledgements ``(mid, ok, on the wire by then)``, once all
    were acknowledged or after 10 s."""
    cfg = MqttConfig(
        port=broker.port,
        protocol=protocol,
        max_inflight=max_inflight,
        reconnect_min="100ms",
        reconnect_max="200ms",
    )
    link = MqttLink(cfg, "victim", "t/status")
    acks: list[tuple[int, bool, bool]] = []
    mids: list[int] = []
    done = asyncio.Event()

    def on_puback(mid: int, ok: bool, reason: str) -> None:
        acks.append((mid, ok, mid in broker.on_wire))
        if {m for m, ok, _ in acks if ok} == set(mids):
            done.set()

    link.on_puback = on_puback
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(5):
            await link.connected.wait()
        mids += [link.publish("t/x", b"m%d" % i, qos=1) for i in range(count)]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await done.wait()
    finally:
        await link.stop(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return link, acks


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_puback_for_a_message_not_sent_yet_drops_the_connection(protocol: str) -> None:
    """With an in-flight limit of 1 the second and third messages wait in the client; a
    broker that acknowledges them before they were sent must not make them count as
    delivered (the publisher would delete them from the buffer: readings lost)."""

    def early_acks(conn: socket.socket, broker: ScriptedBroker, n: int) -> None:
        first = broker.wait_for(1)[0]
        conn.sendall(ack(first + 1) + ack(first + 2))

    broker = ScriptedBroker(early_acks)
    try:
        link, acks = asyncio.run(run_link(broker, protocol, 3))
    finally:
        broker.close()
    assert acks and all(on_wire for _, _, on_wire in acks), acks
    assert sorted(m for m, ok, _ in acks if ok) == sorted(set(broker.on_wire)), acks
    assert len([m for m, ok, _ in acks if ok]) == 3, acks  # each once, after a reconnect
    assert link.violations.get("puback_unsent") == 1, link.violations
    assert broker.connections >= 2


@pytest.mark.parametrize(
    ("packet", "key"),
    [
        # a PUBACK with reserved flags set: MQTT 3.1.1 section 2.2.2, a packet with flags
        # that are not as specified is malformed and the connection is closed
        (lambda first: b"\x4f\x02" + first.to_bytes(2, "big"), "puback_flags"),
        # a second CONNACK, then the PUBACK: MQTT 5.0 section 3.2 [MQTT-3.2.0-2] (and
        # 3.1.1 section 3.2: the one answer to the one CONNECT); taken, it would run the
        # connect handling again (births, resends)
        (lambda first: b"\x20\x02\x00\x00" + ack(first), "connack_twice"),
    ],
    ids=["puback_flags", "connack_twice"],
)
def test_a_packet_no_broker_may_send_drops_the_connection(
    packet: Callable[[int], bytes], key: str
) -> None:
    """The link drops the connection, counts the violation, and takes the message as
    acknowledged only by a proper PUBACK after the reconnect."""

    def send(conn: socket.socket, broker: ScriptedBroker, n: int) -> None:
        conn.sendall(packet(broker.wait_for(1)[0]))

    broker = ScriptedBroker(send)
    try:
        link, acks = asyncio.run(run_link(broker, "3.1.1", 1))
    finally:
        broker.close()
    assert link.violations.get(key) == 1, link.violations
    assert [ok for _, ok, _ in acks] == [True] and broker.connections >= 2, acks


@pytest.mark.parametrize(
    ("tail", "accepted"),
    [
        (b"\x00", True),  # reason code alone (MQTT 5.0 section 3.4.2.1)
        (b"\x00\x00", True),  # reason code and an empty property list
        (b"\x00\x05\x1f\x00\x02ok", True),  # a Reason String property (0x1F)
        (b"\x00\x00\xff", False),  # one byte after the properties
        (b"\x00\x05\x1f\x00", False),  # properties announced longer than the packet
        (b"\x00\xff\xff\xff\xff\x01", False),  # a Property Length of five bytes
    ],
)
def test_an_mqtt5_puback_must_end_where_its_properties_end(tail: bytes, accepted: bool) -> None:
    """MQTT 5.0 section 3.4.2.2: a PUBACK's properties are a length and that many bytes;
    a packet with bytes left over, or too few, is malformed (section 4.13: the connection
    is closed), and the message counts as delivered only by a proper PUBACK after the
    reconnect. A well-formed one with a reason code and properties is a success."""

    def odd_ack(conn: socket.socket, broker: ScriptedBroker, n: int) -> None:
        first = broker.wait_for(1)[0]
        body = first.to_bytes(2, "big") + tail
        conn.sendall(b"\x40" + bytes([len(body)]) + body)

    broker = ScriptedBroker(odd_ack)
    try:
        link, acks = asyncio.run(run_link(broker, "5", 1))
    finally:
        broker.close()
    assert [ok for _, ok, _ in acks] == [True], acks
    if accepted:
        assert not link.violations and broker.connections == 1, (link.violations, acks)
    else:
        assert link.violations.get("malformed") == 1, link.violations
        assert broker.connections >= 2


def test_pubacks_beyond_one_read_of_packets_are_all_taken() -> None:
    """300 PUBACKs in one write: the link handles at most 100 packets per loop iteration
    (bounded time per event) and reads ahead of paho, so the rest sit in the client's
    read-ahead, where no selector sees them; they are taken at the next iterations
    without any further byte from the broker."""

    def all_at_once(conn: socket.socket, broker: ScriptedBroker, n: int) -> None:
        mids = broker.wait_for(300)
        conn.sendall(b"".join(ack(m) for m in mids))

    broker = ScriptedBroker(all_at_once)
    try:
        link, acks = asyncio.run(run_link(broker, "3.1.1", 300, max_inflight=300))
    finally:
        broker.close()
    assert len([ok for _, ok, _ in acks if ok]) == 300, len(acks)
    assert not link.violations and broker.connections == 1
