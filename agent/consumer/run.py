"""The consumer loop: take a batch from the source, decode each message, write the batch
to the sink, acknowledge it; until stopped (SIGTERM, SIGINT) or ``duration`` passed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.consumer.decode import Context, Format, Invalid
from agent.consumer.sinks import HEAD, Item, JsonLinesSink, Rejected, Sink
from agent.consumer.sources import Incoming, Source

log = logging.getLogger("edge-agent.consume")

STATS_EVERY_S = 30.0
"""How often the counts are logged (INFO)."""


def decode_batch(batch: list[Incoming], fmt: Format, ctx: Context) -> list[Item]:
    """Each message decoded by ``fmt``, or :class:`Rejected` with the reason; messages
    that are not the consumer's (commands) are left out."""
    out: list[Item] = []
    for m in batch:
        try:
            record = fmt.decode(m.topic, m.payload, ctx)
        except Invalid as exc:
            out.append(Rejected(m.topic, str(exc), m.payload[:HEAD]))
        else:
            if record is not None:
                out.append(record)
    return out


def consume(
    source: Source,
    sink: Sink,
    fmt: Format,
    ctx: Context,
    stop: threading.Event,
    duration_s: float = 0.0,
    batch_size: int = 500,
    linger_s: float = 0.05,
    report_every_s: float = 0.0,
    on_report: Callable[[dict[str, list[tuple[int, int]]]], None] | None = None,
) -> None:
    """Run until ``stop`` is set or ``duration_s`` (> 0) passed. Each batch (at most
    ``batch_size`` messages, gathered for at most ``linger_s`` after the first) is
    written before it is acknowledged. Every ``report_every_s`` (> 0) the sink's gap
    report goes to ``on_report``."""
    start = time.monotonic()
    next_stats = start + STATS_EVERY_S
    next_report = start + report_every_s if report_every_s > 0 else float("inf")
    rejected_logged = 0
    while not stop.is_set():
        now = time.monotonic()
        if duration_s > 0 and now - start >= duration_s:
            break
        batch = source.take(batch_size, linger_s if batch_size > 1 else 0.2)
        if batch:
            items = decode_batch(batch, fmt, ctx)
            sink.write(items)
            source.ack(batch)
            for item in items:
                if isinstance(item, Rejected) and rejected_logged < 100:
                    rejected_logged += 1
                    log.warning("refused a message on %s: %s", item.topic, item.reason)
        now = time.monotonic()
        if now >= next_stats:
            next_stats = now + STATS_EVERY_S
            c = sink.counts
            log.info(
                "stored %d, duplicates %d, retained %d, refused %d",
                c.stored,
                c.duplicates,
                c.retained,
                c.rejected,
            )
        if now >= next_report:
            next_report = now + report_every_s
            _report(sink, on_report)


def _report(
    sink: Sink, on_report: Callable[[dict[str, list[tuple[int, int]]]], None] | None
) -> dict[str, list[tuple[int, int]]]:
    gaps = sink.write_report() if isinstance(sink, JsonLinesSink) else sink.report()
    if on_report is not None:
        on_report(gaps)
    return gaps


def final_report(sink: Sink) -> dict[str, list[tuple[int, int]]]:
    """The gap report at the end (written as ``gaps`` lines by a JSON-lines sink), with
    the counts logged."""
    gaps = _report(sink, None)
    c = sink.counts
    missing = sum(b - a + 1 for ranges in gaps.values() for a, b in ranges)
    log.info(
        "stopped: stored %d, duplicates %d, retained %d, refused %d; %d seq(s) missing "
        "in %d gateway(s)",
        c.stored,
        c.duplicates,
        c.retained,
        c.rejected,
        missing,
        len(gaps),
    )
    return gaps
