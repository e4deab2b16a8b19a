"""The publisher between a real buffer file and a real mosquitto: rows offered by a commit
reach the broker without waiting for another commit."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from agent.buffer import AsyncBuffer, Buffer
from agent.config.model import MqttConfig
from agent.mqtt import MqttLink
from agent.publisher import FRESH_MAX, Publisher
from agent.writer import BufferWriter
from tests.helpers import Mosquitto, Subscriber, wait_until


@pytest.mark.parametrize("rows", [3, FRESH_MAX + 10])
def test_one_commit_alone_is_published_whole(rows: int, tmp_path: Path, broker: Mosquitto) -> None:
    """An idle, caught-up publisher and one commit, then none: a few rows go out from the
    commit's callback; more than FRESH_MAX (a commit after the disk was stalled) are read
    back from the file by the publisher's task, which the commit wakes."""
    sub = Subscriber(broker.port, "t/#")

    async def run() -> None:
        buffer = AsyncBuffer(Buffer(tmp_path / "buffer.db"))
        link = MqttLink(MqttConfig(port=broker.port), "pub-test", "t/status")
        publisher = Publisher(buffer, link, "t/status", window=64)
        writer = BufferWriter(buffer)
        writer.on_commit = publisher.offer
        done = asyncio.Event()
        on_puback = link.on_puback

        def counted(mid: int, ok: bool, reason: str) -> None:
            on_puback(mid, ok, reason)
            if publisher.acked_total >= rows:
                done.set()

        link.on_puback = counted
        tasks = [asyncio.create_task(link.run()), asyncio.create_task(publisher.run())]
        try:
            async with asyncio.timeout(10):
                await link.connected.wait()
            await asyncio.sleep(0.3)  # idle: caught up, nothing to send
            for i in range(rows):
                writer.submit("t/x", json.dumps({"i": i}).encode(), 1_800_000_000_000 + i)
            assert await writer.commit()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await done.wait()
        finally:
            await link.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await buffer.close()

    try:
        asyncio.run(run())
        got = wait_until(lambda: len(sub.on("/x")) >= rows and sub.on("/x"), 10, f"{rows} messages")
    finally:
        sub.close()
    assert sorted(m.json()["seq"] for m in got) == list(range(1, rows + 1))
