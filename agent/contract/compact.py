"""Compact telemetry (``telemetry_compact/1``, ``docs/mqtt.md``, Compact telemetry): the
values of one or more polls of a device, in the order the retained ``info`` lists its
points, with each point's static metadata (name, unit, type, scale) left to ``info``;
plus the optional zlib compression of telemetry on the wire and the consumer's decoding.

One poll::

    {"seq": 1042, "schema": "telemetry_compact/1", "layout": "3f9a1c2e",
     "ts": "2026-07-20T08:15:02.120Z", "v": [0.412, 4.088, null],
     "q": {"2": "exception"}, "x": {"2": 2}}

Several polls of one device (``mqtt.max_batch_delay``), one ``seq`` for the message::

    {"seq": 1043, "schema": "telemetry_compact/1", "layout": "3f9a1c2e",
     "ts": "2026-07-20T08:15:03.120Z",
     "rows": [[0, [0.413, 4.087, 7]], [1000, [0.415, 4.085, null], {"q": {"2": "timeout"}}]]}

``ts`` is the (first) poll's acquisition time; each row starts with its offset from it in
ms. ``q`` (quality), ``x`` (Modbus exception code) and ``d`` (counter delta) are keyed by
the point's index, present only where there is something to say. A ``null`` value without
a ``q`` entry: the poll has no reading of that point. ``clock`` and ``historical`` are as
in ``telemetry/1`` and hold for every row.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from agent.contract.payloads import schema_id
from agent.contract.telemetry import json_integer, json_value
from agent.readings import Reading, iso_ms, parse_iso_ms
from drivers.base import GOOD, PointResult

_POINT = attrgetter("point")

ZLIB_DICTIONARY = (
    b'"q":{"0":"timeout","1":"no_connection"},"x":{"d":{"clock":"unsynced",'
    b'"historical":true,"rows":[[0,[null,false,true,{"seq":1,'
    b'"schema":"telemetry_compact/1","layout":"","ts":"2026-01-01T00:00:00.000Z","v":['
)
"""The preset dictionary of compressed telemetry (RFC 1950 section 2.2, FDICT; its
DICTID, the Adler-32 of these bytes, is in every compressed message's header): the text
every compact message begins with. It makes a single poll compress to about half; a
consumer passes the same bytes to inflate (zlib's ``inflateSetDictionary``; Python's
``zlib.decompressobj(zdict=…)``). Changing it is a new contract version."""

ZLIB_DICTID = zlib.adler32(ZLIB_DICTIONARY)
"""The dictionary's id as the zlib header carries it (RFC 1950 section 2.2, DICTID)."""

INFLATED_MAX = 1 << 20
"""Most bytes a consumer inflates one message to (a batch is far smaller); more is
refused, so a hostile message cannot make it allocate without bound."""


def deflate(payload: bytes) -> bytes:
    """``payload`` as a zlib stream (RFC 1950) deflated with :data:`ZLIB_DICTIONARY`:
    first byte 0x78 (deflate, 32 KiB window), which no JSON text begins with, so the
    first byte tells a consumer which it got. Deterministic: the same bytes every time
    (a resend of a seq is byte-identical). Pure."""
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, ZLIB_DICTIONARY)
    return c.compress(payload) + c.flush()


def is_deflated(payload: bytes) -> bool:
    """Whether ``payload`` is a zlib stream (its header's CM is 8, deflate, and the header
    checks: RFC 1950 section 2.2) rather than JSON (which begins with ``{``)."""
    return len(payload) >= 2 and payload[0] & 0x0F == 8 and (payload[0] << 8 | payload[1]) % 31 == 0


def inflate(payload: bytes, limit: int = INFLATED_MAX) -> bytes:
    """The JSON text of a message as published: inflated when it is a zlib stream
    (:func:`deflate`), else ``payload`` itself.

    Raises:
        ValueError: a zlib stream that is corrupt, truncated, made with another
            dictionary, or inflates to more than ``limit`` bytes.
    """
    if not is_deflated(payload):
        return payload
    d = zlib.decompressobj(zdict=ZLIB_DICTIONARY)
    try:
        out = d.decompress(payload, limit)
    except zlib.error as exc:
        raise ValueError(f"not a telemetry zlib stream: {exc}") from None
    if d.unconsumed_tail:
        raise ValueError(f"compressed message inflates to more than {limit} bytes")
    if not d.eof:
        raise ValueError("compressed message is truncated")
    return out


@dataclass(frozen=True, slots=True)
class Row:
    """One poll as a compact row: its time and JSON texts, made when the poll arrives
    (so a batch waiting in memory holds text, not result objects)."""

    ts_ms: int
    values: str
    """The JSON array of the values, in layout order."""
    extras: str
    """``"q":{…},"x":{…},"d":{…}`` (those that are not empty), or ``""``."""

    @property
    def size(self) -> int:
        """Characters this row adds to a message (about its bytes)."""
        return len(self.values) + len(self.extras) + 16


class CompactEncoder:
    """Encodes the polls of one device as ``telemetry_compact/1`` messages, without
    ``seq`` (spliced in at publishing, :func:`agent.buffer.payload_with_seq`).

    Args:
        names: the device's point names in ``info`` order (a value's index is its point's
            index there).
        layout: the device's :func:`agent.contract.payloads.layout_hash`.

    Values follow the rules of ``telemetry/1``: integers beyond ±(2^53−1) are decimal
    strings, a float that is not finite is ``null`` with quality ``nan``/``inf``. The
    ``error`` text of a bad reading is not sent (the quality code, the exception code,
    the device's ``availability`` and the gateway's log say it).
    """

    def __init__(self, names: Sequence[str], layout: str) -> None:
        self._index = {n: i for i, n in enumerate(names)}
        self._names = tuple(names)
        self._size = len(names)
        self._head = (
            f'{{"schema":"{schema_id("telemetry_compact")}","layout":{json.dumps(layout)},"ts":"'
        )

    def row(
        self,
        ts_ms: int,
        results: Sequence[PointResult],
        deltas: Mapping[str, int] | None = None,
        texts: Sequence[str] | None = None,
    ) -> Row:
        """One poll (acquisition time in UTC ms, its results, counter deltas by point) as a
        row. Results of points not in the layout are left out (the drivers report only
        configured points). ``texts``: :func:`agent.contract.telemetry.value_texts` of
        ``results`` when the caller has them (used as they are when the results are the
        layout's points in its order)."""
        if texts is not None and not deltas and tuple(map(_POINT, results)) == self._names:
            return Row(ts_ms, f"[{','.join(texts)}]", "")
        values = ["null"] * self._size
        q: list[str] = []
        x: list[str] = []
        d: list[str] = []
        for r in results:
            i = self._index.get(r.point)
            if i is None:
                continue
            text = None
            if r.quality == GOOD and r.value is not None:
                text = json_value(r.value)
            if text is not None:
                values[i] = text
                if deltas and r.point in deltas:
                    d.append(f'"{i}":{json_integer(deltas[r.point])}')
                continue
            quality = r.quality
            if quality == GOOD:  # a non-finite float that slipped through
                assert isinstance(r.value, float)
                quality = "nan" if math.isnan(r.value) else "inf"
            q.append(f'"{i}":{json.dumps(quality)}')
            if r.exception_code is not None:
                x.append(f'"{i}":{int(r.exception_code)}')
        extras = ",".join(
            f'"{k}":{{{",".join(parts)}}}' for k, parts in (("q", q), ("x", x), ("d", d)) if parts
        )
        return Row(ts_ms, f"[{','.join(values)}]", extras)

    def message(
        self, rows: Sequence[Row], historical: bool = False, unsynced: bool = False
    ) -> bytes:
        """One message of one or more rows (in time order, same flags) as UTF-8 JSON:
        ``v`` for a single poll, ``rows`` for several. ``historical``: taken while the
        gateway had no broker connection; ``unsynced``: stamped by an untrusted clock."""
        first = rows[0]
        flag = ',"clock":"unsynced"' if unsynced else ""
        if historical:
            flag += ',"historical":true'
        head = f'{self._head}{iso_ms(first.ts_ms)}"{flag}'
        if len(rows) == 1:
            extras = f",{first.extras}" if first.extras else ""
            return f'{head},"v":{first.values}{extras}}}'.encode()
        parts = []
        for r in rows:
            extras = f",{{{r.extras}}}" if r.extras else ""
            parts.append(f"[{r.ts_ms - first.ts_ms},{r.values}{extras}]")
        return f'{head},"rows":[{",".join(parts)}]}}'.encode()

    def encode(
        self,
        ts_ms: int,
        results: Sequence[PointResult],
        deltas: Mapping[str, int] | None = None,
        historical: bool = False,
        unsynced: bool = False,
        texts: Sequence[str] | None = None,
    ) -> bytes:
        """One poll as one message (the signature of
        :meth:`agent.contract.telemetry.TelemetryEncoder.encode`)."""
        return self.message([self.row(ts_ms, results, deltas, texts)], historical, unsynced)


@dataclass(frozen=True, slots=True)
class InfoLayout:
    """What a consumer takes from the retained ``info`` to read one device's compact
    messages: its ``layout`` and its points (name and unit) in index order."""

    layout: str
    names: tuple[str, ...]
    units: tuple[str | None, ...]


def info_layouts(info: Mapping[str, Any]) -> dict[str, InfoLayout]:
    """Device id → :class:`InfoLayout`, from a decoded ``info`` message.

    Raises:
        ValueError: not an ``info`` message of this contract.
    """
    try:
        return {
            d["id"]: InfoLayout(
                d["layout"],
                tuple(p["name"] for p in d["points"]),
                tuple(p["unit"] for p in d["points"]),
            )
            for d in info["devices"]
        }
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not an info message: {exc!r}") from None


def parse_compact(
    payload: bytes | str, gateway: str, device: str, layout: InfoLayout
) -> list[Reading]:
    """Decode a compact telemetry message (as the platform receives it: JSON, or zlib when
    compressed) of ``device`` into readings, one per point and poll, naming the points
    from the device's ``info`` (:func:`info_layouts`). A value without a reading (``null``
    without a quality) gives no reading. The readings of one message share its ``seq``.

    Raises:
        ValueError: not a compact message, or one of another layout than ``layout`` (the
            gateway's config changed: read the newer ``info``).
    """
    text = inflate(payload) if isinstance(payload, bytes) else payload
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("schema") != schema_id("telemetry_compact"):
        raise ValueError("not a compact telemetry message")
    if doc["layout"] != layout.layout:
        raise ValueError(
            f"message of layout {doc['layout']}, info says {layout.layout}: the config changed"
        )
    t0 = parse_iso_ms(doc["ts"])
    polls = doc["rows"] if "rows" in doc else [[0, doc["v"], doc]]
    seq = doc.get("seq")
    out = []
    for row in polls:
        dt, values = row[0], row[1]
        extras = row[2] if len(row) > 2 else {}
        if len(values) != len(layout.names):
            raise ValueError(f"{len(values)} values for {len(layout.names)} points")
        bad = extras.get("q", {})
        for i, value in enumerate(values):
            quality = bad.get(str(i), GOOD)
            if value is None and quality == GOOD:
                continue  # not read in this poll
            name = layout.names[i]
            out.append(
                Reading(
                    gateway,
                    device,
                    name,
                    value,
                    layout.units[i],
                    quality,
                    None if quality == GOOD else quality,
                    t0 + dt,
                    seq,
                )
            )
    return out
