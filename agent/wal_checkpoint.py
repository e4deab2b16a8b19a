"""The buffer's WAL checkpoints, off the path of its commits.

In WAL mode SQLite copies the WAL's pages back into the database file once the WAL holds
``wal_autocheckpoint`` pages (1,000 by default), and it does so inside the commit that
crossed the mark (https://www.sqlite.org/wal.html, "Automatic Checkpoint"). Measured at 100
devices × 100 registers: one such commit every 2.5–3 s, 12–15 ms longer than the others
(the page copies and three syncs, ``strace -T``), and its rows, and those of the commit
queued behind it, reached the broker that much later: more than 1 % of the messages,
the whole of the poll-to-broker p99.

Here a thread of its own, with a connection of its own, runs ``PRAGMA
wal_checkpoint(PASSIVE)`` once :data:`CHECKPOINT_PAGES` pages wait in the WAL: a passive
checkpoint neither waits for the writer nor makes it wait
(https://www.sqlite.org/c3ref/wal_checkpoint_v2.html), so commits carry no checkpoint.
The writer's own automatic checkpoint stays, at :data:`WRITER_FALLBACK_PAGES`, for a
checkpointer that cannot keep up or fails: the WAL stays bounded whatever happens here.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_PAGES = 1000
"""Pages waiting in the WAL that start a checkpoint (SQLite's own default mark)."""
WRITER_FALLBACK_PAGES = 4 * CHECKPOINT_PAGES
"""The writer's ``wal_autocheckpoint``: reached only when this thread falls behind."""
LOOK_EVERY_S = 0.5
"""How often the WAL's size is looked at (one 100-byte read of the wal-index)."""
_HEADER = struct.Struct("=16xI76xI")
"""From the wal-index (the ``-shm`` file), in native byte order: ``mxFrame`` (the last
valid frame, offset 16 of the first header copy) and ``nBackfill`` (frames already
copied back, offset 96, the checkpoint information after the two 48-byte header
copies): https://www.sqlite.org/walformat.html, sections 2.1 and 2.2."""


def frames_waiting(shm: Path) -> int | None:
    """Frames of the WAL not yet copied back into the database, read from its wal-index
    without a lock (a torn read only moves a checkpoint by one look); None when there
    is no wal-index to read. Raises nothing."""
    try:
        fd = os.open(shm, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.pread(fd, _HEADER.size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) < _HEADER.size:
        return None
    mx_frame, backfilled = _HEADER.unpack(data)
    return max(0, int(mx_frame) - int(backfilled))


def _run(path: Path, stop: threading.Event, pages: int, every: float) -> None:
    shm = path.with_name(path.name + "-shm")
    db: sqlite3.Connection | None = None
    failing = False
    try:
        while not stop.wait(every):
            waiting = frames_waiting(shm)
            if waiting is None or waiting < pages:
                continue
            try:
                if db is None:
                    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                if not failing:
                    log.warning(
                        "checkpoint of %s failed: %s; the writer checkpoints itself once "
                        "%d pages wait",
                        path,
                        exc,
                        WRITER_FALLBACK_PAGES,
                    )
                    failing = True
                continue
            if failing:
                log.info("checkpoints of %s work again", path)
                failing = False
    finally:
        if db is not None:
            db.close()


class Checkpointer:
    """Checkpoints the WAL of the database at ``path`` on a thread of its own while it
    lives (see the module's docstring); the writer's connection should have
    ``PRAGMA wal_autocheckpoint`` at :data:`WRITER_FALLBACK_PAGES`.

    Args:
        path: the database file (in WAL mode, open by its writer).
        pages: frames waiting in the WAL that start a checkpoint.
        every: seconds between two looks at the WAL's size.
    """

    def __init__(
        self, path: Path, pages: int = CHECKPOINT_PAGES, every: float = LOOK_EVERY_S
    ) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_run, args=(path, self._stop, pages, every), name="wal-checkpoint", daemon=True
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _finish, self._stop, self._thread)

    def close(self) -> None:
        """Stop the thread (a checkpoint under way ends first); idempotent."""
        self._finalizer()


def _finish(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    if thread is not threading.current_thread():
        thread.join(10.0)
