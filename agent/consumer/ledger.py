"""In-memory accounting of one consumer: dedup on (gateway, seq), ``dropped`` ranges,
clock re-stamps and the gap report (the at-least-once rule of ``docs/mqtt.md``, Delivery
guarantees: every seq 1..last arrives or is in a range a ``dropped`` notice reported).

Seqs are held as sorted disjoint ranges, so a gateway whose seqs arrive without gaps costs
one range however long it runs; memory grows with the number of holes, bounded by
:data:`MAX_RANGES` per gateway and :data:`MAX_GATEWAYS`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MAX_RANGES = 100_000
"""Disjoint ranges of seqs kept per gateway (received, or reported dropped)."""
MAX_GATEWAYS = 100_000
"""Gateways accounted for by one consumer."""
MAX_RESTAMPS = 1_000
"""``clock_restamp`` ranges remembered per gateway (the newest)."""


class Full(Exception):
    """A limit of the ledger was reached; ``str()`` says which."""


class RangeSet:
    """A set of integers ≥ 1 as sorted disjoint closed ranges ``[a, b]``."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __contains__(self, n: int) -> bool:
        i = bisect.bisect_right(self.starts, n) - 1
        return i >= 0 and self.ends[i] >= n

    def __len__(self) -> int:
        """The number of ranges (not of integers)."""
        return len(self.starts)

    def add(self, a: int, b: int | None = None) -> None:
        """Add ``a..b`` (``b`` defaults to ``a``); raise :class:`Full` past
        :data:`MAX_RANGES` ranges."""
        b = a if b is None else b
        if b < a:
            return
        lo = bisect.bisect_left(self.ends, a - 1)  # first range that touches or follows
        hi = bisect.bisect_right(self.starts, b + 1)  # past the last range that touches
        if lo < hi:
            a = min(a, self.starts[lo])
            b = max(b, self.ends[hi - 1])
        elif len(self.starts) >= MAX_RANGES:
            raise Full(f"more than {MAX_RANGES} separate seq ranges")
        self.starts[lo:hi] = [a]
        self.ends[lo:hi] = [b]

    def last(self) -> int:
        """The largest member, 0 when empty."""
        return self.ends[-1] if self.ends else 0

    def missing(self, upto: int, other: RangeSet | None = None) -> list[tuple[int, int]]:
        """The ranges of ``1..upto`` in neither this set nor ``other``."""
        merged = RangeSet()
        for s in (self, other):
            if s is not None:
                for a, b in zip(s.starts, s.ends, strict=True):
                    merged.starts.append(a)
                    merged.ends.append(b)
        pairs = sorted(zip(merged.starts, merged.ends, strict=True))
        out: list[tuple[int, int]] = []
        nxt = 1
        for a, b in pairs:
            if a > upto:
                break
            if a > nxt:
                out.append((nxt, a - 1))
            nxt = max(nxt, b + 1)
        if nxt <= upto:
            out.append((nxt, upto))
        return out


@dataclass
class GatewayLedger:
    """What one gateway sent this consumer."""

    received: RangeSet = field(default_factory=RangeSet)
    dropped: RangeSet = field(default_factory=RangeSet)
    restamps: list[tuple[int, int, int]] = field(default_factory=list)
    """(first_seq, last_seq, correction_ms) of each ``clock_restamp`` notice."""
    duplicates: int = 0


class Ledger:
    """Dedup, drops, re-stamps and gaps of every gateway this consumer has seen."""

    def __init__(self) -> None:
        self.gateways: dict[str, GatewayLedger] = {}

    def _of(self, gateway: str) -> GatewayLedger:
        led = self.gateways.get(gateway)
        if led is None:
            if len(self.gateways) >= MAX_GATEWAYS:
                raise Full(f"more than {MAX_GATEWAYS} gateways")
            led = self.gateways[gateway] = GatewayLedger()
        return led

    def first_time(self, gateway: str, seq: int) -> bool:
        """Record (gateway, seq); False when it was seen before (a duplicate, counted)."""
        led = self._of(gateway)
        if seq in led.received:
            led.duplicates += 1
            return False
        led.received.add(seq)
        return True

    def drop(self, gateway: str, first_seq: int, last_seq: int) -> None:
        """A ``dropped`` notice: ``first_seq..last_seq`` may never arrive."""
        self._of(gateway).dropped.add(first_seq, last_seq)

    def restamp(self, gateway: str, first_seq: int, last_seq: int, correction_ms: int) -> None:
        """A ``clock_restamp`` notice (kept for :meth:`correction`)."""
        r = self._of(gateway).restamps
        if (first_seq, last_seq, correction_ms) not in r:
            r.append((first_seq, last_seq, correction_ms))
            del r[:-MAX_RESTAMPS]

    def correction(self, gateway: str, seq: int) -> int | None:
        """The correction (ms) a ``clock_restamp`` notice gave for ``seq``, None if none."""
        led = self.gateways.get(gateway)
        for a, b, c in reversed(led.restamps if led else []):
            if a <= seq <= b:
                return c
        return None

    def gaps(self) -> dict[str, list[tuple[int, int]]]:
        """Per gateway with any: the seq ranges within 1..(largest received) neither
        received nor covered by a ``dropped`` notice."""
        out = {}
        for gw, led in self.gateways.items():
            holes = led.received.missing(led.received.last(), led.dropped)
            if holes:
                out[gw] = holes
        return out
