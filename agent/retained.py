"""The retained topics of the gateway: kept current on the broker, and cleared once the
gateway no longer owns them.

Retained messages outlive the connection and the config that made them (case 057): a
device or an alarm rule removed from the config would leave its ``availability`` or
``alarms`` topic on the broker for ever, and a platform joining later would see a device
that no longer exists. So the gateway keeps the set of retained topics it published in its
buffer (table ``retained_topic``); at start every stored topic it no longer owns is
"stale", and after each connect it publishes a zero-length retained message to each (which
deletes the retained message: MQTT 3.1.1 section 3.3.1.3, MQTT 5.0 section 3.3.1.3) until
the broker acknowledged them all; then the stored set shrinks to the owned set.

The ``info`` and ``availability`` messages are kept here too and published again after
every connect (a broker restarted without persistence has lost them).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import zlib
from collections.abc import Iterable

from agent.buffer import AsyncBuffer
from agent.contract.topics import parse_topic
from agent.mqtt import MqttLink

log = logging.getLogger(__name__)

KEEP_DEFLATED_FROM = 64 * 1024
"""Bytes: a retained body at least this long (the ``info`` of a gateway with thousands of
points: 760 kB at 10,000) is kept deflated until the next connect (zlib level 1: about
a tenth of it), not as it is for the whole run."""


def _ours(topic: str, prefix: str, gateway_id: str) -> bool:
    """Whether ``topic`` is a retained topic of the contract under this gateway."""
    parsed = parse_topic(topic, prefix)
    return parsed is not None and parsed.gateway_id == gateway_id and parsed.kind.retained


class RetainedState:
    """Owns the gateway's retained messages (apart from status and health, which have
    their own timing) and the clearing of stale retained topics.

    Only topics of this gateway as it is configured now (``{prefix}/{gateway_id}/…``, of a
    kind the contract makes retained) are ever cleared: a stored topic under another prefix
    or gateway id (a state directory copied from another gateway, a renamed gateway) may
    belong to a gateway that is running, so it is forgotten, not cleared (the log says so
    once); so is anything that is no topic of the contract.

    Args:
        link: the MQTT session.
        buffer: where the set of published retained topics is kept.
        owned: every retained topic the current config can publish.
        stored: the set read from the buffer at start.
        prefix, gateway_id: this gateway's topic prefix and id.
    """

    def __init__(
        self,
        link: MqttLink,
        buffer: AsyncBuffer,
        owned: Iterable[str],
        stored: Iterable[str],
        prefix: str,
        gateway_id: str,
    ) -> None:
        self.link = link
        self.buffer = buffer
        self.owned = frozenset(owned)
        stored = frozenset(stored)
        ours = {t for t in stored if _ours(t, prefix, gateway_id)}
        foreign = stored - ours
        if foreign:
            log.warning(
                "the buffer remembers %d retained topic(s) that are not this gateway's "
                "(%s/%s/…): not clearing them, they may belong to another gateway (e.g. %s)",
                len(foreign),
                prefix,
                gateway_id,
                sorted(foreign)[0][:200],
            )
        self.stale = set(ours - self.owned)
        self._bodies: dict[str, tuple[bool, bytes]] = {}
        """topic → (deflated, body): a large body waits deflated between connects."""
        self._clearing: dict[int, str] = {}
        self._save = asyncio.Event()
        self._saved = stored
        if self.owned | self.stale != stored:
            self._save.set()

    def reown(self, owned: Iterable[str]) -> None:
        """A config reload: ``owned`` is every retained topic the config now publishes.
        Topics no longer owned stop being published again and are cleared (at once when
        connected, else after the next connect), as stale topics are at start."""
        owned = frozenset(owned)
        gone = self.owned - owned
        self.owned = owned
        self.stale = (self.stale | gone) - owned
        for topic in gone:
            self._bodies.pop(topic, None)
        if gone and self.link.connected.is_set():
            for topic in sorted(gone):
                self._clearing[self.link.publish(topic, b"", qos=1, retain=True)] = topic
            log.info(
                "clearing %d retained topic(s) the config no longer has: %s",
                len(gone),
                ", ".join(sorted(gone)[:5]) + (" …" if len(gone) > 5 else ""),
            )
        self._save.set()

    def publish(self, topic: str, body: bytes) -> None:
        """Publish ``body`` retained on ``topic`` now when connected, and again after every
        connect."""
        if len(body) >= KEEP_DEFLATED_FROM:
            self._bodies[topic] = (True, zlib.compress(body, 1))
        else:
            self._bodies[topic] = (False, body)
        if self.link.connected.is_set():
            self.link.publish(topic, body, qos=1, retain=True)

    def on_connected(self) -> None:
        """After every CONNACK: every kept message again, and a clear of each stale topic."""
        for topic, (deflated, body) in self._bodies.items():
            self.link.publish(
                topic, zlib.decompress(body) if deflated else body, qos=1, retain=True
            )
        self._clearing.clear()
        for topic in sorted(self.stale):
            self._clearing[self.link.publish(topic, b"", qos=1, retain=True)] = topic
        if self.stale:
            log.info(
                "clearing %d retained topic(s) the config no longer has: %s",
                len(self.stale),
                ", ".join(sorted(self.stale)[:5]) + (" …" if len(self.stale) > 5 else ""),
            )

    def on_puback(self, mid: int) -> None:
        """A PUBACK the buffer's rows do not claim: maybe one of the clears."""
        topic = self._clearing.pop(mid, None)
        if topic is None:
            return
        self.stale.discard(topic)
        if not self.stale:
            self._save.set()

    async def run(self) -> None:
        """Keep the stored set current (owned and still stale topics); cancel to stop."""
        while True:
            await self._save.wait()
            self._save.clear()
            want = self.owned | self.stale
            if want == self._saved:
                continue
            try:
                await self.buffer.set_retained_topics(want)
            except sqlite3.Error as exc:  # the disk: tried again at the next change
                log.warning("cannot note the retained topics in the buffer: %s", exc)
                continue
            self._saved = frozenset(want)
