"""The values of a poll formatted once (``value_texts``) give the same telemetry (verbose
and compact) and the same state-file text as formatting point by point."""

from __future__ import annotations

import contextlib
import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contract.compact import CompactEncoder
from agent.contract.telemetry import MAX_SAFE_INTEGER, TelemetryEncoder, value_texts
from agent.status import PointsText, points_json
from drivers.base import PointResult, good_numbers

NAMES = ["a", "b", 'q"uote', "é", "d"]
UNITS = {"a": "kPa", "b": None, 'q"uote': "°C", "é": "m"}

values = st.one_of(
    st.integers(-(2**60), 2**60),
    st.integers(-MAX_SAFE_INTEGER - 2, -MAX_SAFE_INTEGER + 2),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e6, 1e6),
    st.sampled_from([True, False, None, "text", 0, 1.5, 1e308]),
)
result = st.builds(
    PointResult,
    st.sampled_from(NAMES),
    values,
    st.sampled_from(["good", "good", "good", "timeout"]),
).filter(lambda r: r.quality != "good" or r.value is not None)  # a good reading has a value
polls = st.one_of(
    st.lists(result, max_size=8),
    # the common poll: every point once, in order, all good numbers
    st.lists(st.floats(-1e9, 1e9) | st.integers(-(10**9), 10**9), min_size=5, max_size=5).map(
        lambda vs: [PointResult(n, v) for n, v in zip(NAMES, vs, strict=True)]
    ),
)


@settings(max_examples=600, deadline=None)
@given(polls)
def test_formatted_once_or_point_by_point_the_text_is_the_same(results: list[PointResult]) -> None:
    texts = value_texts(results)
    enc = TelemetryEncoder("gw", "dev", UNITS)
    ts = 1_767_225_600_123
    slow = enc.encode(ts, results)
    assert enc.encode(ts, results, texts=texts) == slow
    assert enc.encode(ts, results, texts=texts) == slow  # the names learnt, reused
    json.loads(slow)
    compact = CompactEncoder(NAMES, "layout")
    assert compact.encode(ts, results, texts=texts) == compact.encode(ts, results)
    points = PointsText(UNITS)
    assert points.render(results, texts) == points_json(results, UNITS)
    assert points.render(results, texts) == points_json(results, UNITS)
    # good_numbers (the gate's fast check): only where every reading is a good finite number
    values = good_numbers(results)
    plain = all(
        r.quality == "good" and type(r.value) in (int, float) and math.isfinite(r.value)  # type: ignore[arg-type]
        for r in results
    )
    if values is not None:
        assert plain and values == [r.value for r in results]
    elif plain and results:  # only when the sum overflows: then the slow way decides
        with contextlib.suppress(OverflowError):  # an int too large for a float
            assert not math.isfinite(sum(r.value for r in results))  # type: ignore[misc]


def test_value_texts_only_for_good_finite_numbers() -> None:
    good = [PointResult("a", 1), PointResult("b", 2.5), PointResult("c", -0.0)]
    assert value_texts(good) == ["1", "2.5", "-0.0"]
    assert value_texts([]) is None
    for odd in (math.nan, math.inf, True, "x", None, 2**53, -(2**53), 10**400):
        assert value_texts([*good, PointResult("d", odd)]) is None, odd
    assert value_texts([*good, PointResult("d", None, "timeout", "no answer")]) is None
    assert value_texts([PointResult("a", 1e308), PointResult("b", 1e308)]) is None  # sum: inf
    assert value_texts([PointResult("a", MAX_SAFE_INTEGER)]) == [str(MAX_SAFE_INTEGER)]
