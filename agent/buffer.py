"""Durable store-and-forward buffer: an SQLite outbox in WAL mode.

One row per outgoing MQTT message. The row id is the gateway-wide sequence number ``seq``:
``INTEGER PRIMARY KEY AUTOINCREMENT`` never hands out an id twice, even after the newest rows
were deleted or the process restarted (SQLite docs, "autoinc.html"), so ``seq`` is strictly
increasing for the life of the buffer file. A row is deleted only after the broker's PUBACK.

All methods of :class:`Buffer` block; :class:`AsyncBuffer` runs them on one dedicated
thread, because a commit on an SD card can stall for a long time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import sqlite3
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from agent.clock import boot_id, restamp_body
from agent.wal_checkpoint import WRITER_FALLBACK_PAGES, Checkpointer

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    topic  TEXT    NOT NULL,
    body   BLOB    NOT NULL,
    ts_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters(name, value) VALUES ('dropped', 0);
CREATE TABLE IF NOT EXISTS alarm_state (
    alarm TEXT PRIMARY KEY,
    doc   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clock_epoch (
    boot      TEXT    NOT NULL,
    offset_ms INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (boot, offset_ms)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained_topic (
    topic TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS point_state (
    device TEXT    NOT NULL,
    point  TEXT    NOT NULL,
    value  INTEGER NOT NULL,
    PRIMARY KEY (device, point)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS command_id (
    id       TEXT    PRIMARY KEY,
    name     TEXT    NOT NULL,
    at_ms    INTEGER NOT NULL,
    response TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS command_id_at ON command_id(at_ms);
"""


EPOCH_UPSERT = (
    "INSERT INTO clock_epoch VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
    "first_seq = min(first_seq, excluded.first_seq), last_seq = max(last_seq, excluded.last_seq)"
)
"""Record (boot, epoch offset, first seq, last seq), widening a range already recorded."""

RESERVE_BLOCK = 1_000_000
"""Seqs reserved ahead in ``seq.reserved`` (see :class:`Buffer`)."""
MEMORY_MAX_BYTES = 8_000_000
"""Cap on an in-memory buffer (a read-only or full filesystem at start): 8 MB of RAM."""

ROW_OVERHEAD = 40
"""Bytes a row takes in the database beyond its topic and body (seq, ts, prio, b-tree)."""
OUR_TABLES = frozenset(
    {
        "outbox",
        "counters",
        "alarm_state",
        "point_state",
        "clock_epoch",
        "retained_topic",
        "command_id",
        "sqlite_sequence",
    }
)
COMMANDS_KEPT = 100_000
"""Most command ids remembered (:meth:`Buffer.claim_command`); beyond, the oldest are
forgotten early. At the default intake rate a day holds fewer."""


def filesystem_state(directory: Path) -> str | None:
    """``"read-only"`` or ``"full"`` for the filesystem holding ``directory`` (or its
    nearest existing parent), else None."""
    for d in (directory, *directory.parents):
        try:
            st = os.statvfs(d)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            return "read-only"
        if st.f_bavail == 0:
            return "full"
        return None
    return None


def _open_advice(path: Path, exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "full" in text or "disk I/O" in text or "readonly" in text or "unable to open" in text:
        state = filesystem_state(path.parent)
        why = f" (its filesystem is {state})" if state else ""
        return (
            f"cannot open buffer {path}: {text}{why}. Free space on (or fix the permissions "
            f"of) the filesystem of {path.parent}; the file itself is kept as it is."
        )
    return (
        f"cannot open buffer {path}: {text}. If the file is corrupt or not an edge-agent "
        f"buffer, stop the agent, move it aside (mv {path} {path}.bad) and start again; its "
        "unsent readings can still be inspected with sqlite3."
    )


Item = (
    tuple[str, bytes, int] | tuple[str, bytes, int, int] | tuple[str, bytes, int, int, int | None]
)
"""A message to buffer: (topic, body, ts_ms[, prio[, epoch]]); ``epoch``: the clock epoch
(offset wall - monotonic, ms, see :mod:`agent.clock`) of a message stamped while the clock
was not trusted, else None."""


@dataclass(frozen=True, slots=True)
class Restamp:
    """Messages of one clock epoch re-stamped once the clock was synchronised."""

    first_seq: int
    last_seq: int
    correction_ms: int
    """Added to every time stamp of the epoch's messages flagged ``"clock":"unsynced"``."""
    rewritten: int
    """How many of them were still buffered (now flagged ``"restamped"``)."""
    bodies: dict[int, tuple[bytes, int]]
    """The new body and time stamp of each re-stamped seq."""


DISK_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO})
"""Filesystem errors that make the agent buffer in memory instead of stopping."""


class BufferError(RuntimeError):
    """The buffer file cannot be opened or written; the message names the file and a fix."""


class CorruptBuffer(BufferError):
    """The file is not a usable buffer: corrupt (fails SQLite's integrity check) or not a
    buffer of this agent. :func:`open_buffer` moves it aside."""


class StateDirError(BufferError):
    """``state_dir`` cannot be created or written: fix the config, a restart will not help."""


@dataclass(frozen=True, slots=True)
class Row:
    """One buffered message. ``body`` is the JSON object without its ``seq`` member."""

    seq: int
    topic: str
    body: bytes
    ts_ms: int
    prio: int = 0
    """1: an alarm event, published before any backlog and never dropped by the cap."""


@dataclass(frozen=True, slots=True)
class BufferStats:
    """Pending rows, total dropped rows (cap reached) and the highest seq ever handed out."""

    pending: int
    dropped: int
    last_seq: int


STATE_FILES = (
    "agent.lock",
    "buffer.db",
    "buffer.db-wal",
    "buffer.db-shm",
    "seq.reserved",
    "seq.reserved.tmp",
)
"""The files the agent keeps in its state_dir; none of them may be a symbolic link."""
PRIVATE = 0o600
"""Mode of the files the agent creates itself (the daemon also runs with umask 027, so
SQLite's files are 0640): readings, seqs and pids are nobody else's business."""


def _link_refused(path: Path) -> StateDirError:
    return StateDirError(
        f"{path} is a symbolic link: the agent does not follow links in its state_dir "
        f"(one could make it write over another file); remove it (rm {path}) and start again"
    )


def open_nofollow(path: Path, flags: int, mode: int = PRIVATE) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` (``O_NOFOLLOW``, open(2))
    and refuses anything but a regular file.

    Raises:
        StateDirError: ``path`` is a symbolic link or not a regular file.
        OSError: as os.open.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_refused(path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateDirError(f"{path} is not a regular file: remove it and start again")
    os.set_blocking(fd, True)
    return fd


def write_replace(
    target: Path, data: bytes | Iterable[bytes], sync: bool, mode: int = PRIVATE
) -> None:
    """Replace ``target`` with a file holding ``data`` (bytes, or pieces of bytes written
    one after the other), atomically: written to ``target.tmp`` (created anew,
    ``O_EXCL|O_NOFOLLOW``: a leftover or a planted link is removed first, never followed),
    ``mode`` (less the umask), then renamed over ``target`` (rename(2) replaces a link
    itself, not what it points to). With ``sync`` the file and the directory are fsynced.

    Raises:
        OSError: the file cannot be written (full or read-only filesystem, permissions).
    """
    tmp = target.with_name(target.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:
        tmp.unlink()
        fd = os.open(tmp, flags, mode)
    try:
        for piece in (data,) if isinstance(data, bytes) else data:
            view = memoryview(piece)
            while view:  # write(2) may write less than asked
                view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    if sync:
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def lock_state_dir(state_dir: Path) -> int:
    """Take the exclusive lock ``state_dir/agent.lock`` for this process (released by the
    kernel when the process ends, however it ends). Two agents on one buffer would send each
    other's rows and fight over the MQTT client id.

    None of :data:`STATE_FILES` may be a symbolic link: the agent refuses to start rather
    than write through one. The lock file is created with mode :data:`PRIVATE`.

    On a read-only or full filesystem (the agent then buffers in memory) an existing lock
    file is locked read-only; without one, the agent runs unlocked and says so.

    Returns:
        the open file descriptor holding the lock (keep it open), or -1: no lock.
    Raises:
        StateDirError: the directory cannot be created or written (a config problem), or
            one of its files is a symbolic link.
        BufferError: another process holds the lock.
    """
    lock = state_dir / "agent.lock"
    for name in STATE_FILES:
        if (state_dir / name).is_symlink():
            raise _link_refused(state_dir / name)
    try:
        state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = open_nofollow(lock, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            try:
                fd = open_nofollow(lock, os.O_RDONLY)
            except OSError:
                log.warning("cannot create the lock %s (%s): running without it", lock, exc)
                return -1
            return _flock(fd, state_dir)
        raise StateDirError(
            f"cannot use state_dir {state_dir}: {exc}; set state_dir in the config to a "
            "writable directory (under systemd: /var/lib/edge-agent, its StateDirectory)"
        ) from exc
    _flock(fd, state_dir)
    with contextlib.suppress(OSError):  # a full disk: the lock is what counts
        if os.fstat(fd).st_mode & 0o077:  # a lock file of an earlier version
            os.fchmod(fd, PRIVATE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _flock(fd: int, state_dir: Path) -> int:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BufferError(
            f"another edge-agent (pid {other}) is running with state_dir {state_dir}; "
            "stop it first, or give this one its own state_dir"
        ) from None
    return fd


def payload_with_seq(seq: int, body: bytes) -> bytes:
    """Splice ``"seq": N`` into the front of the JSON object ``body``.

    The seq is only known once the row exists; splicing keeps every resend of a row
    byte-identical without a second write.
    """
    if body == b"{}":
        return b'{"seq":%d}' % seq
    return b'{"seq":%d,' % seq + body[1:]


def reservation_path(path: Path) -> Path:
    """The seq reservation file beside the buffer ``path`` (``seq.reserved``)."""
    return path.with_name("seq.reserved")


def memory_mark_path(path: Path) -> Path:
    """Where an in-memory stand-in for the buffer at ``path`` notes the last seq it handed
    out: in RAM, outside the (read-only or full) state filesystem, so that the next start
    on disk goes on after it: ``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``),
    else ``/run/edge-agent``, else the temporary directory."""
    key = hashlib.sha1(str(path.absolute()).encode()).hexdigest()[:16]
    name = f"seq-{key}.memory"
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    for d in (runtime, "/run/edge-agent", tempfile.gettempdir()):
        creatable = d == "/run/edge-agent" and os.access("/run", os.W_OK)
        if d and (os.access(d, os.W_OK) or (creatable and not os.path.exists(d))):
            return Path(d) / name
    return Path(tempfile.gettempdir()) / name


def _read_int(path: Path, owner_only: bool = False) -> int:
    """The number at the start of ``path``; 0 if there is none or it cannot be read.

    Raises:
        StateDirError: ``path`` is a symbolic link (unless ``owner_only``: then it is
            ignored, as is a file of another user, with a warning: a shared directory
            such as /tmp).
    """
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except StateDirError:
        if not owner_only:
            raise
        log.warning("ignoring %s: a symbolic link or not a regular file", path)
        return 0
    except OSError:
        return 0
    try:
        if owner_only and os.fstat(fd).st_uid != os.geteuid():
            log.warning("ignoring %s: it belongs to another user", path)
            return 0
        return max(0, int(os.read(fd, 64).split()[0]))
    except (OSError, ValueError, IndexError):
        return 0
    finally:
        os.close(fd)


def read_reservation(path: Path) -> int:
    """The lowest seq a new buffer at ``path`` may hand out (0: no reservation readable).

    Raises:
        StateDirError: ``seq.reserved`` is a symbolic link.
    """
    return _read_int(reservation_path(path))


def disk_high_water(path: Path) -> int | None:
    """The highest seq the buffer file at ``path`` ever handed out, read without writing
    anything (the filesystem may be read-only or full); None if it is missing or cannot
    be read."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
            return int(row[0]) if row else 0
        finally:
            db.close()
    except (sqlite3.Error, ValueError, TypeError):
        return None


def _make_private(path: Path) -> None:
    """Take read and write access away from others on the buffer ``path`` and its WAL and
    shared-memory files, if an earlier version (or a umask of 022) left them open: they
    hold every unsent reading. Best effort (a read-only filesystem keeps its modes)."""
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            mode = os.fstat(fd).st_mode
            if mode & 0o007:
                os.fchmod(fd, stat.S_IMODE(mode) & ~0o007)
        except OSError:
            pass
        finally:
            os.close(fd)


class Buffer:
    """Blocking SQLite outbox. Use from one thread only (see :class:`AsyncBuffer`).

    Seqs are never handed out twice by this gateway, even when the buffer file is lost:
    the file ``seq.reserved`` beside it always holds a seq above every seq handed out
    (it is moved :data:`RESERVE_BLOCK` ahead, fsynced, whenever the last seq comes within
    half a block of it). A new buffer (first start, a file moved aside or deleted) starts
    there. An in-memory buffer (:meth:`in_memory`) uses the seqs between the file's last
    seq and the reservation, which no later start will use.

    Args:
        path: the database file; its directory is created if missing.
        max_messages: cap on rows; when exceeded the oldest rows are deleted and counted in
            the persistent ``dropped`` counter.
        synchronous: ``"normal"`` or ``"full"`` (SQLite ``PRAGMA synchronous``).
        max_bytes: cap on the database's used pages, bytes (None: none).
        min_free: bytes to keep free on the filesystem (None: no check).
        memory: keep the buffer in RAM (``path`` only names it in messages).
        start_seq: with ``memory``, the first seq to hand out.
    Raises:
        BufferError: the file cannot be created, is not a database, or is corrupt.
    """

    def __init__(
        self,
        path: Path,
        max_messages: int = 200_000,
        synchronous: str = "normal",
        max_bytes: int | None = None,
        min_free: int | None = None,
        memory: bool = False,
        start_seq: int = 1,
    ) -> None:
        self.path = path
        self.memory = memory
        self.next_seq = 0
        """The first seq of this buffer when it started empty (0: it continued a file)."""
        self._reserved = 0
        self._mark_failed = False
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        """Cap on the database's used pages, bytes (None: none)."""
        self.min_free = min_free
        """Bytes to keep free on the filesystem: below, the buffer stops growing."""
        self._low_disk_logged = False
        self.dropped_upto = 0
        """Highest seq the size cap deleted so far (0: none)."""
        self._drop_logged_at = -1e9
        self._drops_unlogged = 0
        self._drops_first = self._drops_last = 0
        self.drop_reports: list[tuple[int, int, int]] = []
        self._limit_hit = f"max_messages {max_messages}"
        self.restamps: list[Restamp] = []
        """Re-stamped clock epochs not yet taken (see :meth:`append_many`)."""
        self._claims = 0
        """Commands claimed by this process (the cap is enforced every 1000th)."""
        self.boot = boot_id()
        self._checkpointer: Checkpointer | None = None
        if memory:
            self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            self._db.executescript(SCHEMA)
            self._check_schema()
            self._set_sequence(start_seq - 1)
            self.next_seq = start_seq
            self._count = 0
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            return
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout=5000")
            _make_private(path)
            # look before writing anything: another program's file is left exactly as it is
            self._refuse_foreign()
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA journal_size_limit=8388608")
            # checkpoints on a thread of their own (agent.wal_checkpoint); this one only
            # when that falls behind
            self._db.execute(f"PRAGMA wal_autocheckpoint={WRITER_FALLBACK_PAGES}")
            self._db.executescript(SCHEMA)
            self._check_schema()
            self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            self._reserved = read_reservation(path)
            if self._last_seq() == 0 and not self._has_rows() and self._reserved > 1:
                self._set_sequence(self._reserved - 1)  # a new buffer: past every old seq
                self.next_seq = self._reserved
            mark = _read_int(memory_mark_path(path), owner_only=True)
            if mark > self._last_seq():
                log.warning(
                    "an earlier run buffered in memory up to seq %d (its filesystem could "
                    "not be written): going on after it",
                    mark,
                )
                self._set_sequence(mark)
            self._reserve()
            self._checkpointer = Checkpointer(path)
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            text = str(exc)
            environmental = any(
                w in text for w in ("full", "disk I/O", "readonly", "unable to open")
            )
            cls = BufferError if environmental else CorruptBuffer
            raise cls(_open_advice(path, exc)) from exc
        except OSError as exc:
            raise BufferError(f"cannot create buffer directory {path.parent}: {exc}") from exc

    def _refuse_foreign(self) -> None:
        tables = {
            str(r[0]) for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        foreign = tables - OUR_TABLES
        if foreign:
            raise sqlite3.DatabaseError(
                f"not an edge-agent buffer: it has table(s) {', '.join(sorted(foreign))}"
            )
        if "outbox" in tables:
            cols = [r[1] for r in self._db.execute("PRAGMA table_info(outbox)")]
            if cols not in (
                ["seq", "topic", "body", "ts_ms"],
                ["seq", "topic", "body", "ts_ms", "prio"],
            ):
                raise sqlite3.DatabaseError(
                    f"not an edge-agent buffer: table outbox has columns {cols}"
                )

    def _check_schema(self) -> None:
        cols = [r[1] for r in self._db.execute("PRAGMA table_info(outbox)")]
        if cols == ["seq", "topic", "body", "ts_ms"]:  # a buffer from before alarm events
            self._db.execute("ALTER TABLE outbox ADD COLUMN prio INTEGER NOT NULL DEFAULT 0")
            cols.append("prio")
        self._db.execute("CREATE INDEX IF NOT EXISTS outbox_prio ON outbox(seq) WHERE prio > 0")
        has_seq = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE name='sqlite_sequence'"
        ).fetchone()
        if cols != ["seq", "topic", "body", "ts_ms", "prio"] or (
            has_seq is None and self._has_rows()
        ):
            raise sqlite3.DatabaseError(
                f"not an edge-agent buffer: table outbox has columns {cols}"
            )

    def _last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        return int(row[0]) if row else 0

    def _set_sequence(self, seq: int) -> None:
        """Make the next seq ``seq + 1`` (never lower than it already is)."""
        if seq <= self._last_seq():
            return
        with self._db:
            if (
                self._db.execute(
                    "UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'", (seq,)
                ).rowcount
                == 0
            ):
                self._db.execute(
                    "INSERT INTO sqlite_sequence(name, seq) VALUES ('outbox', ?)", (seq,)
                )

    def _reserve(self) -> None:
        """Keep ``seq.reserved`` at least half a block above the last seq (durably: written
        to a temporary file, fsynced, renamed, directory fsynced). A failure (full disk) is
        logged and tried again at the next commit."""
        last = self._last_seq()
        if self.memory or self._reserved - last > RESERVE_BLOCK // 2:
            return
        target = reservation_path(self.path)
        new = last + RESERVE_BLOCK
        try:
            write_replace(target, f"{new}\n".encode(), sync=True)
        except OSError as exc:
            log.warning("cannot write %s: %s; will try again", target, exc)
            return
        self._reserved = new

    def _restamp(self, offset_ms: int) -> list[Restamp]:
        """Inside the caller's transaction: for every clock epoch recorded in this boot,
        re-stamp its still-buffered messages flagged unsynced by ``offset_ms - epoch``
        (:func:`agent.clock.restamp_body`) and close the epoch. Epochs of earlier boots
        cannot be re-stamped (the monotonic clock restarted): they are closed, logged and
        their messages keep the flag."""
        db = self._db
        out: list[Restamp] = []
        for boot, epoch, first, last in db.execute(
            "SELECT boot, offset_ms, first_seq, last_seq FROM clock_epoch ORDER BY first_seq"
        ).fetchall():
            if boot != self.boot:
                log.warning(
                    "seq %d..%d were stamped by an unsynchronised clock in an earlier boot: "
                    "they cannot be re-stamped and stay flagged",
                    first,
                    last,
                )
                continue
            correction = int(offset_ms) - int(epoch)
            changed = []
            for seq, body in db.execute(
                "SELECT seq, body FROM outbox WHERE seq BETWEEN ? AND ? "
                'AND instr(body, CAST(\'"clock":"unsynced"\' AS BLOB)) > 0',
                (first, last),
            ).fetchall():
                new = restamp_body(bytes(body), correction)
                if new is not None:
                    changed.append((new[0], new[1], seq))
            db.executemany("UPDATE outbox SET body = ?, ts_ms = ? WHERE seq = ?", changed)
            out.append(
                Restamp(
                    int(first), int(last), correction, len(changed), {c[2]: c[:2] for c in changed}
                )
            )
        db.execute("DELETE FROM clock_epoch")
        return out

    def take_restamps(self) -> list[Restamp]:
        """The re-stamped epochs since the last call."""
        out, self.restamps = self.restamps, []
        return out

    def _mark_memory(self, seq: int) -> None:
        """In memory: note ``seq`` in :func:`memory_mark_path` (RAM; no fsync needed)."""
        target = memory_mark_path(self.path)
        try:
            target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            write_replace(target, f"{seq}\n".encode(), sync=False)
        except OSError as exc:
            if not self._mark_failed:
                log.warning("cannot note the in-memory seqs in %s: %s", target, exc)
                self._mark_failed = True

    def import_from(self, other: Buffer) -> int:
        """Take over everything ``other`` (an in-memory buffer) holds, with the same seqs,
        in one transaction: rows, alarm states, point states, the drop counter and drop
        reports not yet taken. Returns the number of rows taken over.

        Raises:
            sqlite3.Error: nothing was taken over (``other`` is unchanged).
        """
        src = other._db
        rows = src.execute("SELECT seq, topic, body, ts_ms, prio FROM outbox").fetchall()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO outbox(seq, topic, body, ts_ms, prio) VALUES (?,?,?,?,?)",
                rows,
            )
            db.executemany(
                "INSERT OR REPLACE INTO alarm_state(alarm, doc) VALUES (?, ?)",
                src.execute("SELECT alarm, doc FROM alarm_state").fetchall(),
            )
            db.executemany(
                "INSERT OR REPLACE INTO point_state(device, point, value) VALUES (?, ?, ?)",
                src.execute("SELECT device, point, value FROM point_state").fetchall(),
            )
            db.executemany(
                EPOCH_UPSERT,
                src.execute("SELECT * FROM clock_epoch").fetchall(),
            )
            db.executemany(
                "INSERT OR IGNORE INTO retained_topic(topic) VALUES (?)",
                src.execute("SELECT topic FROM retained_topic").fetchall(),
            )
            db.executemany(
                "INSERT OR IGNORE INTO command_id(id, name, at_ms, response) VALUES (?,?,?,?)",
                src.execute("SELECT id, name, at_ms, response FROM command_id").fetchall(),
            )
            lost = int(src.execute("SELECT value FROM counters WHERE name='dropped'").fetchone()[0])
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (lost,))
            last = other._last_seq()
            if last > self._last_seq():
                db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'", (last,))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._count = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        other.report_drops()
        self.drop_reports.extend(other.take_drop_reports())
        self.dropped_upto = max(self.dropped_upto, other.dropped_upto)
        self._reserve()
        return len(rows)

    def _has_rows(self) -> bool:
        return self._db.execute("SELECT 1 FROM outbox LIMIT 1").fetchone() is not None

    def _rollback(self) -> None:
        # Keep the original error: after some failures SQLite has already rolled back.
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def append_many(
        self,
        items: Sequence[Item],
        handed_upto: int = 0,
        state: Mapping[tuple[str, str], int] | None = None,
        alarms: Mapping[str, str] | None = None,
        restamp_offset: int | None = None,
        acked: Sequence[int] = (),
    ) -> list[int]:
        """Commit ``(topic, body, ts_ms[, prio[, epoch]])`` items in one transaction; return
        their seqs. ``prio`` 1 marks an alarm event: the size cap never deletes it. The seq
        range of each clock ``epoch`` is recorded (table ``clock_epoch``). ``acked``: seqs
        the broker acknowledged, deleted in the same transaction (one transaction per
        polling cycle, acknowledgements included).

        ``restamp_offset`` (the synchronised clock's wall - monotonic offset, ms): in the
        same transaction, re-stamp the buffered messages of every open epoch of this boot
        (see :meth:`restamp`); the results wait in :attr:`restamps`.

        ``state`` (``(device, point) → value``, e.g. the last raw value of each counter)
        and ``alarms`` (alarm key → JSON state) are stored in the same transaction, so
        they always match the last committed poll and its events.

        If the cap is exceeded, the oldest rows are deleted in the same transaction and
        :attr:`dropped_upto` moves to the highest deleted seq. Only deleted rows with a seq
        above ``handed_upto`` (the rows the publisher has not yet given to the MQTT client)
        count as dropped: older ones are already on their way to the broker.

        Raises:
            sqlite3.OperationalError: e.g. the disk is full; nothing of this call is kept.
        """
        db = self._db
        seqs: list[int] = []
        drops: list[tuple[int, int, int, int]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            gone = self._delete_acked(acked) if acked else 0
            self._count -= gone
            # only telemetry makes room: a commit of alarm events and notices alone (never
            # dropped) may pass the cap by their few bytes until the next poll's commit,
            # so that reporting a drop never causes another one
            routine = any(len(i) < 4 or not i[3] for i in items)
            room = self._bytes_excess(items) if routine else 0
            if room > 0:  # make room first, so that the file does not grow
                self._limit_hit = (
                    "max_bytes / min_free" if not self.memory else "in-memory buffer size"
                )
                drops.append(self._drop_oldest(room, handed_upto))
            for item in items:
                cur = db.execute(
                    "INSERT INTO outbox(topic, body, ts_ms, prio) VALUES (?, ?, ?, ?)",
                    (item[0], item[1], item[2], item[3] if len(item) > 3 else 0),
                )
                seqs.append(int(cur.lastrowid or 0))
            epochs: dict[int, list[int]] = {}
            for item, seq in zip(items, seqs, strict=True):
                if len(item) > 4 and item[4] is not None:
                    span = epochs.setdefault(item[4], [seq, seq])
                    span[1] = seq
            if epochs:
                db.executemany(
                    EPOCH_UPSERT,
                    [(self.boot, off, a, b) for off, (a, b) in epochs.items()],
                )
            restamped = [] if restamp_offset is None else self._restamp(restamp_offset)
            if alarms:
                db.executemany(
                    "INSERT OR REPLACE INTO alarm_state(alarm, doc) VALUES (?, ?)",
                    list(alarms.items()),
                )
            if state:
                db.executemany(
                    "INSERT OR REPLACE INTO point_state(device, point, value) VALUES (?, ?, ?)",
                    [(d, p, v) for (d, p), v in state.items()],
                )
            count = self._count + len(items) - sum(d[0] for d in drops)
            if count > self.max_messages and routine:
                self._limit_hit = f"max_messages {self.max_messages}"
                drops.append(self._drop_oldest(count - self.max_messages, handed_upto))
            lost_total = sum(d[1] for d in drops)
            if lost_total:
                db.execute(
                    "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (lost_total,)
                )
            db.execute("COMMIT")
        except BaseException:
            self._count += gone
            self._rollback()
            raise
        self.restamps.extend(restamped)
        self._count += len(items)
        if seqs and self.memory:
            self._mark_memory(seqs[-1])
        elif seqs and self._reserved - seqs[-1] <= RESERVE_BLOCK // 2:
            self._reserve()
        for deleted, lost, first_lost, boundary in drops:
            self._count -= deleted
            self.dropped_upto = max(self.dropped_upto, boundary)
            if lost:
                self._note_drops(lost, first_lost, boundary)
        return seqs

    def _drop_oldest(self, n: int, handed_upto: int) -> tuple[int, int, int, int]:
        """Delete the ``n`` oldest telemetry rows (alarm events stay), inside the caller's
        transaction. Returns (rows deleted, of them not yet handed to the client, the
        first of those, the highest seq deleted)."""
        db = self._db
        found = db.execute(
            "SELECT seq FROM outbox WHERE prio = 0 ORDER BY seq LIMIT 1 OFFSET ?", (n - 1,)
        ).fetchone()
        if found is None:  # fewer telemetry rows than that: all of them
            found = db.execute("SELECT MAX(seq) FROM outbox WHERE prio = 0").fetchone()
        boundary = int(found[0] or 0)
        lost, first = db.execute(
            "SELECT COUNT(*), MIN(seq) FROM outbox WHERE seq > ? AND seq <= ? AND prio = 0",
            (handed_upto, boundary),
        ).fetchone()
        deleted = db.execute("DELETE FROM outbox WHERE seq <= ? AND prio = 0", (boundary,)).rowcount
        return int(deleted), int(lost), int(first or 0), boundary

    def _bytes_excess(self, items: Sequence[Item]) -> int:
        """Rows to delete before adding ``items`` so that the database stays within
        :attr:`max_bytes` and the filesystem keeps :attr:`min_free` bytes free."""
        if not self._count or (self.max_bytes is None and self.min_free is None):
            return 0
        new = sum(len(i[0]) + len(i[1]) + ROW_OVERHEAD for i in items)
        excess = 0
        db = self._db
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        free_pages = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        used = (pages - free_pages) * self._page_size
        avg = max(1, used // self._count)
        if self.max_bytes is not None and used + new > self.max_bytes:
            excess = -(-(used + new - self.max_bytes) // avg)
        if self.min_free is not None and not self.memory and free_pages * self._page_size < new:
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize - new < self.min_free:
                # the disk is nearly full: the buffer may not grow, only turn over
                excess = max(excess, -(-new // avg))
                if not self._low_disk_logged:
                    log.error(
                        "less than %d bytes free on the filesystem of %s: the buffer stops "
                        "growing and drops its oldest telemetry for new readings",
                        self.min_free,
                        self.path,
                    )
                    self._low_disk_logged = True
        return excess

    def point_state(self) -> dict[tuple[str, str], int]:
        """The stored ``(device, point) → value`` (see :meth:`append_many`)."""
        rows = self._db.execute("SELECT device, point, value FROM point_state").fetchall()
        return {(str(d), str(p)): int(v) for d, p, v in rows}

    def _note_drops(self, n: int, first: int, last: int) -> None:
        if not self._drops_unlogged:
            self._drops_first = first
        self._drops_unlogged += n
        self._drops_last = last
        if time.monotonic() - self._drop_logged_at >= 60.0:
            self.report_drops()

    def report_drops(self) -> None:
        """Log the drops not reported yet (at most once a minute while the cap is hit)."""
        if not self._drops_unlogged:
            return
        log.warning(
            "buffer %s reached its limit (%s): dropped %d unsent message(s), seq %d..%d; "
            "the platform will see these seqs missing",
            self.path,
            self._limit_hit,
            self._drops_unlogged,
            self._drops_first,
            self._drops_last,
        )
        self.drop_reports.append((self._drops_unlogged, self._drops_first, self._drops_last))
        self._drop_logged_at = time.monotonic()
        self._drops_unlogged = 0

    def take_drop_reports(self) -> list[tuple[int, int, int]]:
        """The drop blocks logged since the last call: (count, first seq, last seq). Only
        telemetry is dropped: alarm events inside a block are kept and delivered."""
        out, self.drop_reports = self.drop_reports, []
        return out

    def fetch(self, after_seq: int, limit: int, prio_only: bool = False) -> list[Row]:
        """Return up to ``limit`` rows with ``seq > after_seq``, oldest first (only alarm
        events with ``prio_only``)."""
        where = "seq > ? AND prio > 0" if prio_only else "seq > ?"
        cur = self._db.execute(
            f"SELECT seq, topic, body, ts_ms, prio FROM outbox WHERE {where} ORDER BY seq LIMIT ?",
            (after_seq, limit),
        )
        rows = [Row(int(s), str(t), bytes(b), int(ts), int(p)) for s, t, b, ts, p in cur]
        cur.close()  # never leave a read transaction open (it would pin the WAL)
        return rows

    def alarm_state(self) -> dict[str, dict[str, Any]]:
        """The stored state of every alarm (see :meth:`append_many`); unreadable entries
        are skipped."""
        out: dict[str, dict[str, Any]] = {}
        for key, doc in self._db.execute("SELECT alarm, doc FROM alarm_state").fetchall():
            with contextlib.suppress(ValueError):
                value = json.loads(doc)
                if isinstance(value, dict):
                    out[str(key)] = value
        return out

    def retained_topics(self) -> set[str]:
        """The retained topics this gateway published and has not cleared yet (see
        :class:`agent.retained.RetainedState`)."""
        return {str(r[0]) for r in self._db.execute("SELECT topic FROM retained_topic")}

    def set_retained_topics(self, topics: Iterable[str]) -> None:
        """Replace the stored set of retained topics (one transaction)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM retained_topic")
            db.executemany(
                "INSERT INTO retained_topic(topic) VALUES (?)", [(t,) for t in sorted(topics)]
            )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def command_seen(self, command_id: str) -> tuple[str, str | None] | None:
        """``(name, first response JSON or None)`` of a command id remembered by
        :meth:`claim_command`, or None."""
        row = self._db.execute(
            "SELECT name, response FROM command_id WHERE id = ?", (command_id,)
        ).fetchone()
        if row is None:
            return None
        return str(row[0]), None if row[1] is None else str(row[1])

    def claim_command(
        self, command_id: str, name: str, at_ms: int, forget_before_ms: int | None
    ) -> tuple[str, str | None] | None:
        """Remember that the command ``command_id`` is about to run (committed before it
        runs, so that it runs at most once even across a crash); None when it is new, else
        ``(name, first response JSON or None)``: None when it never finished (the process
        ended while it ran). Ids older than ``forget_before_ms`` (UTC ms; None: no age
        limit, the clock being untrusted) and beyond the newest :data:`COMMANDS_KEPT` are
        forgotten in the same transaction."""
        db = self._db
        seen = self.command_seen(command_id)
        if seen is not None:
            return seen
        db.execute("BEGIN IMMEDIATE")
        try:
            if forget_before_ms is not None:
                db.execute("DELETE FROM command_id WHERE at_ms < ?", (forget_before_ms,))
            db.execute(
                "INSERT INTO command_id(id, name, at_ms) VALUES (?, ?, ?)",
                (command_id, name, at_ms),
            )
            if self._claims % 1000 == 0:
                db.execute(
                    "DELETE FROM command_id WHERE id IN (SELECT id FROM command_id "
                    "ORDER BY at_ms DESC LIMIT -1 OFFSET ?)",
                    (COMMANDS_KEPT,),
                )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._claims += 1
        return None

    def finish_command(self, command_id: str, response: str) -> None:
        """Keep the first response of a claimed command (:meth:`claim_command`)."""
        self._db.execute("UPDATE command_id SET response = ? WHERE id = ?", (response, command_id))

    def ack(self, seqs: Iterable[int]) -> None:
        """Delete acknowledged rows (one transaction). Unknown seqs are ignored."""
        ids = list(seqs)
        if not ids:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = self._delete_acked(ids)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._count = max(0, self._count - deleted)

    def _delete_acked(self, ids: Sequence[int]) -> int:
        """Inside the caller's transaction: delete these seqs; return how many existed."""
        deleted = 0
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            deleted += self._db.execute(
                f"DELETE FROM outbox WHERE seq IN ({marks})", chunk
            ).rowcount
        return deleted

    def stats(self) -> BufferStats:
        """Current counters (cheap: one indexed query each)."""
        db = self._db
        dropped = int(db.execute("SELECT value FROM counters WHERE name='dropped'").fetchone()[0])
        row = None
        if db.execute("SELECT 1 FROM sqlite_master WHERE name='sqlite_sequence'").fetchone():
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        return BufferStats(self._count, dropped, int(row[0]) if row else 0)

    def close(self) -> None:
        """Report pending drops, checkpoint the WAL and close the file."""
        self.report_drops()
        if self.memory:
            self._db.close()
            return
        if self._checkpointer is not None:
            self._checkpointer.close()
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError as exc:
            log.warning("checkpoint of %s failed on close: %s", self.path, exc)
        self._db.close()


P = ParamSpec("P")
T = TypeVar("T")


def open_buffer(
    path: Path,
    max_messages: int = 200_000,
    synchronous: str = "normal",
    max_bytes: int | None = None,
    min_free: int | None = None,
) -> tuple[Buffer, str | None]:
    """Open the buffer; a corrupt or foreign file is moved aside (renamed with a UTC time
    stamp, never deleted, its WAL and shared-memory files with it) and a new buffer is
    started. Returns the buffer and, after such a move, a notice for people and the
    platform.

    Raises:
        BufferError: the filesystem cannot be used (full, read-only, permissions).
    """
    try:
        return Buffer(path, max_messages, synchronous, max_bytes, min_free), None
    except CorruptBuffer as exc:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{path}{suffix}")
                if src.exists():
                    os.replace(src, f"{moved}{suffix}")
        except OSError as err:
            raise BufferError(
                f"buffer {path} is unusable ({exc.__cause__ or exc}) and cannot be moved "
                f"aside ({err.strerror}): move it away by hand and start again"
            ) from err
        cause = str(exc.__cause__ or exc)
        new = Buffer(path, max_messages, synchronous, max_bytes, min_free)
        first = f" at seq {new.next_seq}" if new.next_seq > 1 else ""
        notice = (
            f"buffer {path} was unusable ({cause}); moved aside to {moved} and a new "
            f"buffer started{first}. Its unsent readings, if any, can be read from that "
            "file with sqlite3."
        )
        log.error("%s", notice)
        return new, notice


def memory_buffer(path: Path, max_messages: int, max_bytes: int | None) -> Buffer:
    """An in-memory stand-in for the buffer at ``path`` when its filesystem cannot be
    written (read-only, full): capped at :data:`MEMORY_MAX_BYTES`, seqs continuing after
    the last seq the file handed out (read without writing), so that they stay below the
    reservation in ``seq.reserved`` that any later start begins at."""
    high = disk_high_water(path)
    reserved = read_reservation(path)
    start = high + 1 if high is not None else max(reserved, 1)
    cap = min(max_bytes or MEMORY_MAX_BYTES, MEMORY_MAX_BYTES)
    return Buffer(path, max_messages, max_bytes=cap, memory=True, start_seq=start)


EXIT_WAIT_S = 10.0
"""Longest wait at interpreter exit for a buffer call under way (see AsyncBuffer)."""

_Job = tuple[Callable[..., object], tuple[object, ...], "asyncio.Future[object]"]


def _settle(fut: asyncio.Future[object], result: object, exc: BaseException | None) -> None:
    if fut.cancelled():  # the caller stopped waiting; the call itself ran to its end
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """The buffer's thread: run each call, hand its outcome to the caller's loop."""
    while (job := jobs.get()) is not None:
        fn, args, fut = job
        loop = fut.get_loop()
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the caller, as an executor does
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            continue
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, fut, result, None)
        del job, fn, args, fut, result


def _finish(jobs: queue.SimpleQueue[_Job | None], thread: threading.Thread) -> None:
    """Stop the buffer's thread after the calls handed to it; at interpreter exit without
    :meth:`AsyncBuffer.close` (a crash of the loop) the call under way, a commit, ends
    rather than being cut off (at most :data:`EXIT_WAIT_S`), as a thread pool's would."""
    jobs.put(None)
    if thread is not threading.current_thread():
        thread.join(EXIT_WAIT_S)


class AsyncBuffer:
    """Runs a :class:`Buffer` on its own thread and exposes coroutine methods.

    The calls run one at a time, in the order made, on one thread named ``buffer``. It is
    a queue and a thread rather than ``loop.run_in_executor``: a commit is handed over at
    least every few milliseconds of a polling cycle, and the executor's futures cost the
    event loop 60 µs per call against 38 µs for a future settled by
    ``call_soon_threadsafe`` (x86-64 guest of ``docs/benchmarks.md``, Python 3.11.7).
    """

    def __init__(self, buffer: Buffer) -> None:
        self.sync = buffer
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=_work, args=(self._jobs,), name="buffer")
        self._thread.daemon = True
        self._thread.start()
        self._finish = weakref.finalize(self, _finish, self._jobs, self._thread)
        """Run at close, when this object is collected, or at interpreter exit."""

    async def _run(self, fn: Callable[..., object], *args: object) -> object:
        if not self._finish.alive:
            raise RuntimeError("the buffer is closed")
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, args, fut))
        return await fut

    async def append_many(
        self,
        items: Sequence[Item],
        handed_upto: int = 0,
        state: Mapping[tuple[str, str], int] | None = None,
        alarms: Mapping[str, str] | None = None,
        restamp_offset: int | None = None,
        acked: Sequence[int] = (),
    ) -> list[int]:
        """See :meth:`Buffer.append_many`."""
        return await self._run(  # type: ignore[return-value]
            self.sync.append_many, items, handed_upto, state, alarms, restamp_offset, acked
        )

    async def fetch(self, after_seq: int, limit: int, prio_only: bool = False) -> list[Row]:
        """See :meth:`Buffer.fetch`."""
        return await self._run(self.sync.fetch, after_seq, limit, prio_only)  # type: ignore[return-value]

    async def ack(self, seqs: Sequence[int]) -> None:
        """See :meth:`Buffer.ack`."""
        await self._run(self.sync.ack, seqs)

    async def command_seen(self, command_id: str) -> tuple[str, str | None] | None:
        """See :meth:`Buffer.command_seen`."""
        return await self._run(self.sync.command_seen, command_id)  # type: ignore[return-value]

    async def claim_command(
        self, command_id: str, name: str, at_ms: int, forget_before_ms: int | None
    ) -> tuple[str, str | None] | None:
        """See :meth:`Buffer.claim_command`."""
        return await self._run(  # type: ignore[return-value]
            self.sync.claim_command, command_id, name, at_ms, forget_before_ms
        )

    async def finish_command(self, command_id: str, response: str) -> None:
        """See :meth:`Buffer.finish_command`."""
        await self._run(self.sync.finish_command, command_id, response)

    async def set_retained_topics(self, topics: Iterable[str]) -> None:
        """See :meth:`Buffer.set_retained_topics`."""
        await self._run(self.sync.set_retained_topics, list(topics))

    async def flush_drop_reports(self) -> list[tuple[int, int, int]]:
        """Report the drops not reported yet, now (on the buffer's thread), and return
        every unreported drop block."""

        def flush() -> list[tuple[int, int, int]]:
            self.sync.report_drops()
            return self.sync.take_drop_reports()

        return await self._run(flush)  # type: ignore[return-value]

    async def switch_to(self, make: Callable[[], Buffer]) -> int:
        """Open a buffer with ``make`` and move everything from the current (in-memory)
        buffer into it, on the buffer's thread, between two other operations; from then on
        every method uses the new buffer. Returns the number of rows moved.

        Raises:
            BufferError: the new buffer cannot be opened.
            sqlite3.Error: the move failed; the current buffer is kept unchanged.
        """

        def switch() -> int:
            new = make()
            try:
                moved = new.import_from(self.sync)
            except BaseException:
                new.close()
                raise
            old, self.sync = self.sync, new
            old.close()
            return moved

        return await self._run(switch)  # type: ignore[return-value]

    async def stats(self) -> BufferStats:
        """See :meth:`Buffer.stats`."""
        return await self._run(self.sync.stats)  # type: ignore[return-value]

    async def close(self) -> None:
        """Close the database, then the thread."""
        await self._run(self.sync.close)
        self._finish()
