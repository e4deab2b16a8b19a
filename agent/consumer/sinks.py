"""Where decoded messages go: JSON lines (one consumer, accounting in memory) or PostgreSQL
(:mod:`agent.consumer.postgres`, any number of consumers).

A sink takes a batch of :class:`Item` (a :class:`~agent.consumer.decode.Record` or a
:class:`Rejected` message) and returns only when the batch is safely written: the
transport acknowledges the batch afterwards, so a consumer that dies in between gets the
batch again and the sink's dedup makes the second copy a no-op.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol

from agent.consumer.decode import Record
from agent.consumer.ledger import Full, Ledger
from agent.readings import iso_ms

HEAD = 256
"""Bytes of a refused payload kept for people to look at."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message refused by its decoder: where it came from, why, and its first bytes."""

    topic: str
    reason: str
    head: bytes


Item = Record | Rejected


@dataclass
class Counts:
    """What a sink did since it started."""

    stored: int = 0
    """Sequenced messages stored for the first time."""
    duplicates: int = 0
    """Sequenced messages already stored (a redelivery or a resend): no-ops."""
    retained: int = 0
    """Retained state messages (status, info, health, availability, alarm states)."""
    rejected: int = 0
    """Messages refused (not the contract, or a limit of the sink)."""


class Sink(Protocol):
    """What the consumer loop writes to."""

    counts: Counts

    def write(self, batch: list[Item]) -> None:
        """Write ``batch``; return only when it is safely stored."""

    def report(self) -> dict[str, list[tuple[int, int]]]:
        """Per gateway: the seq ranges neither received nor covered by a drop notice."""

    def close(self) -> None:
        """Flush and release what the sink holds."""


def _notice_ints(r: Record, *names: str) -> list[int]:
    return [int(r.doc[n]) for n in names]


class JsonLinesSink:
    """One JSON object per line to ``out`` (a text file or stdout), each with ``record``:

    - ``message``: a sequenced message seen for the first time: ``gateway``, ``seq``,
      ``topic``, ``schema``, ``received_at``, ``payload`` (as sent) and, when a
      ``clock_restamp`` notice already covers a message flagged ``"clock":"unsynced"``,
      ``correction_ms`` and ``ts_true`` (its ``ts`` corrected);
    - ``restamp``: a ``clock_restamp`` notice arrived: add ``correction_ms`` to the times
      of the messages ``first_seq..last_seq`` of ``gateway`` flagged unsynced that were
      written before it (later ones carry ``ts_true``);
    - ``state``: a retained message (``payload`` null: the topic was cleared);
    - ``invalid``: a refused message, ``topic`` and ``reason``;
    - ``gaps``: at :meth:`write_report` (every ``--report-every`` and at the end), per
      gateway with any, ``missing``: the ``[first, last]`` seq ranges neither received
      nor reported dropped.

    Duplicates are counted, not written. Accounting is in memory (:class:`Ledger`): with
    several consumers sharing the messages, use PostgreSQL.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.ledger = Ledger()
        self.counts = Counts()

    def _line(self, doc: dict[str, Any]) -> None:
        self.out.write(json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n")

    def write(self, batch: list[Item]) -> None:
        now = iso_ms(time.time_ns() // 1_000_000)
        for item in batch:
            if isinstance(item, Rejected):
                self.counts.rejected += 1
                self._line({"record": "invalid", "topic": item.topic, "reason": item.reason})
                continue
            if item.seq is None:
                self.counts.retained += 1
                self._line(
                    {"record": "state", "gateway": item.gateway, "topic": item.topic,
                     "schema": item.schema or None, "received_at": now, "payload": item.doc}
                )  # fmt: skip
                continue
            try:
                first = self.ledger.first_time(item.gateway, item.seq)
            except Full as exc:
                self.counts.rejected += 1
                self._line({"record": "invalid", "topic": item.topic, "reason": str(exc)})
                continue
            if not first:
                self.counts.duplicates += 1
                continue
            self.counts.stored += 1
            line: dict[str, Any] = {
                "record": "message",
                "gateway": item.gateway,
                "seq": item.seq,
                "topic": item.topic,
                "schema": item.schema,
                "received_at": now,
            }
            if item.clock == "unsynced" and item.ts_ms is not None:
                fix = self.ledger.correction(item.gateway, item.seq)
                if fix is not None:
                    line["correction_ms"] = fix
                    line["ts_true"] = iso_ms(item.ts_ms + fix)
            line["payload"] = item.doc
            self._line(line)
            if item.kind == "notice":
                self._notice(item)
        self.out.flush()

    def _notice(self, r: Record) -> None:
        try:
            if r.type == "dropped":
                a, b = _notice_ints(r, "first_seq", "last_seq")
                self.ledger.drop(r.gateway, a, b)
            elif r.type == "clock_restamp":
                a, b, c = _notice_ints(r, "first_seq", "last_seq", "correction_ms")
                self.ledger.restamp(r.gateway, a, b, c)
                self._line(
                    {"record": "restamp", "gateway": r.gateway, "first_seq": a,
                     "last_seq": b, "correction_ms": c}
                )  # fmt: skip
        except Full as exc:
            self._line({"record": "invalid", "topic": r.topic, "reason": str(exc)})

    def report(self) -> dict[str, list[tuple[int, int]]]:
        return self.ledger.gaps()

    def write_report(self) -> dict[str, list[tuple[int, int]]]:
        """Write one ``gaps`` line per gateway with missing seqs; return them."""
        gaps = self.report()
        for gw, ranges in sorted(gaps.items()):
            self._line({"record": "gaps", "gateway": gw, "missing": [list(r) for r in ranges]})
        self.out.flush()
        return gaps

    def close(self) -> None:
        self.out.flush()
