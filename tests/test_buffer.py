"""The SQLite outbox on real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.buffer import Buffer, BufferError, payload_with_seq


def test_seq_is_monotonic_across_reopen_and_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    b = Buffer(path)
    assert b.append_many([("t", b'{"a":1}', 1), ("t", b'{"a":2}', 2)]) == [1, 2]
    b.ack([1, 2])  # the newest rows are gone; their seqs must still never come back
    b.close()
    b = Buffer(path)
    assert b.append_many([("t", b'{"a":3}', 3)]) == [3]
    assert b.stats().last_seq == 3
    b.close()


def test_one_transaction_per_append_many(tmp_path: Path) -> None:
    b = Buffer(tmp_path / "buffer.db")
    seqs = b.append_many([("t", b"{}", i) for i in range(100)])
    assert seqs == list(range(1, 101))
    rows = b.fetch(0, 1000)
    assert [r.seq for r in rows] == seqs
    assert b.fetch(95, 3)[0].seq == 96
    b.close()


def test_wal_mode(tmp_path: Path) -> None:
    b = Buffer(tmp_path / "buffer.db")
    b.close()
    db = sqlite3.connect(tmp_path / "buffer.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    b = Buffer(path, max_messages=10)
    b.append_many([("t", b"{}", i) for i in range(8)])
    b.append_many([("t", b"{}", i) for i in range(5)])
    st = b.stats()
    assert (st.pending, st.dropped, st.last_seq) == (10, 3, 13)
    assert [r.seq for r in b.fetch(0, 100)] == list(range(4, 14))
    b.close()
    b = Buffer(path, max_messages=10)
    assert b.stats().dropped == 3  # the counter is on disk
    b.close()


def test_ack_deletes_only_acknowledged(tmp_path: Path) -> None:
    b = Buffer(tmp_path / "buffer.db")
    b.append_many([("t", b"{}", i) for i in range(5)])
    b.ack([2, 4, 99])
    assert [r.seq for r in b.fetch(0, 10)] == [1, 3, 5]
    assert b.stats().pending == 3
    b.close()


def test_corrupt_file_names_file_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(BufferError) as err:
        Buffer(path)
    assert str(path) in str(err.value) and "move it aside" in str(err.value)


def test_payload_with_seq() -> None:
    assert payload_with_seq(7, b'{"a":1}') == b'{"seq":7,"a":1}'
    assert payload_with_seq(7, b"{}") == b'{"seq":7}'


def test_cap_never_drops_alarm_events(tmp_path: Path) -> None:
    """Alarm events (prio 1) stay whatever the cap; only telemetry is dropped and counted,
    and the drop range is exactly the telemetry that went."""
    path = tmp_path / "buffer.db"
    b = Buffer(path, max_messages=10)
    b.append_many([("t", b"{}", i, 1 if i in (1, 4) else 0) for i in range(8)])  # seq 1..8
    b.append_many([("t", b"{}", i) for i in range(6)])  # seq 9..14: 4 too many
    st = b.stats()
    assert (st.pending, st.dropped) == (10, 4)
    kept = b.fetch(0, 100)
    assert [r.seq for r in kept] == [2, 5, 7, 8, 9, 10, 11, 12, 13, 14]
    assert [r.seq for r in kept if r.prio] == [2, 5]
    assert [r.seq for r in b.fetch(0, 100, prio_only=True)] == [2, 5]
    assert b.dropped_upto == 6
    b.close()


def test_old_buffer_file_gets_the_priority_column(tmp_path: Path) -> None:
    """A buffer written before alarm events existed is upgraded in place, rows kept."""
    path = tmp_path / "buffer.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
        "body BLOB NOT NULL, ts_ms INTEGER NOT NULL);"
        "INSERT INTO outbox(topic, body, ts_ms) VALUES ('t', x'7b7d', 5);"
    )
    db.commit()
    db.close()
    b = Buffer(path)
    (row,) = b.fetch(0, 10)
    assert (row.seq, row.ts_ms, row.prio) == (1, 5, 0)
    assert b.append_many([("t", b"{}", 6, 1)]) == [2]
    b.close()


def test_byte_cap_keeps_the_file_within_it(tmp_path: Path) -> None:
    """max_bytes: the oldest telemetry makes room before new rows go in, so the database
    file stops growing at the cap; alarm events stay; every drop is counted."""
    path = tmp_path / "buffer.db"
    cap = 1_000_000
    b = Buffer(path, max_messages=10**7, max_bytes=cap)
    body = b'{"v":' + b"1" * 400 + b"}"
    for k in range(60):  # 60 x 100 rows of ~450 bytes: 2.7 MB offered
        b.append_many([("t/x", body, k * 100 + i, 1 if i == 0 else 0) for i in range(100)])
    st = b.stats()
    b.close()
    size = path.stat().st_size
    assert size <= cap * 1.1, size
    assert st.dropped > 2000 and st.pending + st.dropped == 6000
    b = Buffer(path)
    assert len(b.fetch(0, 10_000, prio_only=True)) == 60, "every alarm event kept"
    b.close()


def test_low_disk_stops_the_growth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Less than min_free left on the filesystem (injected): the buffer turns over
    instead of growing, and says so once."""
    import os
    from types import SimpleNamespace

    b = Buffer(tmp_path / "buffer.db", max_messages=10**7, min_free=50_000_000)
    body = b"x" * 200
    b.append_many([("t", body, i) for i in range(2000)])
    monkeypatch.setattr(
        os,
        "statvfs",
        lambda p: SimpleNamespace(f_bavail=10, f_frsize=4096),  # 40 kB free
    )
    before = b.stats().pending
    for k in range(20):
        b.append_many([("t", body, k) for _ in range(100)])
    st = b.stats()
    b.close()
    assert st.pending <= before + 100, (before, st.pending)
    assert st.dropped >= 1800
