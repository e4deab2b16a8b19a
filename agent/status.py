"""The state file behind ``edge-agent status``: what the running daemon is doing, read
without the broker.

The daemon writes a snapshot (JSON, :data:`FORMAT`) once a second into its runtime
directory (``$RUNTIME_DIRECTORY``, which systemd's ``RuntimeDirectory=edge-agent`` makes
``/run/edge-agent``, a tmpfs; else ``/run/edge-agent`` where it may write), as
``status-{key}.json`` (``key`` names the state_dir, so agents with different state
directories never share a file). Without a runtime directory it falls back to
``{state_dir}/status.json``, on the SD card: written only when something besides the time
changed, at most every :data:`SLOW_EVERY_S` and at least every :data:`HEARTBEAT_S`.
Each write is atomic (a new temporary file, never through a link, renamed over the old
one: :func:`agent.buffer.write_replace`), mode 0640: readable by the service's group.

This module holds the pure parts: the snapshot's sections from plain facts, reading and
judging a snapshot (:func:`view`: running or not, healthy or degraded and why) and the
text a technician reads (:func:`render_text`). :mod:`agent.status_writer` collects the
facts in the daemon; :mod:`agent.metrics` renders the Prometheus text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import click

from agent.buffer import StateDirError, open_nofollow
from agent.clock import mono_ms
from agent.contract.telemetry import fill, template
from agent.readings import iso_ms
from drivers.base import GOOD, PointResult

FORMAT = 1
"""Version of the snapshot's layout (``format``)."""
EVERY_S = 1.0
"""How often the snapshot is written into a runtime directory (RAM)."""
SLOW_EVERY_S = 5.0
"""In the state_dir (an SD card): written at most this often, and only on a change."""
HEARTBEAT_S = 60.0
"""In the state_dir: written at least this often, changed or not."""
STALE_S = 5.0
"""A snapshot in a runtime directory older than this: the agent is not running (hung)."""
MAX_FILE_BYTES = 4 * 1024 * 1024
"""A state file is read up to this size (a larger one is not the agent's)."""
FILE_MODE = 0o640
RUNTIME_FALLBACK = Path("/run/edge-agent")
HEALTHY, DEGRADED, NOT_RUNNING = 0, 1, 2
"""Exit codes of ``edge-agent status``."""
STATES = {HEALTHY: "healthy", DEGRADED: "degraded", NOT_RUNNING: "not running"}


def runtime_dirs() -> list[Path]:
    """Where a runtime directory may be: ``$RUNTIME_DIRECTORY`` (its first entry), then
    :data:`RUNTIME_FALLBACK`."""
    env = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    out = [Path(env)] if env else []
    if RUNTIME_FALLBACK not in out:
        out.append(RUNTIME_FALLBACK)
    return out


def runtime_name(state_dir: Path) -> str:
    """The state file's name in a runtime directory: ``status-{16 hex}.json``, from the
    absolute state_dir."""
    key = hashlib.sha1(str(Path(state_dir).absolute()).encode()).hexdigest()[:16]
    return f"status-{key}.json"


def candidates(state_dir: Path) -> list[Path]:
    """Every place the agent with this state_dir may write its state file, in order."""
    return [d / runtime_name(state_dir) for d in runtime_dirs()] + [Path(state_dir) / "status.json"]


def choose_location(state_dir: Path) -> tuple[Path, bool]:
    """Where the daemon writes: ``(path, in_ram)``, the first runtime directory it can
    write to, else the state_dir."""
    for d in runtime_dirs():
        if d.is_dir() and os.access(d, os.W_OK | os.X_OK):
            return d / runtime_name(state_dir), True
    return Path(state_dir) / "status.json", False


def find_state_file(state_dir: Path) -> Path | None:
    """The newest existing state file of the agent with this state_dir, or None."""
    found = []
    for p in candidates(state_dir):
        with contextlib.suppress(OSError):
            found.append((p.stat().st_mtime, p))
    return max(found)[1] if found else None


def read_state_file(path: Path) -> dict[str, Any]:
    """The snapshot in ``path``.

    Raises:
        OSError: it cannot be read (missing, no permission).
        ValueError: it is not a snapshot of this format (too large, not JSON, a link or
            not a regular file, another ``format``).
    """
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except StateDirError as exc:
        raise ValueError(str(exc)) from None
    try:
        data = os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not a state file")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not an edge-agent state file of format {FORMAT}")
    return doc


# -- the snapshot's sections, from plain facts (the daemon's side) -------------------------


def uplink_section(
    *,
    connected: bool,
    since_ms: int | None,
    host: str,
    port: int,
    tls: bool,
    tls_verify: bool | None,
    client_id: str,
    reconnects: int,
    problem: str | None,
    published: int,
    acked: int,
    publish_rate: float,
) -> dict[str, Any]:
    """``uplink``: the MQTT connection (``since_ms``: when it went up or down, UTC ms)."""
    return {
        "connected": connected,
        "since": since_ms,
        "broker": f"{host}:{port}",
        "tls": tls,
        "tls_verify": tls_verify,
        "client_id": client_id,
        "reconnects": reconnects,
        "problem": None if connected else problem,
        "published": published,
        "acked": acked,
        "publish_rate": publish_rate,
    }


def buffer_section(
    *,
    memory: bool,
    error: str | None,
    path: str,
    pending: int,
    oldest_ms: int | None,
    dropped: int,
    last_seq: int,
    size_bytes: int | None,
    disk_free_bytes: int | None,
    write_bytes_per_hour: int | None,
    waiting: int | None,
) -> dict[str, Any]:
    """``buffer``: where it is and what it holds (``oldest_ms``: the time stamp of the
    oldest message not yet acknowledged, UTC ms)."""
    return {
        "medium": "memory" if memory else "disk",
        "error": error,
        "path": path,
        "pending": pending,
        "oldest": oldest_ms,
        "dropped": dropped,
        "last_seq": last_seq,
        "bytes": size_bytes,
        "disk_free_bytes": disk_free_bytes,
        "write_bytes_per_hour": write_bytes_per_hour,
        "waiting": waiting,
    }


def device_section(
    *,
    device: str,
    driver: str,
    bus: str,
    online: bool | None,
    reason: str | None,
    error: str | None,
    since_ms: int | None,
    last_poll_ms: int | None,
    last_good_ms: int | None,
    last_good_age_s: float | None,
    points: RawJson,
    poll_errors: int,
    errors_last_hour: int,
    overruns: int,
) -> dict[str, Any]:
    """One device: availability (``online`` None: not known yet), its last poll's values
    with quality, and its poll statistics (:class:`agent.metrics.PollStats`). ``points``
    is already JSON (:class:`PointsText`): at 10,000 points, a dict per point every second
    would cost the running agent about 3 MB of memory at its peak."""
    return {
        "id": device,
        "driver": driver,
        "bus": bus,
        "state": "unknown" if online is None else "online" if online else "offline",
        "reason": reason,
        "error": error,
        "since": since_ms,
        "last_poll": last_poll_ms,
        "last_good": last_good_ms,
        "last_good_age_s": last_good_age_s,
        "poll_errors": poll_errors,
        "errors_last_hour": errors_last_hour,
        "overruns": overruns,
        "points": points,
    }


def alarm_item(
    key: str, state: str, severity: str, value: float | None, unit: str | None, raised: int | None
) -> dict[str, Any]:
    """One active alarm (``raised``: UTC ms)."""
    return {
        "alarm": key,
        "state": state,
        "severity": severity,
        "value": value,
        "unit": unit,
        "raised": raised,
    }


def outputs_section(available: bool, error: str, states: Mapping[str, bool]) -> dict[str, Any]:
    """The GPIO outputs: whether they can be driven and each one's state (True: on)."""
    return {"available": available, "error": error or None, "states": dict(states)}


@dataclass(frozen=True, slots=True)
class RawJson:
    """Text that is already JSON, put into a document as it is by :func:`dumps_raw`."""

    text: str


_POINT_JSON: dict[tuple[str, str | None], tuple[str, str]] = {}
"""(point name, unit) → the JSON around its value (built once per name and unit)."""
_QUALITY_JSON: dict[str, str] = {}


def _value_json(value: Any) -> str:
    """``value`` as :func:`json.dumps` writes it; a non-finite float as ``null`` (JSON has
    no token for it, RFC 8259 §6)."""
    kind = type(value)
    if kind is float:
        return float.__repr__(value) if math.isfinite(value) else "null"
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return json.dumps(value, allow_nan=False)


def points_json(results: Iterable[PointResult], units: Mapping[str, str | None]) -> RawJson:
    """``{"NAME":{"value":V,"unit":U,"quality":Q},...}`` for the results of one poll, the
    text :func:`json.dumps` would make of those dicts (a later result of a name in place
    of an earlier one, as in a dict). Pure but for a cache of the constant parts."""
    parts: dict[str, str] = {}
    isfinite = math.isfinite
    for r in results:
        name, value, quality = r.point, r.value, r.quality
        unit = units.get(name)
        around = _POINT_JSON.get((name, unit)) or _around(name, unit)
        q = _QUALITY_JSON.get(quality) or _quality_json(quality)
        if type(value) is float and isfinite(value):  # _value_json, the common case first
            text = float.__repr__(value)
        else:
            text = _value_json(value)
        parts[name] = f"{around[0]}{text}{around[1]}{q}}}"
    return RawJson("{" + ",".join(parts.values()) + "}")


class PointsText:
    """The state file's ``points`` of one device: :func:`points_json` of its last poll.

    A poll whose value texts were made (:func:`agent.contract.telemetry.value_texts`: every
    reading good, every value a finite number) is joined from the text around each value
    of the device's points, learnt once for its point names, without Python code per point;
    any other poll goes point by point.

    Args:
        units: point name → unit of the device's points.
    """

    def __init__(self, units: Mapping[str, str | None]) -> None:
        self.units = units
        self._names: tuple[str, ...] = ()
        self._template: list[str] = []
        self._unique = True

    def render(self, results: Sequence[PointResult], texts: Sequence[str] | None) -> RawJson:
        """The ``points`` text of ``results`` (``texts``: the JSON of their values, or None)."""
        if texts is None:
            return points_json(results, self.units)
        names = tuple(map(_NAME, results))
        if names != self._names:
            self._learn(names)
        if not self._unique:  # a name twice: the later one counts, as in a dict
            return points_json(results, self.units)
        return RawJson("{" + fill(self._template, texts) + "}")

    def _learn(self, names: tuple[str, ...]) -> None:
        self._names, self._unique = names, len(set(names)) == len(names)
        arounds = [_around(name, self.units.get(name)) for name in names]
        good = _quality_json(GOOD) + "}"
        after = [_GOOD_AFTER.setdefault(a[1] + good, a[1] + good) for a in arounds]
        self._template = template([a[0] for a in arounds], after)


_NAME = attrgetter("point")
_GOOD_AFTER: dict[str, str] = {}
"""The text after a good value, one string per unit for every device."""


def _around(name: str, unit: str | None) -> tuple[str, str]:
    around = _POINT_JSON.get((name, unit))
    if around is None:
        around = _POINT_JSON[(name, unit)] = (
            f'{json.dumps(name)}:{{"value":',
            f',"unit":{json.dumps(unit)},"quality":',
        )
    return around


def _quality_json(quality: str) -> str:
    q = _QUALITY_JSON.get(quality)
    if q is None:
        q = _QUALITY_JSON[quality] = json.dumps(quality)
    return q


def dumps_raw(doc: Any) -> str:
    """``doc`` as compact JSON (``json.dumps`` with ``separators=(",", ":")`` and
    ``allow_nan=False``), :class:`RawJson` parts as they are: :func:`raw_chunks` joined.

    Raises:
        ValueError: a non-finite float outside a :class:`RawJson` part.
        TypeError: a value JSON has no form for.
    """
    return "".join(raw_chunks(doc))


_RAW_TOKEN = "\x00" + secrets.token_hex(16) + "\x00"
"""What stands for a :class:`RawJson` part while the C encoder writes the rest of a
document: a NUL never leaves the encoder unescaped, and the random part is known to this
process alone, so no string of a document can write the same text."""
_RAW_MARK = json.dumps(_RAW_TOKEN)


def raw_chunks(doc: Any) -> list[str]:
    """The text of :func:`dumps_raw` in pieces, to be joined (or encoded and written) once:
    a document of 10,000 points is 600 kB, and each copy of it costs a fresh mapping. The
    document is written by one call of the C encoder, each :class:`RawJson` part as a mark
    (:data:`_RAW_TOKEN`, through the encoder's ``default``), and the text is cut at the
    marks, the parts going in between: no Python code per member of the document.

    Raises:
        ValueError: a non-finite float outside a :class:`RawJson` part.
        TypeError: a value JSON has no form for.
    """
    raws: list[str] = []

    def default(o: Any) -> str:
        if type(o) is RawJson:
            raws.append(o.text)
            return _RAW_TOKEN
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    text = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=default).encode(doc)
    if not raws:
        return [text]
    if type(doc) is RawJson:
        return raws
    pieces = text.split(_RAW_MARK)
    if len(pieces) != len(raws) + 1:  # (cannot be: see _RAW_TOKEN)
        raise ValueError("a string of the document holds the mark of a raw part")
    out = [pieces[0]]
    for raw, piece in zip(raws, pieces[1:], strict=True):
        out += (raw, piece)
    return out


def without_time(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot less what changes with time alone (to see whether anything else
    changed: the state_dir fallback writes only then)."""
    out = {k: v for k, v in doc.items() if k not in ("ts", "mono_ms")}
    out["devices"] = [
        {k: v for k, v in d.items() if k != "last_good_age_s"} for d in doc.get("devices", [])
    ]
    up = dict(doc.get("uplink", {}))
    up.pop("publish_rate", None)
    out["uplink"] = up
    system = dict(doc.get("system", {}))
    system.pop("rss_bytes", None)
    system.pop("soc_temp_c", None)
    out["system"] = system
    buf = dict(doc.get("buffer", {}))
    for k in ("disk_free_bytes", "bytes", "write_bytes_per_hour"):
        buf.pop(k, None)
    out["buffer"] = buf
    return out


# -- reading a snapshot (the command's side) -----------------------------------------------


def proc_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (field 22 of
    ``/proc/PID/stat``, proc(5)); None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def flock_holders(lock: Path, locks: Path = Path("/proc/locks")) -> set[int] | None:
    """The pids holding an ``flock(2)`` lock on the file ``lock`` (``/proc/locks``,
    proc(5): ``ID: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END``, matched on the
    inode); None when this cannot be seen (the file or /proc/locks cannot be read)."""
    try:
        ino = lock.stat().st_ino
        lines = locks.read_text().splitlines()
    except OSError:
        return None
    out = set()
    for line in lines:
        parts = line.split()
        if "->" in parts or "FLOCK" not in parts:
            continue  # a waiter, or a POSIX lock
        i = parts.index("FLOCK")
        try:
            pid, where = int(parts[i + 3]), parts[i + 4]
            if int(where.rsplit(":", 1)[1]) == ino:
                out.add(pid)
        except (ValueError, IndexError):
            continue
    return out


def not_running_reason(snap: Mapping[str, Any], now_mono_ms: int, boot: str) -> str | None:
    """Why the agent that wrote ``snap`` is not running, or None: it runs. Checked: the
    boot, the pid (and that it is the same process: its start time), the agent's lock in
    its state_dir held by that pid (where it can be seen), and the snapshot's age."""
    pid = snap.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "the state file names no process"
    if snap.get("boot_id") != boot:
        return "the state file is from an earlier boot"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone (the agent stopped without removing its state file)"
    except PermissionError:
        pass  # alive, another user's
    started, recorded = proc_start_ticks(pid), snap.get("proc_start")
    if started is not None and recorded is not None and started != recorded:
        return f"process {pid} is another program now (the agent stopped)"
    if snap.get("locked"):
        holders = flock_holders(Path(str(snap.get("state_dir", ""))) / "agent.lock")
        if holders is not None and pid not in holders:
            return f"process {pid} does not hold the agent's lock in {snap.get('state_dir')}"
    age = (now_mono_ms - int(snap.get("mono_ms", 0))) / 1000
    stale = float(snap.get("stale_after_s", STALE_S))
    if age > stale:
        return (
            f"its state file was last written {age:.0f} s ago (every "
            f"{snap.get('every_s', EVERY_S):g} s while it works): the agent is hung"
        )
    return None


def degraded_reasons(snap: Mapping[str, Any]) -> list[str]:
    """Why the running agent is degraded, one line each (empty: healthy)."""
    out = []
    up = snap.get("uplink", {})
    if not up.get("connected"):
        since = f" since {iso_ms(up['since'])}" if up.get("since") else " (never connected)"
        why = f": {up['problem']}" if up.get("problem") else ""
        out.append(f"uplink down{since} (broker {up.get('broker')}){why}")
    for d in snap.get("devices", []):
        if d.get("state") == "offline":
            since = f" since {iso_ms(d['since'])}" if d.get("since") else ""
            out.append(f"device {d.get('id')} offline{since}: {d.get('error') or d.get('reason')}")
    buf = snap.get("buffer", {})
    if buf.get("medium") == "memory":
        out.append(
            f"buffer in memory only: {buf.get('error')} (lost if the agent stops; the disk "
            "is tried again)"
        )
    elif buf.get("waiting") is not None:
        out.append(f"buffer cannot be written: {buf.get('error')}; {buf['waiting']} waiting")
    if not snap.get("clock", {}).get("synced"):
        out.append("clock not synchronised: time stamps are flagged unsynced")
    outs = snap.get("outputs")
    if outs and outs.get("states") and not outs.get("available"):
        out.append(f"GPIO outputs unavailable: {outs.get('error')}")
    return out


def view(
    snap: Mapping[str, Any] | None,
    path: Path | None,
    problem: str | None = None,
    now_mono_ms: int | None = None,
    boot: str | None = None,
) -> dict[str, Any]:
    """What ``edge-agent status`` says: the snapshot (or None with the ``problem`` that
    kept it from being read) with ``status``: ``code`` (0 healthy, 1 degraded, 2 not
    running), ``state`` and ``reasons``, ``file`` and ``age_s``; ages are brought up to
    now (``now_mono_ms``: ``CLOCK_BOOTTIME`` ms; ``boot``: this boot's id)."""
    from agent.clock import boot_id

    now = mono_ms() if now_mono_ms is None else now_mono_ms
    boot = boot_id() if boot is None else boot
    if snap is None:
        reasons = [problem or "no state file"]
        return {"status": _status(NOT_RUNNING, reasons), "file": str(path) if path else None}
    out = dict(snap)
    age = max(0.0, (now - int(snap.get("mono_ms", now))) / 1000)
    out["file"] = str(path) if path else None
    out["age_s"] = round(age, 3)
    dead = not_running_reason(snap, now, boot)
    if dead is not None:
        out["status"] = _status(NOT_RUNNING, [dead])
        return out
    out["devices"] = [
        {**d, "last_good_age_s": round(d["last_good_age_s"] + age, 3)}
        if isinstance(d.get("last_good_age_s"), int | float)
        else d
        for d in snap.get("devices", [])
    ]
    reasons = degraded_reasons(snap)
    out["status"] = _status(DEGRADED if reasons else HEALTHY, reasons)
    return out


def _status(code: int, reasons: list[str]) -> dict[str, Any]:
    return {"code": code, "state": STATES[code], "reasons": reasons}


def load_view(path: Path | None, state_dir: Path | None) -> dict[str, Any]:
    """:func:`view` of the state file at ``path``, or (None) the newest of the agent with
    ``state_dir``."""
    if path is None and state_dir is not None:
        path = find_state_file(state_dir)
        if path is None:
            where = ", ".join(str(p) for p in candidates(state_dir))
            return view(None, None, f"no state file (looked for {where}): the agent is stopped")
    assert path is not None
    try:
        snap = read_state_file(path)
    except FileNotFoundError:
        return view(None, path, f"no state file {path}: the agent is stopped")
    except (OSError, ValueError) as exc:
        return view(None, path, f"cannot read {path}: {exc}")
    return view(snap, path)


# -- the text a technician reads -----------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover (the loop always returns)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _age_of(ms: int | None, now_ms: int) -> float | None:
    return None if ms is None else (now_ms - ms) / 1000


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.6g}"
    return "-" if v is None else str(v)


def render_text(v: Mapping[str, Any], color: bool, now_ms: int | None = None) -> str:
    """The summary of a :func:`view` for people: the verdict and its reasons first, then
    uplink, buffer, clock, system, each device (driver, bus, availability, last good poll,
    errors in the last hour, the last values with their quality), alarms and outputs."""
    now = int(time.time() * 1000) if now_ms is None else now_ms

    def style(text: str, fg: str | None = None, bold: bool = False) -> str:
        return click.style(text, fg=fg, bold=bold) if color else text

    def good(ok: bool, text: str) -> str:
        return style(text, "green" if ok else "red")

    st = v["status"]
    code = st["code"]
    verdict = style(st["state"], {0: "green", 1: "yellow", 2: "red"}[code], bold=True)
    lines = []
    if "gateway" not in v:
        lines.append(f"edge-agent: {verdict}")
        lines += [f"  {r}" for r in st["reasons"]]
        return "\n".join(lines) + "\n"
    up_s = _ago(_age_of(v.get("started"), now))
    lines.append(
        f"edge-agent {v.get('version')} on {v.get('gateway')}: {verdict} "
        f"(pid {v.get('pid')}, up {up_s}, state file {v.get('file')}, "
        f"{_ago(v.get('age_s'))} old)"
    )
    lines += [style(f"  ! {r}", "red" if code == 2 else "yellow") for r in st["reasons"]]
    if code == NOT_RUNNING:
        lines.append("  (what follows is the last state written)")
    up = v.get("uplink", {})
    tls = "plain MQTT"
    if up.get("tls"):
        tls = "TLS, certificate verified" if up.get("tls_verify") else "TLS, NOT verified"
    state = (
        good(True, f"connected since {_ts(up.get('since'))}")
        if up.get("connected")
        else good(False, f"down since {_ts(up.get('since'))}")
    )
    lines.append(
        f"uplink   {state}, broker {up.get('broker')} ({tls}), client id "
        f"{up.get('client_id')}, {up.get('reconnects', 0)} reconnect(s), "
        f"{up.get('publish_rate', 0.0):.1f} msg/s ({up.get('published', 0)} published, "
        f"{up.get('acked', 0)} acknowledged)"
    )
    buf = v.get("buffer", {})
    medium = good(buf.get("medium") == "disk", str(buf.get("medium")))
    oldest = _age_of(buf.get("oldest"), now)
    rate = buf.get("write_bytes_per_hour")
    lines.append(
        f"buffer   {medium} ({buf.get('path')}): {buf.get('pending')} pending, oldest "
        f"unsent {_ago(oldest) if oldest is not None else '-'}, {buf.get('dropped')} "
        f"dropped, {_size(buf.get('bytes'))}, {_size(buf.get('disk_free_bytes'))} free, "
        f"writes {_size(rate) + '/h' if rate is not None else '? (first minute)'}"
    )
    if buf.get("error"):
        lines.append(f"         {style(str(buf['error']), 'red')}")
    clock = v.get("clock", {})
    synced = bool(clock.get("synced"))
    lines.append(
        f"clock    {good(synced, 'synced' if synced else 'NOT synced')} "
        f"(source {clock.get('source')})"
    )
    system = v.get("system", {})
    parts = [f"RSS {_size(system.get('rss_bytes'))}"]
    if system.get("soc_temp_c") is not None:
        parts.append(f"SoC {system['soc_temp_c']:.1f} °C")
    throttled = system.get("throttled")
    if throttled is not None:
        from agent.metrics import throttle_conditions

        cond = throttle_conditions(int(throttled))
        now_c = ", ".join(cond["now"]) or "none now"
        ever = ", ".join(cond["since_boot"]) or "none"
        parts.append(good(not cond["now"], f"throttling: {now_c} (since boot: {ever})"))
    lines.append("system   " + ", ".join(parts))
    devices = v.get("devices", [])
    lines.append(f"devices  {len(devices)}")
    for d in devices:
        state_text = d.get("state", "unknown")
        colour = {"online": "green", "offline": "red"}.get(state_text, "yellow")
        lines.append(
            f"  {style(str(d.get('id')), bold=True)}  {d.get('driver')} {d.get('bus')}  "
            f"{style(state_text, colour)}, last good poll {_ago(d.get('last_good_age_s'))}"
            f"{' ago' if d.get('last_good_age_s') is not None else ''}, "
            f"{d.get('errors_last_hour', 0)} error(s) in the last hour, "
            f"{d.get('overruns', 0)} overrun(s)"
        )
        if state_text == "offline" and d.get("error"):
            lines.append(f"      {style(str(d['error']), 'red')}")
        cells = []
        for name, p in d.get("points", {}).items():
            unit = f" {p['unit']}" if p.get("unit") else ""
            q = p.get("quality")
            text = f"{name}={_value(p.get('value'))}{unit}" if q == "good" else f"{name}: {q}"
            cells.append(text if q == "good" else style(text, "yellow"))
        if cells:
            lines.append("      " + "  ".join(cells))
    alarms = v.get("alarms", [])
    if not alarms:
        lines.append(f"alarms   {good(True, 'none active')}")
    else:
        lines.append(f"alarms   {style(f'{len(alarms)} active', 'red', bold=True)}")
        for a in alarms:
            unit = f" {a['unit']}" if a.get("unit") else ""
            lines.append(
                f"  {a.get('alarm')} {a.get('state')} ({a.get('severity')}), value "
                f"{_value(a.get('value'))}{unit}, raised {_ts(a.get('raised'))}"
            )
    outs = v.get("outputs") or {}
    if outs.get("states"):
        cells = [f"{n} {'on' if on else 'off'}" for n, on in outs["states"].items()]
        avail = (
            "" if outs.get("available") else style(f" (unavailable: {outs.get('error')})", "red")
        )
        lines.append(f"outputs  {', '.join(cells)}{avail}")
    else:
        lines.append("outputs  none")
    return "\n".join(lines) + "\n"


def _ts(ms: int | None) -> str:
    return "-" if ms is None else iso_ms(int(ms))


def reasons_text(reasons: Iterable[str]) -> str:
    """The reasons, one per line (for stderr)."""
    return "".join(f"{r}\n" for r in reasons)
