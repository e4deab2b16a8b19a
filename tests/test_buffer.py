"""The SQLite outbox on real files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.buffer import (
    MEMORY_MAX_BYTES,
    RESERVE_BLOCK,
    Buffer,
    BufferError,
    Item,
    memory_buffer,
    payload_with_seq,
    read_reservation,
)
from agent.readings import iso_ms, parse_iso_ms


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


def test_a_new_buffer_never_reuses_a_seq_of_a_lost_one(tmp_path: Path) -> None:
    """The file moved aside or deleted: the next buffer starts at the reservation, above
    every seq the lost one handed out, so the platform's dedup on seq drops nothing new."""
    path = tmp_path / "buffer.db"
    b = Buffer(path)
    assert b.append_many([("t", b"{}", i) for i in range(5)]) == [1, 2, 3, 4, 5]
    b.close()
    assert read_reservation(path) == RESERVE_BLOCK  # fsynced ahead of the last seq
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    b = Buffer(path)
    assert b.next_seq == RESERVE_BLOCK
    assert b.append_many([("t", b"{}", 9)]) == [RESERVE_BLOCK]
    assert read_reservation(path) == 2 * RESERVE_BLOCK - 1
    b.close()


def test_reservation_moves_ahead_before_it_is_reached(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    b = Buffer(path)
    b.append_many([("t", b"{}", 1)])
    b._set_sequence(RESERVE_BLOCK // 2 + 10)  # half a block from the reservation
    (seq,) = b.append_many([("t", b"{}", 2)])
    assert read_reservation(path) == seq + RESERVE_BLOCK
    b.close()


def test_memory_buffer_continues_below_the_reservation_and_moves_to_disk(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    disk = Buffer(path)
    disk.append_many([("t", b'{"n":1}', 1), ("t", b'{"n":2}', 2)])  # unsent on disk
    disk.close()
    mem = memory_buffer(path, 1000, None)
    assert mem.memory and mem.max_bytes == MEMORY_MAX_BYTES
    seqs = mem.append_many([("t", b'{"n":3}', 3), ("e", b'{"alarm":1}', 4, 1)], 0, {("d", "c"): 7})
    assert seqs == [3, 4]  # after the file's last seq, far below its reservation
    mem.ack([3])
    disk = Buffer(path)
    assert disk.import_from(mem) == 1
    rows = disk.fetch(0, 10)
    assert [(r.seq, r.body, r.prio) for r in rows] == [
        (1, b'{"n":1}', 0),
        (2, b'{"n":2}', 0),
        (4, b'{"alarm":1}', 1),
    ]
    assert disk.point_state() == {("d", "c"): 7}
    assert disk.append_many([("t", b"{}", 5)]) == [5]  # on from the memory buffer's last
    disk.close()


def test_memory_buffer_when_the_file_cannot_be_read_starts_at_the_reservation(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    Buffer(path).close()
    path.write_bytes(b"garbage" * 1000)
    mem = memory_buffer(path, 1000, None)
    assert mem.append_many([("t", b"{}", 1)]) == [RESERVE_BLOCK]


def _flagged(ts: str) -> bytes:
    return b'{"gateway":"g","device":"d","ts":"%s","clock":"unsynced","points":{}}' % ts.encode()


def test_restamp_rewrites_the_buffered_messages_of_each_epoch(tmp_path: Path) -> None:
    """Two epochs (the unsynchronised clock stepped once), one message already sent: the
    buffered ones get the correction of their own epoch, the reports give every epoch's
    range and correction for the platform."""
    b = Buffer(tmp_path / "buffer.db")
    t0 = 1_700_000_000_000
    items: list[Item] = [
        ("t", _flagged(iso_ms(t0)), t0, 0, 5_000),
        ("t", _flagged(iso_ms(t0 + 100)), t0 + 100, 0, 5_000),
        ("t", _flagged(iso_ms(t0 + 90_000)), t0 + 90_000, 0, 95_000),
    ]
    assert b.append_many(items) == [1, 2, 3]
    b.ack([1])  # already delivered with the wrong time: the report covers it
    b.append_many([("t", b'{"ts":"%s"}' % iso_ms(t0).encode(), t0)], restamp_offset=10_000)
    reports = b.take_restamps()
    assert [(r.first_seq, r.last_seq, r.correction_ms, r.rewritten) for r in reports] == [
        (1, 2, 5_000, 1),
        (3, 3, -85_000, 1),
    ]
    rows = {r.seq: r for r in b.fetch(0, 10)}
    assert rows[2].body == (
        b'{"gateway":"g","device":"d","ts":"%s","clock":"restamped","points":{}}'
        % iso_ms(t0 + 5_100).encode()
    )
    assert rows[2].ts_ms == t0 + 5_100
    assert parse_iso_ms(json.loads(rows[3].body)["ts"]) == t0 + 5_000
    assert rows[4].body == b'{"ts":"%s"}' % iso_ms(t0).encode()  # synced: untouched
    b.append_many([("t", b"{}", 1)], restamp_offset=10_000)
    assert b.take_restamps() == []  # epochs are closed once
    b.close()


def test_epochs_of_an_earlier_boot_are_not_restamped(tmp_path: Path) -> None:
    b = Buffer(tmp_path / "buffer.db")
    b.boot = "earlier-boot"
    b.append_many([("t", _flagged(iso_ms(1_000)), 1_000, 0, 7)])
    b.close()
    b = Buffer(tmp_path / "buffer.db")
    b.append_many([], restamp_offset=50)
    assert b.take_restamps() == []
    assert b.fetch(0, 1)[0].body == _flagged(iso_ms(1_000))  # keeps its flag
    b.close()


def test_a_start_after_a_memory_run_goes_on_after_its_seqs(tmp_path: Path) -> None:
    """The agent stopped while buffering in memory (its seqs already published): the next
    start on disk must not hand them out again (the mark in $RUNTIME_DIRECTORY)."""
    path = tmp_path / "state" / "buffer.db"
    disk = Buffer(path)
    disk.ack(disk.append_many([("t", b"{}", 1), ("t", b"{}", 2)]))
    disk.close()
    mem = memory_buffer(path, 1000, None)
    assert mem.append_many([("t", b"{}", 3), ("t", b"{}", 4)]) == [3, 4]
    mem.close()  # stopped in memory: nothing reached the disk
    disk = Buffer(path)
    assert disk.append_many([("t", b"{}", 5)]) == [5]
    disk.close()


ASYNC_EXIT = """
import asyncio, sys
from pathlib import Path
from agent.buffer import AsyncBuffer, Buffer
ab = AsyncBuffer(Buffer(Path(sys.argv[1]), max_messages=10**7))
items = [("t/x", b'{"v":1}' * 50, 1_800_000_000_000 + i) for i in range(100_000)]
async def main():
    await ab.append_many(items[:10])
    try:  # an item without a time: the caller gets the exception, the thread goes on
        await ab.append_many([("t/x", b"{}")])
    except Exception as exc:
        print("raised", type(exc).__name__)
    asyncio.get_running_loop().create_task(ab.append_many(items))  # a big commit under way
    await asyncio.sleep(0.05)
asyncio.run(main())  # the loop ends without AsyncBuffer.close()
"""


def test_the_buffer_thread_ends_its_commit_when_the_process_exits_without_close(
    tmp_path: Path,
) -> None:
    """AsyncBuffer runs its calls on a thread of its own: an exception reaches the caller,
    and when the interpreter exits without close() (the loop crashed) the commit under way
    ends (all 100,000 rows in the file) instead of being cut off."""
    db = tmp_path / "b.db"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", ASYNC_EXIT, str(db)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["raised", "IndexError"], proc.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 100_010
