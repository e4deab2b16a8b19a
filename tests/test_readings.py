"""Timestamps of the contract: ``iso_ms`` (which keeps the text of the last second)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from agent.readings import iso_ms, parse_iso_ms


def reference(ts_ms: int) -> str:
    dt = datetime.fromtimestamp(ts_ms // 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ts_ms % 1000:03d}Z"


@given(st.lists(st.integers(0, 253_402_300_799_999), min_size=1, max_size=20), st.data())
def test_iso_ms_of_any_times_in_any_order(times: list[int], data: st.DataObject) -> None:
    # the same second again, the next one, and a jump back: the kept second never leaks
    for ts in times:
        near = data.draw(st.sampled_from([ts, ts + 1, ts + 999, ts - 1000, ts + 86_400_000]))
        for t in (ts, near, ts):
            if 0 <= t <= 253_402_300_799_999:  # years 1970..9999
                assert iso_ms(t) == reference(t)
                assert parse_iso_ms(iso_ms(t)) == t
