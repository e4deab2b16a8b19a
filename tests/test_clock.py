"""Clock trust: sources of synchronisation, release date, steps, re-stamping bodies."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.clock import RELEASE_DATE_MS, STEP_MS, Clock, kernel_synced, restamp_body
from agent.readings import iso_ms


def test_kernel_status_is_read() -> None:
    assert kernel_synced() in (True, False)  # adjtimex answers on Linux


def test_flag_file_decides_with_source_file(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    clock = Clock("file", flag)
    assert not clock.synced and clock.epoch is not None
    flag.touch()
    assert not clock.check()  # asked at most once a second
    assert clock.check(force=True) and clock.synced and clock.epoch is None
    assert Clock("assume", flag).synced


def test_a_time_before_the_release_is_never_trusted(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    flag.touch()
    assert Clock("file", flag).synced
    clock = Clock("assume", flag, not_before_ms=time.time_ns() // 1_000_000 + 3_600_000)
    assert not clock.synced
    assert time.time_ns() // 1_000_000 > RELEASE_DATE_MS


def test_a_step_is_seen_at_once_and_opens_a_new_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the wall clock (only) jumps back one hour."""
    clock = Clock("file", tmp_path / "absent")
    first = clock.epoch
    assert first is not None
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() - 3_600_000_000_000)
    clock.check()  # not forced: a step is looked at on every call
    (step,) = clock.take_steps()
    assert abs(step.step_ms + 3_600_000) < STEP_MS and not step.synced
    assert clock.epoch is not None and abs(clock.epoch - (first - 3_600_000)) < STEP_MS
    clock.check(force=True)
    assert clock.take_steps() == []  # the new offset is the reference now


def test_restamp_body_moves_every_time_stamp_and_keeps_the_rest() -> None:
    body = json.dumps(
        {
            "gateway": "g",
            "ts": iso_ms(1_000),
            "clock": "unsynced",
            "onset": iso_ms(500),
            "value": 0.1,
            "message": "x",
        },
        separators=(",", ":"),
    ).encode()
    new, ts = restamp_body(body, 2_000) or (b"", 0)
    assert ts == 3_000
    assert json.loads(new) == {
        "gateway": "g",
        "ts": iso_ms(3_000),
        "clock": "restamped",
        "onset": iso_ms(2_500),
        "value": 0.1,
        "message": "x",
    }
    assert restamp_body(b'{"ts":"1970-01-01T00:00:01.000Z"}', 5) is None  # not flagged
    assert restamp_body(b'{"clock":"unsynced"}', 5) is None  # no time stamp
