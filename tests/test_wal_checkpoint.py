"""The buffer's WAL checkpoints run on a thread of their own, not inside a commit
(``agent.wal_checkpoint``), against real SQLite files."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from agent.buffer import Buffer
from agent.wal_checkpoint import CHECKPOINT_PAGES, WRITER_FALLBACK_PAGES, frames_waiting

BODY = b"x" * 3000
"""A body of about one page."""


def checkpoint_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "wal-checkpoint" and t.is_alive())


def test_commits_leave_the_checkpoint_to_the_checkpoint_thread(tmp_path: Path) -> None:
    """A burst of commits writes past SQLite's usual mark of 1,000 pages without any
    commit checkpointing (the writer's mark is 4,000); the thread then copies the WAL
    back within a few of its looks, and the rows are all there."""
    before = checkpoint_threads()
    buf = Buffer(tmp_path / "buffer.db", max_messages=1_000_000)
    shm = tmp_path / "buffer.db-shm"
    assert checkpoint_threads() == before + 1
    assert buf._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WRITER_FALLBACK_PAGES
    peak = 0
    for _ in range(150):  # about 1,500 pages, faster than the thread looks
        buf.append_many([("t", BODY, 1, 0, None)] * 10)
        peak = max(peak, frames_waiting(shm) or 0)
    assert CHECKPOINT_PAGES < peak < WRITER_FALLBACK_PAGES, peak
    deadline = time.monotonic() + 5
    while (frames_waiting(shm) or 0) >= CHECKPOINT_PAGES and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (frames_waiting(shm) or 0) < CHECKPOINT_PAGES, "the thread did not checkpoint"
    assert buf.stats().pending == 1500
    buf.close()
    assert checkpoint_threads() == before, "the thread ends with the buffer"
    with sqlite3.connect(tmp_path / "buffer.db") as con:
        assert con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1500


def test_frames_waiting_reads_the_wal_index(tmp_path: Path) -> None:
    """No wal-index: None; a database in WAL mode with an uncopied commit: its frames."""
    assert frames_waiting(tmp_path / "none-shm") is None
    short = tmp_path / "short-shm"
    short.write_bytes(b"\0" * 10)
    assert frames_waiting(short) is None
    con = sqlite3.connect(tmp_path / "db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("CREATE TABLE t (x BLOB)")
    for _ in range(20):
        con.execute("INSERT INTO t VALUES (?)", (BODY,))
    waiting = frames_waiting(tmp_path / "db-shm")
    assert waiting is not None and waiting >= 20
    con.execute("PRAGMA wal_checkpoint(PASSIVE)")
    assert frames_waiting(tmp_path / "db-shm") == 0
    con.close()
