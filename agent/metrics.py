"""Figures about the running agent and its machine: per-device poll statistics, rates,
memory, free disk and, on a Raspberry Pi, the SoC temperature and throttling.

The trackers are pure apart from their own state (callers pass the times); the probes
read ``/proc``, ``/sys`` and ``vcgencmd`` and are run off the event loop (a slow or hung
filesystem must never hold the loop): :class:`SystemProbe` runs them on a thread of its
own, ``vcgencmd`` at most every :data:`THROTTLE_EVERY_S` with a time limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.base import GOOD, QUALITY, PointResult

HOUR_S = 3600.0
BUCKET_S = 60.0
"""Errors in the last hour are counted in buckets of this many seconds (bounded memory:
:data:`HOUR_S` / :data:`BUCKET_S` buckets per device)."""
RATE_WINDOW_S = 60.0
"""The publish rate is the average over this many seconds."""
THROTTLE_EVERY_S = 30.0
"""``vcgencmd get_throttled`` runs at most this often."""
PROBE_EVERY_S = 5.0
"""The system figures (RSS, free disk, buffer files, SoC temperature) are measured at most
this often: they move slowly, and a measurement each second was a tenth of the agent's CPU
at 10 devices × 10 registers (``docs/benchmarks.md``)."""
VCGENCMD_TIMEOUT_S = 2.0
"""Longest wait for ``vcgencmd`` (it talks to the VideoCore firmware over a mailbox)."""
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")
"""The SoC temperature on a Raspberry Pi (millidegrees Celsius; Linux thermal sysfs ABI,
``Documentation/ABI/testing/sysfs-class-thermal``: ``temp`` in m°C)."""
THROTTLE_BITS = {
    0: ("under_voltage", "now"),
    1: ("arm_frequency_capped", "now"),
    2: ("throttled", "now"),
    3: ("soft_temperature_limit", "now"),
    16: ("under_voltage", "since_boot"),
    17: ("arm_frequency_capped", "since_boot"),
    18: ("throttled", "since_boot"),
    19: ("soft_temperature_limit", "since_boot"),
}
"""The bits of ``vcgencmd get_throttled`` (Raspberry Pi documentation, "vcgencmd",
section ``get_throttled``): bits 0-3 the conditions now, bits 16-19 since the boot."""


ERROR_QUALITIES = frozenset(
    {"timeout", "no_connection", "frame_error", "exception", "decode_error"}
)
"""A poll with a reading of one of these qualities is a poll error: a point could not be
read (a value the device reports as NaN or out of range, or a point it does not support,
is a reading, not an error of the poll)."""


def _failed(results: Sequence[PointResult]) -> bool:
    return not ERROR_QUALITIES.isdisjoint(map(QUALITY, results))


@dataclass(slots=True)
class DevicePolls:
    """What one device's polls said: the last values, when a poll last read a good value,
    and how many polls were poll errors (:data:`ERROR_QUALITIES`; since the start, and per
    minute for the last hour)."""

    last_poll_ms: int | None = None
    last_good_ms: int | None = None
    last_good_mono: float | None = None
    poll_errors: int = 0
    polls: int = 0
    _buckets: collections.deque[list[float]] = field(
        default_factory=lambda: collections.deque(maxlen=int(HOUR_S / BUCKET_S) + 1)
    )

    def errors_last_hour(self, now: float) -> int:
        """Poll errors in the last hour (to the minute)."""
        return int(sum(n for start, n in self._buckets if now - start < HOUR_S))


class PollStats:
    """Per device, from every poll (or reading of a streaming sensor) of the agent.

    Args:
        devices: the device ids (a poll of another id is ignored: bounded memory).
    """

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = {d: DevicePolls() for d in devices}

    def on_poll(self, device: str, ts_ms: int, results: Sequence[PointResult], now: float) -> None:
        """One poll of ``device`` stamped ``ts_ms`` (UTC ms), at monotonic ``now`` (s)."""
        d = self.devices.get(device)
        if d is None:
            return
        d.polls += 1
        d.last_poll_ms = ts_ms
        if any(r.quality == GOOD for r in results):
            d.last_good_ms = ts_ms
            d.last_good_mono = now
        if _failed(results):
            d.poll_errors += 1
            if d._buckets and now - d._buckets[-1][0] < BUCKET_S:
                d._buckets[-1][1] += 1
            else:
                d._buckets.append([now, 1])

    def last_good_age(self, device: str, now: float) -> float | None:
        """Seconds since ``device`` last gave a good reading (None: never since the start)."""
        d = self.devices[device]
        return None if d.last_good_mono is None else round(max(0.0, now - d.last_good_mono), 3)


class RateMeter:
    """Events per second over the last :data:`RATE_WINDOW_S`, from a growing counter
    sampled now and then (one sample kept per second at most: bounded memory)."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=int(window) + 2
        )

    def sample(self, now: float, count: int) -> None:
        """The counter's value at monotonic ``now`` (s)."""
        if self._samples and now - self._samples[-1][0] < 1.0:
            return
        self._samples.append((now, count))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self, now: float, count: int) -> float:
        """The average rate (per second) from the oldest sample within the window to
        ``count`` at ``now``; 0.0 without an earlier sample."""
        if not self._samples:
            return 0.0
        t0, c0 = self._samples[0]
        span = now - t0
        return 0.0 if span <= 0 else round(max(0, count - c0) / span, 3)


def parse_throttled(text: str) -> int | None:
    """The bit field in ``vcgencmd get_throttled``'s answer (``throttled=0x50005``), or
    None when the text is not such an answer."""
    key, _, value = text.strip().partition("=")
    if key != "throttled":
        return None
    try:
        return int(value, 16)
    except ValueError:
        return None


def throttle_conditions(flags: int) -> dict[str, list[str]]:
    """``{"now": [...], "since_boot": [...]}``: the conditions of :data:`THROTTLE_BITS`
    set in ``flags``, in bit order."""
    out: dict[str, list[str]] = {"now": [], "since_boot": []}
    for bit, (name, when) in THROTTLE_BITS.items():
        if flags >> bit & 1:
            out[when].append(name)
    return out


def rss_bytes(path: Path = Path("/proc/self/status")) -> int | None:
    """This process's resident set size (``VmRSS``, proc(5)), bytes; None if unknown."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def disk_free(path: Path) -> int | None:
    """Bytes free for an unprivileged writer on the filesystem of ``path``
    (``statvfs(3)``: ``f_bavail × f_frsize``); None if it cannot be asked."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def soc_temp_c(path: Path = THERMAL_ZONE) -> float | None:
    """The SoC temperature, °C (None without a thermal zone 0)."""
    try:
        return round(int(path.read_text().strip()) / 1000, 1)
    except (OSError, ValueError):
        return None


def read_throttled(timeout: float = VCGENCMD_TIMEOUT_S) -> int | None:
    """Run ``vcgencmd get_throttled`` (blocking, at most ``timeout`` s); None where there
    is no ``vcgencmd`` or it does not answer."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "get_throttled"], capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode:
        return None
    return parse_throttled(done.stdout[:200].decode("ascii", errors="replace"))


def file_bytes(*paths: Path) -> int | None:
    """The total size of the files that exist (e.g. a database and its WAL); None if none."""
    sizes = []
    for p in paths:
        with contextlib.suppress(OSError):
            sizes.append(p.stat().st_size)
    return sum(sizes) if sizes else None


@dataclass(frozen=True, slots=True)
class SystemSample:
    """What :class:`SystemProbe` last measured (None: not known here)."""

    rss_bytes: int | None = None
    disk_free_bytes: int | None = None
    buffer_bytes: int | None = None
    soc_temp_c: float | None = None
    throttled: int | None = None


class SystemProbe:
    """Measures :class:`SystemSample` on a thread of its own, one measurement at a time:
    :meth:`refresh` starts one unless one is still running (a disk that stopped answering
    holds the thread, never the loop) and :attr:`last` is the latest result.

    Args:
        state_dir: the filesystem whose free space counts (the buffer's).
        buffer_files: the buffer's files, whose sizes add up to ``buffer_bytes``.
        vcgencmd: whether to ask ``vcgencmd`` (every :data:`THROTTLE_EVERY_S`).
    """

    def __init__(
        self, state_dir: Path, buffer_files: Sequence[Path], vcgencmd: bool = True
    ) -> None:
        self.state_dir = state_dir
        self.buffer_files = list(buffer_files)
        self.vcgencmd = vcgencmd and shutil.which("vcgencmd") is not None
        self.last = SystemSample()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        self._running: asyncio.Future[SystemSample] | None = None
        self._throttle_at = -1e9
        self._started_at = -1e9

    def _measure(self, ask_vcgencmd: bool, throttled: int | None) -> SystemSample:
        return SystemSample(
            rss_bytes=rss_bytes(),
            disk_free_bytes=disk_free(self.state_dir),
            buffer_bytes=file_bytes(*self.buffer_files),
            soc_temp_c=soc_temp_c(),
            throttled=read_throttled() if ask_vcgencmd else throttled,
        )

    def refresh(self, now: float) -> None:
        """Start a measurement (at monotonic ``now``) unless one is under way or the last
        one started less than :data:`PROBE_EVERY_S` ago."""
        if self._running is not None and not self._running.done():
            return
        if now - self._started_at < PROBE_EVERY_S:
            return
        self._started_at = now
        ask = self.vcgencmd and now - self._throttle_at >= THROTTLE_EVERY_S
        if ask:
            self._throttle_at = now
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._measure, ask, self.last.throttled)
        fut.add_done_callback(self._done)
        self._running = fut

    def _done(self, fut: asyncio.Future[SystemSample]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.last = fut.result()

    def close(self) -> None:
        """Let the thread go (a measurement under way is not waited for)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float) and math.isfinite(v):  # (NaN, ±Inf: no sample)
        return float(v)
    return None


class _Families:
    """The metric families of one :func:`prometheus_text` call (a prometheus_client
    collector: ``collect`` yields them)."""

    def __init__(self) -> None:
        self.families: dict[str, Any] = {}

    def add(
        self,
        kind: str,
        name: str,
        doc: str,
        value: Any,
        labels: Mapping[str, str] | None = None,
        unit: str = "",
    ) -> None:
        """A sample of ``edge_agent_{name}`` (``kind``: ``gauge`` or ``counter``); a
        ``value`` that is not a number (None: not known) gives no sample."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        full = f"edge_agent_{name}"
        fam = self.families.get(full)
        names = list(labels or {})
        if fam is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(full, doc, labels=names, unit=unit)
            self.families[full] = fam
        number = _num(value)
        if number is not None:
            fam.add_metric([str(v) for v in (labels or {}).values()], number)

    def collect(self) -> Iterator[Any]:
        yield from self.families.values()


def prometheus_text(v: Mapping[str, Any]) -> bytes:
    """The figures of a status view (:func:`agent.status.view`) in the Prometheus text
    exposition format 0.0.4 ("Exposition formats", prometheus.io: ``# HELP``/``# TYPE``
    lines, label values escaped), written by ``prometheus_client``; every metric is named
    ``edge_agent_*``. ``edge_agent_up`` is 0 when the agent is not running (the other
    figures are then left out)."""
    from prometheus_client import CollectorRegistry, generate_latest

    f = _Families()
    st = v["status"]
    running = st["code"] != 2
    f.add("gauge", "up", "1 while the agent runs and writes its state file", running)
    f.add(
        "gauge",
        "status",
        "edge-agent status exit code: 0 healthy, 1 degraded, 2 not running",
        st["code"],
    )
    f.add("gauge", "state_file_age_seconds", "age of the state file read", v.get("age_s"))
    if not running or "gateway" not in v:
        return _generate(f, CollectorRegistry, generate_latest)
    f.add(
        "gauge",
        "info",
        "the running agent (always 1)",
        1,
        {"gateway": str(v.get("gateway")), "version": str(v.get("version"))},
    )
    f.add("gauge", "start_time_seconds", "when the agent started (Unix time)", _s(v.get("started")))
    up = v.get("uplink", {})
    f.add("gauge", "uplink_connected", "1 while connected to the broker", bool(up.get("connected")))
    f.add(
        "counter",
        "uplink_reconnects",
        "connections to the broker after the first",
        up.get("reconnects"),
    )
    f.add("counter", "messages_published", "messages handed to the broker", up.get("published"))
    f.add("counter", "messages_acked", "messages the broker acknowledged", up.get("acked"))
    f.add(
        "gauge",
        "publish_rate_per_second",
        "messages published per second (last minute)",
        up.get("publish_rate"),
    )
    buf = v.get("buffer", {})
    f.add(
        "gauge",
        "buffer_pending_messages",
        "messages in the buffer not yet acknowledged",
        buf.get("pending"),
    )
    oldest = buf.get("oldest")
    ts = v.get("ts")
    age = (
        None
        if oldest is None or ts is None
        else max(0.0, (ts - oldest) / 1000 + v.get("age_s", 0.0))
    )
    f.add(
        "gauge",
        "buffer_oldest_unsent_age_seconds",
        "age of the oldest unacknowledged message",
        0.0 if oldest is None else age,
    )
    f.add(
        "counter",
        "buffer_dropped_messages",
        "telemetry dropped by the buffer's size cap",
        buf.get("dropped"),
    )
    f.add(
        "gauge",
        "buffer_in_memory",
        "1 while the buffer is in memory only",
        buf.get("medium") == "memory",
    )
    f.add("gauge", "buffer_size_bytes", "size of the buffer's files", buf.get("bytes"))
    f.add(
        "gauge",
        "disk_free_bytes",
        "free space on the state_dir's filesystem",
        buf.get("disk_free_bytes"),
    )
    f.add(
        "gauge",
        "disk_write_bytes_per_hour",
        "bytes the agent writes to storage per hour",
        buf.get("write_bytes_per_hour"),
    )
    f.add(
        "gauge",
        "clock_synced",
        "1 while the wall clock is synchronised",
        bool(v.get("clock", {}).get("synced")),
    )
    system = v.get("system", {})
    f.add(
        "gauge",
        "resident_memory_bytes",
        "the agent's resident memory (VmRSS)",
        system.get("rss_bytes"),
    )
    f.add(
        "gauge",
        "soc_temperature_celsius",
        "SoC temperature (thermal zone 0)",
        system.get("soc_temp_c"),
    )
    if system.get("throttled") is not None:
        flags = int(system["throttled"])
        f.add("gauge", "throttled_flags", "vcgencmd get_throttled bit field", flags)
        for bit, (name, when) in THROTTLE_BITS.items():
            f.add(
                "gauge",
                "throttle_condition",
                "Raspberry Pi throttling conditions (vcgencmd get_throttled), now or since boot",
                flags >> bit & 1,
                {"condition": name, "when": when},
            )
    for d in v.get("devices", []):
        lab = {"device": str(d.get("id"))}
        f.add(
            "gauge",
            "device_online",
            "1 online, 0 offline (no sample: not known yet)",
            None if d.get("state") == "unknown" else d.get("state") == "online",
            lab,
        )
        f.add(
            "counter",
            "device_poll_errors",
            "polls in which a point could not be read",
            d.get("poll_errors"),
            lab,
        )
        f.add(
            "gauge",
            "device_poll_errors_last_hour",
            "poll errors in the last hour",
            d.get("errors_last_hour"),
            lab,
        )
        f.add(
            "gauge",
            "device_last_good_age_seconds",
            "seconds since a poll last read a good value",
            d.get("last_good_age_s"),
            lab,
        )
        f.add(
            "counter",
            "device_poll_overruns",
            "poll cycles skipped (the previous poll ended late)",
            d.get("overruns"),
            lab,
        )
        for point, p in d.get("points", {}).items():
            plab = {**lab, "point": str(point), "unit": str(p.get("unit") or "")}
            good = p.get("quality") == "good"
            f.add(
                "gauge",
                "point_value",
                "the last good value of each point",
                p.get("value") if good else None,
                plab,
            )
            f.add(
                "gauge",
                "point_good",
                "1 when the point's last reading was good",
                good,
                {**lab, "point": str(point)},
            )
    alarms = v.get("alarms", [])
    f.add("gauge", "alarms_active", "alarms active or acknowledged and not cleared", len(alarms))
    for a in alarms:
        f.add(
            "gauge",
            "alarm_active",
            "1 for each active alarm",
            1,
            {"alarm": str(a.get("alarm")), "severity": str(a.get("severity"))},
        )
    outs = v.get("outputs") or {}
    for name, on in (outs.get("states") or {}).items():
        f.add(
            "gauge", "output_on", "1 while the GPIO output is on", bool(on), {"output": str(name)}
        )
    return _generate(f, CollectorRegistry, generate_latest)


def _s(ms: Any) -> float | None:
    return None if not isinstance(ms, int | float) else ms / 1000


def _generate(f: _Families, registry_cls: Any, generate: Any) -> bytes:
    registry = registry_cls(auto_describe=False)
    registry.register(f)
    return bytes(generate(registry))
