"""Strong-motion sensors streaming samples continuously: the frame formats, the sample
clock (gaps and overlaps), and the serial and UDP readers.

Default frame format (``format: ascii``), one text line per sample instant::

    $SMP,<n>,<c1>[,<c2>[,<c3>]]*hh

``n`` is the sensor's sample counter (unsigned, wrapping at 2³²), ``c1..c3`` the counts of
the channels in the configured order (integers or decimals), ``hh`` the NMEA-style checksum
(XOR of the characters between ``$`` and ``*``, two hex digits). The counter is what tells
a gap (samples lost on the line) from an overlap (a sample sent twice) — never bridged,
always reported. Other formats plug in through :data:`FRAME_PARSERS`.

Every input is taken as hostile: a frame or datagram that cannot be a sample (garbled, a
count that is not a number, an absurd time, too many samples, an unknown channel, a
sender not allowed) is dropped and counted by reason in the reader's
:attr:`~_SampleReader.dropped`, with one log line at most every :data:`LOG_EVERY_S`; it
never ends the input, and no gap costs work per missing sample. A count that is a number
but NaN, infinite or beyond ±:data:`MAX_COUNT`, in a frame that is otherwise sound, is
None: its sample instant is kept and marked invalid (counted in
:attr:`~_SampleReader.invalid`), for the processor to bridge without letting it into any
state (:class:`agent.seismic.SeismicProcessor`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from drivers.serial_io import PortQueue, open_serial
from drivers.serial_line import LineAssembler, LineError, nmea_checksum

if TYPE_CHECKING:
    from drivers.seismic_config import SeismicDevice

log = logging.getLogger(__name__)

COUNTER_MOD = 2**32
MAX_COUNT = 2**31
"""Largest magnitude of a sample (counts): a 32-bit converter's range. Beyond it, or not
finite, a count is invalid (None)."""
LOG_EVERY_S = 10.0
"""Dropped input and gaps are logged at most this often per device."""
LOOPBACK = ("127.0.0.0/8", "::1/128")
"""Where datacast packets are taken from when ``udp_senders`` is not given."""
MIN_TIME_S = 946_684_800.0
"""2000-01-01T00:00:00Z: an earlier datacast time is absurd."""
MAX_TIME_S = 4_102_444_800.0
"""2100-01-01T00:00:00Z: a later datacast time is absurd."""
MAX_AHEAD_S = 5.0
"""A datacast packet stamped more than this ahead of the gateway's clock is dropped: no
sample can come from the future, and accepting it would make the genuine packets after
it look like overlaps. Sensor and gateway must both keep synchronised time (NTP)."""
MAX_PACKET_S = 2.0
"""Most seconds of samples one datacast packet may carry (a Raspberry Shake sends 0.25 s)."""
JUMP_MARGIN = 1.01
"""The time since the last datacast packet taken, in samples, is allowed 1 % more (the
sensor's clock and the gateway's run at slightly different rates)."""
RESYNC_WITHIN_S = 30.0
"""A datacast stream follows a sender whose clock stepped (re-anchors its time base) only
when the sender's new time is within this of the gateway's clock, while that clock is
synchronised; else the sender's packets are dropped (``time_base``)."""


class InputError(LineError):
    """A frame or datagram that is dropped; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_ascii_frame(line: bytes, channels: int) -> tuple[int, list[float | None]]:
    """``$SMP,<n>,<c1>,…*hh`` → (sample counter, counts). Pure.

    A count that Python reads as a number but that is NaN, infinite or beyond
    ±:data:`MAX_COUNT` (``nan``, ``-inf``, ``1e400``, ``3000000000``) is None: the
    frame's checksum and counter still place the instant, which is invalid.

    Raises:
        InputError: not such a frame, a bad checksum or the wrong number of channels
            (reason ``format``); a count that is not a number at all (reason ``value``).
    """
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InputError("format", f"not ASCII: {line[:60]!r}") from None
    if not text.startswith("$SMP,"):
        raise InputError("format", f"not a $SMP frame: {text[:60]!r}")
    body, star, check = text[1:].partition("*")
    if not star or len(check) < 2:
        raise InputError("format", f"frame without checksum: {text[:60]!r}")
    try:
        given = int(check[:2], 16)
    except ValueError:
        raise InputError("format", f"checksum {check[:2]!r} is not hex: {text[:60]!r}") from None
    if given != nmea_checksum(body):
        raise InputError(
            "format", f"checksum error (frame {given:02X}, computed {nmea_checksum(body):02X})"
        )
    fields = body.split(",")[1:]
    if len(fields) != channels + 1:
        raise InputError(
            "format", f"{len(fields) - 1} channel(s), expected {channels}: {text[:60]!r}"
        )
    if not _COUNTER.fullmatch(fields[0]):
        raise InputError("format", f"sample counter {fields[0][:20]!r} is not a number")
    try:
        numbers = [float(v) for v in fields[1:]]
    except ValueError:
        raise InputError("value", f"not numbers: {text[:60]!r}") from None
    counts = [v if -MAX_COUNT <= v <= MAX_COUNT else None for v in numbers]  # NaN: None
    return int(fields[0]) % COUNTER_MOD, counts


_COUNTER = re.compile(r"[0-9]{1,12}")
_COUNT = re.compile(r"\s*[+-]?[0-9]{1,10}\s*")


def ascii_frame(n: int, counts: list[float]) -> bytes:
    """The frame of sample counter ``n`` (inverse of :func:`parse_ascii_frame`)."""
    body = "SMP," + ",".join([str(n % COUNTER_MOD), *(f"{c:g}" for c in counts)])
    return f"${body}*{nmea_checksum(body):02X}\r\n".encode()


FRAME_PARSERS: dict[str, Callable[[bytes, int], tuple[int, list[float | None]]]] = {
    "ascii": parse_ascii_frame,
}
"""Frame parsers by ``format`` name: (frame bytes, channel count) → (counter, counts; None
for an invalid count)."""


class SampleClock:
    """Follows the sample counter: ``feed(n, t)`` returns ``(kind, count)`` with kind

    - ``first``: the first sample;
    - ``ok``: the next one;
    - ``gap``: ``count`` samples missing before this one (take it, after the gap);
    - ``overlap``: a sample at or before the last one, ``count`` samples back (drop it);
    - ``jump``: a counter further ahead than the time since the last sample allows
      (``count`` samples), with ``t`` given: drop it, it is not a sample of this stream.

    ``t`` is the sample's arrival on a monotonic clock, seconds. A sensor really missing
    samples has taken that long: a jump of more than ``(elapsed + SLACK_S) × rate × 1.25``
    samples is not believed, so that one bad frame cannot move the stream's time on by
    days and leave every genuine sample after it an "overlap". A sensor whose counter
    starts again elsewhere (restarted, replaced) sends consecutive counters that do not
    follow the old ones: after ``rebase_after`` of them in a row the clock follows the new
    counter and reports a ``gap`` of the samples the elapsed time says were missed (of
    what was dropped meanwhile, without ``t``). Pure apart from its own state.

    Args:
        rate: samples per second (needed for the jump check).
        rebase_after: consecutive counters after which a new counter is followed
            (default: one second of samples, at least 16).
    """

    SLACK_S = 2.0

    def __init__(self, rate: float | None = None, rebase_after: int | None = None) -> None:
        self.rate = rate
        self.rebase_after = rebase_after or max(16, round(rate or 0))
        self.last: int | None = None
        self.last_t: float | None = None
        self.gaps = 0
        self.missing = 0
        self.overlaps = 0
        self.jumps = 0
        self.rebases = 0
        self._run_last: int | None = None
        self._run = 0

    def _take(self, n: int, t: float | None) -> None:
        self.last, self.last_t = n, t
        self._run_last, self._run = None, 0

    def feed(self, n: int, t: float | None = None) -> tuple[str, int]:
        if self.last is None:
            self._take(n, t)
            return ("first", 0)
        step = (n - self.last) % COUNTER_MOD
        if step == 1:
            self._take(n, t)
            return ("ok", 0)
        if step == 0 or step > COUNTER_MOD // 2:  # repeated or from the past
            result = ("overlap", (self.last - n) % COUNTER_MOD)
        else:
            missing = step - 1
            if not self._implausible(missing, t):
                self.gaps += 1
                self.missing += missing
                self._take(n, t)
                return ("gap", missing)
            result = ("jump", missing)
        # not a sample of the stream as it was: perhaps the first of a new counter
        if self._run_last is not None and (n - self._run_last) % COUNTER_MOD == 1:
            self._run += 1
        else:
            self._run = 1
        self._run_last = n
        if self._run >= self.rebase_after:
            dropped = self._run - 1
            missing = dropped
            if t is not None and self.last_t is not None and self.rate:
                missing = max(dropped, round((t - self.last_t) * self.rate) - 1)
            self.rebases += 1
            self.gaps += 1
            self.missing += missing
            self._take(n, t)
            return ("gap", missing)
        if result[0] == "overlap":
            self.overlaps += 1
        else:
            self.jumps += 1
        return result

    def _implausible(self, missing: int, t: float | None) -> bool:
        if t is None or self.last_t is None or not self.rate:
            return False
        elapsed = max(0.0, t - self.last_t)
        return missing > (elapsed + self.SLACK_S) * self.rate * 1.25


SampleSink = Callable[[int, list[float | None], int], None]
"""Receives (sample counter, counts (None: not a finite number within ±:data:`MAX_COUNT`),
wall time of arrival in UTC ms)."""
GapSink = Callable[[str, int, int], None]
"""Receives (``gap`` or ``overlap``, samples, counter of the sample that showed it)."""


class _SampleReader:
    """What both seismic readers share: the callbacks, the counters of dropped input by
    reason (:attr:`dropped`; :attr:`errors` is their sum) and of gaps and overlaps, and a
    log line about them at most every :data:`LOG_EVERY_S`."""

    def __init__(
        self, dev: SeismicDevice, on_sample: SampleSink, on_gap: GapSink, now_ms: Callable[[], int]
    ) -> None:
        self.dev = dev
        self.on_sample = on_sample
        self.on_gap = on_gap
        self.now_ms = now_ms
        self.errors = 0
        """Frames or datagrams dropped, all reasons."""
        self.dropped: Counter[str] = Counter()
        """Frames or datagrams dropped by reason (``format``, ``value``, ``counter``,
        ``too_long``, ``lost_bytes``; UDP: ``sender``, ``size``, ``samples``, ``time``,
        ``ahead``, ``channel``, ``time_jump``, ``time_base``; ``internal`` for a fault of
        this code)."""
        self.samples = 0
        self.invalid = 0
        """Sample instants taken with an invalid count (None) on some channel."""
        self.gaps = 0
        """Gaps reported (each skipped in one step)."""
        self.gap_samples = 0
        self.overlap_samples = 0
        """Samples dropped because their instant had already passed."""
        self._logged_at = -1e9
        self._since: Counter[str] = Counter()
        self._gap_logged_at = -1e9
        self._gaps_since = [0, 0, 0, 0]  # gaps, samples, overlaps, samples
        self._internal_logged = False

    def _drop(self, reason: str, msg: str) -> None:
        self.errors += 1
        self.dropped[reason] += 1
        self._since[reason] += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            what = ", ".join(f"{k} {v}" for k, v in sorted(self._since.items()))
            log.warning(
                "device %s: dropped bad input (%s since the last report; %d in all): %s",
                self.dev.id,
                what,
                self.errors,
                msg,
            )
            self._logged_at = now
            self._since.clear()

    def _take(self, n: int, counts: list[float | None], ts: int) -> None:
        """Hand one sample instant on; one with an invalid count is counted and logged
        (at most every :data:`LOG_EVERY_S`, with the drops)."""
        self.samples += 1
        if None in counts:
            self.invalid += 1
            self._since["invalid"] += 1
            now = time.monotonic()
            if now - self._logged_at >= LOG_EVERY_S:
                chans = zip(self.dev.channels, counts, strict=True)
                names = [c.name for c, v in chans if v is None]
                log.warning(
                    "device %s: sample %d: %s not a finite count within ±2^31 (bridged; %d "
                    "such sample instant(s) in all)",
                    self.dev.id,
                    n,
                    ", ".join(names),
                    self.invalid,
                )
                self._logged_at = now
                self._since.clear()
        self.on_sample(n, counts, ts)

    def report(self) -> None:
        """Log what this reader dropped and skipped in all (at its stop)."""
        if self.errors or self.gaps or self.overlap_samples or self.invalid:
            what = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
            log.warning(
                "device %s: %d sample instant(s) taken; dropped bad input: %s; %d gap(s) of %d "
                "sample(s) skipped, %d sample(s) of overlaps dropped; %d sample instant(s) "
                "with an invalid count",
                self.dev.id,
                self.samples,
                what,
                self.gaps,
                self.gap_samples,
                self.overlap_samples,
                self.invalid,
            )

    def _internal(self, exc: Exception) -> None:
        """A fault of this code (or of a callback) while handling input: counted, its
        traceback logged once."""
        if not self._internal_logged:
            log.error("device %s: input could not be handled", self.dev.id, exc_info=exc)
            self._internal_logged = True
        self._drop("internal", f"{type(exc).__name__}: {exc}")

    def _gap(self, kind: str, k: int, n: int) -> None:
        """Report a gap (or overlap) on, and log it at most every :data:`LOG_EVERY_S`."""
        since = self._gaps_since
        if kind == "gap":
            self.gaps += 1
            self.gap_samples += k
            since[0] += 1
            since[1] += k
        else:
            self.overlap_samples += k
            since[2] += 1
            since[3] += k
        self.on_gap(kind, k, n)
        now = time.monotonic()
        if now - self._gap_logged_at >= LOG_EVERY_S:
            log.warning(
                "device %s: %s of %d sample(s) before sample %d (not bridged); since the last "
                "report: %d gap(s) of %d sample(s), %d overlap(s) of %d sample(s)",
                self.dev.id,
                kind,
                k,
                n,
                *since,
            )
            self._gap_logged_at = now
            self._gaps_since = [0, 0, 0, 0]


class SeismicSerialReader(_SampleReader):
    """Reads frames from the serial port until cancelled, reopening the port when it
    comes back; counts what it drops in :attr:`dropped`."""

    def __init__(
        self, dev: SeismicDevice, on_sample: SampleSink, on_gap: GapSink, now_ms: Callable[[], int]
    ) -> None:
        super().__init__(dev, on_sample, on_gap, now_ms)
        self.parse = FRAME_PARSERS[dev.format]
        self.clock = SampleClock(dev.sample_rate)
        self.asm = LineAssembler(b"\n", 1024)

    def handle(self, data: bytes, t: float | None = None) -> None:
        """Feed received bytes that arrived at monotonic time ``t`` (default: now); also
        used by tests and by the replay of a file. Never raises: a fault while handling
        them is counted (``internal``) and logged once with its traceback."""
        try:
            self._handle(data, time.monotonic() if t is None else t)
        except Exception as exc:  # whatever the line carries, the input goes on
            self._internal(exc)

    def _handle(self, data: bytes, t: float) -> None:
        lines, errors = self.asm.feed(data)
        for e in errors:
            self._drop("too_long", e)
        nch = len(self.dev.channels)
        ts = self.now_ms()
        for line in lines:
            try:
                n, counts = self.parse(line, nch)
            except InputError as exc:
                self._drop(exc.reason, str(exc))
                continue
            except LineError as exc:  # a parser of another format
                self._drop("format", str(exc))
                continue
            kind, k = self.clock.feed(n, t)
            if kind == "overlap":
                self._gap("overlap", k, n)
                continue
            if kind == "jump":
                self._drop(
                    "counter",
                    f"sample counter {n} is {k} samples ahead, more than the time since the "
                    "last sample allows",
                )
                continue
            if kind == "gap":
                self._gap("gap", k, n)
            self._take(n, counts, ts)

    async def run(self) -> None:
        d = self.dev
        announced = False
        while True:
            port = PortQueue()
            try:
                transport = await open_serial(port, str(d.serial_port), d.baudrate)
            except Exception as exc:  # OSError, termios.error…
                if not announced:
                    log.warning(
                        "device %s: cannot open %s (%s); retrying every second",
                        d.id,
                        d.serial_port,
                        exc,
                    )
                    announced = True
                await asyncio.sleep(1.0)
                continue
            announced = False
            self.asm.reset()
            # frames check themselves ($SMP prefix, checksum): a partial first line fails
            # them, so the first line need not be thrown away
            self.asm.synced = True
            log.info("device %s: %s open", d.id, d.serial_port)
            try:
                while (data := await port.get()) is not None:
                    lost = port.take_lost()
                    if lost:
                        self.asm.clear()
                        self._drop("lost_bytes", f"{lost} byte(s) dropped: read too slowly")
                    self.handle(data)
            except asyncio.CancelledError:
                self.report()
                raise
            finally:
                transport.close()
            log.warning("device %s: %s went away; reopening when it is back", d.id, d.serial_port)


# -- Raspberry Shake "datacast" over UDP ----------------------------------------------------


def parse_datacast(
    packet: bytes, max_samples: int | None = None
) -> tuple[str, float, list[int | None]]:
    """``{'EHZ', 1507760140.530, 614, 813, …}`` → (channel, epoch seconds of the first
    sample, integer counts): the Raspberry Shake UDP data-cast format (Raspberry Shake
    manual, "Data Producer UDP Output"). Pure.

    A count that is NaN, infinite (``nan``, ``-inf``, ``1e999``) or an integer beyond
    ±:data:`MAX_COUNT` is None: its sample instant is invalid, the packet is kept.

    Raises:
        InputError: reason ``format`` (not such a packet, unreadable numbers), ``time``
            (a time that is not finite or not between 2000 and 2100), ``value`` (a count
            that is a finite number but not an integer, or not a number), ``samples``
            (more than ``max_samples``).
    """
    try:
        text = packet.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InputError("format", f"not ASCII: {packet[:60]!r}") from None
    if not (text.startswith("{") and text.endswith("}")):
        raise InputError("format", f"not a datacast packet: {text[:60]!r}")
    parts = text[1:-1].split(",")
    if len(parts) < 3:
        raise InputError("format", f"datacast packet without samples: {text[:60]!r}")
    if max_samples is not None and len(parts) - 2 > max_samples:
        raise InputError(
            "samples", f"{len(parts) - 2} samples in one packet, at most {max_samples} expected"
        )
    channel = parts[0].strip().strip("'\"")
    if not channel or len(channel) > 16:
        raise InputError("format", f"datacast channel {channel[:20]!r} is not a channel code")
    try:
        t0 = float(parts[1])
    except ValueError:
        raise InputError("format", f"datacast time unreadable: {parts[1][:30]!r}") from None
    if not (math.isfinite(t0) and MIN_TIME_S <= t0 <= MAX_TIME_S):
        raise InputError("time", f"datacast time {t0!r} is not a time between 2000 and 2100")
    counts: list[int | None] = []
    for v in parts[2:]:
        if _COUNT.fullmatch(v):
            c = int(v)
            counts.append(c if -MAX_COUNT <= c <= MAX_COUNT else None)
            continue
        try:
            f = float(v)
        except ValueError:
            f = 0.0
        if not -MAX_COUNT <= f <= MAX_COUNT:  # NaN, ±inf, 1e99: a number, not a count
            counts.append(None)
            continue
        raise InputError("value", f"datacast count {v.strip()[:20]!r} is not an integer")
    return channel, t0, counts


def datacast_packet(channel: str, t0: float, counts: Sequence[int | float]) -> bytes:
    """Inverse of :func:`parse_datacast` (for the replay tool and tests)."""
    return ("{'" + channel + "', " + f"{t0:.3f}, " + ", ".join(map(str, counts)) + "}").encode()


AlignerEvent = tuple[str, int, Any]
"""``("sample", index, counts per channel)``, ``("gap", samples, index after it)`` or
``("overlap", samples, index of the packet's first sample)``."""


def _float(v: int | None) -> float | None:
    return None if v is None else float(v)


class _Runs:
    """One channel's pending samples: sorted, non-overlapping runs ``[start, values]``."""

    __slots__ = ("runs", "starts")

    def __init__(self) -> None:
        self.runs: list[tuple[int, list[int | None]]] = []
        self.starts: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.runs)

    @property
    def low(self) -> int:
        return self.runs[0][0]

    @property
    def high(self) -> int:
        """One past the last pending index."""
        start, values = self.runs[-1]
        return start + len(values)

    def add(self, start: int, values: list[int | None]) -> int:
        """Insert the samples not already held; return how many were already held."""
        end = start + len(values)
        pieces: list[tuple[int, list[int | None]]] = []
        cur = start
        i = max(0, bisect_right(self.starts, start) - 1)
        while cur < end and i < len(self.runs):
            s, v = self.runs[i]
            e = s + len(v)
            if e <= cur:
                i += 1
                continue
            if s >= end:
                break
            if s > cur:
                pieces.append((cur, values[cur - start : s - start]))
            cur = max(cur, e)
            i += 1
        if cur < end:
            pieces.append((cur, values[cur - start :]))
        held = len(values) - sum(len(v) for _, v in pieces)
        for p in pieces:
            k = bisect_right(self.starts, p[0])
            self.runs.insert(k, p)
            self.starts.insert(k, p[0])
        return held

    def drop_below(self, index: int) -> None:
        """Forget every sample before ``index``."""
        while self.runs:
            s, v = self.runs[0]
            if s + len(v) <= index:
                del self.runs[0], self.starts[0]
            elif s < index:
                self.runs[0] = (index, v[index - s :])
                self.starts[0] = index
                break
            else:
                break

    def run_at(self, index: int) -> tuple[int, list[int | None]] | None:
        """The run holding ``index``, or None."""
        k = bisect_right(self.starts, index) - 1
        if k >= 0:
            s, v = self.runs[k]
            if index < s + len(v):
                return s, v
        return None

    def next_held(self, index: int) -> int | None:
        """The first held index at or after ``index``, or None."""
        if self.run_at(index) is not None:
            return index
        k = bisect_right(self.starts, index)
        return self.starts[k] if k < len(self.starts) else None


class ChannelAligner:
    """Puts per-channel datacast packets together into sample instants.

    Each packet's samples get a global index from its start time: round((t − T0)·rate),
    T0 being the first packet's time. :meth:`feed` returns, in order, the instants
    complete on every channel, the gaps (indices skipped: never bridged) and overlaps
    (samples whose instant already passed, dropped).

    An instant missing on some channel is waited for until a channel holds data more than
    ``max_wait`` seconds newer; then every incomplete instant up to there is skipped in
    one step (one ``gap``, whatever its length: an hour's outage costs what a second's
    does). When every channel's next data starts later than the next instant, the gap is
    skipped at once. Pending data is held as runs, at most ``max_wait`` seconds plus one
    packet per channel after each feed.

    With ``now`` given (the packet's arrival, monotonic seconds), a packet may move the
    stream ahead (past the newest sample taken) by at most the time since the last packet
    taken, times the rate (:data:`JUMP_MARGIN` more), plus ``slack`` seconds of samples;
    a packet claiming more is a ``time_jump`` (dropped): one packet stamped hours ahead
    cannot move the instants on and leave every genuine packet after it an overlap.

    A channel whose packets all come too late, or too far ahead, for ``resync_after``
    seconds of samples in a row, each continuing the one before (the sender's clock
    stepped), makes the aligner follow the sender's time again: a ``gap`` of those
    samples, then T0 is re-anchored so that the packet lands on the next instant. With
    ``wall`` given (the gateway's synchronised wall clock, epoch seconds; None while it
    is not synchronised), the re-anchor is taken only when the packet's time is within
    ``resync_within`` seconds of it; else the packet is a ``time_base`` (dropped) and the
    stream stays on its time base.

    Args:
        channels: the channel codes, in the order of the sample instants' counts.
        rate: samples per second per channel.
        max_wait: seconds of newer data after which an incomplete instant is skipped.
        resync_after: seconds of samples off the time base after which it is followed.
        slack: seconds of samples a packet may be ahead beyond what the elapsed time
            allows (default: ``max_wait``).
        resync_within: see above (default :data:`RESYNC_WITHIN_S`).
    """

    def __init__(
        self,
        channels: list[str],
        rate: float,
        max_wait: float = 2.0,
        resync_after: float = 5.0,
        slack: float | None = None,
        resync_within: float = RESYNC_WITHIN_S,
    ) -> None:
        self.channels = list(channels)
        self.rate = rate
        self.t0: float | None = None
        self.next = 0
        self.pending: dict[str, _Runs] = {c: _Runs() for c in channels}
        self.max_wait = max(1, round(max_wait * rate))
        self.resync_after = max(1, round(resync_after * rate))
        self.slack = max(1, round((max_wait if slack is None else slack) * rate))
        self.resync_within = resync_within
        self.head: int | None = None
        """One past the newest sample index taken."""
        self.taken_at: float | None = None
        """When (``now``) the last packet was taken."""
        self._off: dict[str, tuple[int, int]] = {}
        """Per channel, its packets off the time base in a row: (samples, end index)."""
        self.resyncs = 0

    def feed(
        self,
        channel: str,
        t0: float,
        counts: list[int | None],
        now: float | None = None,
        wall: float | None = None,
    ) -> list[AlignerEvent]:
        """Take one packet (``t0``: its first sample's time, seconds; finite) arriving at
        ``now`` (monotonic seconds; None: no jump check) while the gateway's wall clock
        shows ``wall`` (epoch seconds, None when it is not synchronised); return the
        events it completes, in order: besides samples, gaps and overlaps, a dropped
        packet is ``("time_jump", samples, first index)`` or ``("time_base", samples,
        first index)``. A channel not configured is ignored."""
        out: list[AlignerEvent] = []
        runs = self.pending.get(channel)
        if runs is None or not counts or not math.isfinite(t0):
            return out
        if self.t0 is None:
            self.t0 = t0
        first = round((t0 - self.t0) * self.rate)
        n = len(counts)
        kind = (
            "overlap"
            if first + n <= self.next
            else "time_jump"
            if self._jumps(first + n, now)
            else ""
        )
        if kind:
            off = self._off_base(channel, first, n)
            if off < self.resync_after:
                out.append((kind, n, first))
                return out
            # the sender's clock stepped: follow it, if the gateway's clock agrees
            if wall is not None and abs(t0 + n / self.rate - wall) > self.resync_within:
                out.append(("time_base", n, first))
                return out
            self.resyncs += 1
            for r in self.pending.values():
                r.runs.clear()
                r.starts.clear()
            self._off.clear()
            self.head = None
            self.next += off
            out.append(("gap", off, self.next))
            self.t0 = t0 - self.next / self.rate
            first = self.next
        self._off.pop(channel, None)
        self.head = first + n if self.head is None else max(self.head, first + n)
        if now is not None:
            self.taken_at = now
        late = max(0, self.next - first)
        if late:
            out.append(("overlap", late, first))
        held = runs.add(first + late, counts[late:])
        if held:
            out.append(("overlap", held, first))
        self._drain(out)
        return out

    def _jumps(self, end: int, now: float | None) -> bool:
        """Whether a packet ending before index ``end`` moves the stream further ahead
        than the time since the last packet taken allows."""
        if now is None or self.head is None or self.taken_at is None:
            return False
        elapsed = max(0.0, now - self.taken_at)
        return end - self.head > elapsed * self.rate * JUMP_MARGIN + self.slack

    def _off_base(self, channel: str, first: int, n: int) -> int:
        """Count a packet off the time base; return the samples of its channel's run of
        such packets (a packet that does not continue the run starts a new one)."""
        prev = self._off.get(channel)
        total = n
        if prev is not None and abs(first - prev[1]) <= self.slack:
            total += prev[0]
        self._off[channel] = (total, first + n)
        return total

    def _drain(self, out: list[AlignerEvent]) -> None:
        chans = [self.pending[c] for c in self.channels]
        while True:
            heads = [h for r in chans if (h := r.run_at(self.next)) is not None]
            if len(heads) == len(chans):
                m = min(s + len(v) for s, v in heads)
                for i in range(self.next, m):
                    out.append(("sample", i, [_float(v[i - s]) for s, v in heads]))
                for r in chans:
                    r.drop_below(m)
                self.next = m
                continue
            full = [r for r in chans if r]
            if not full:
                return
            newest = max(r.high for r in full) - 1
            target: int | None = None
            if len(full) == len(chans) and min(r.low for r in full) > self.next:
                target = min(r.low for r in full)  # nothing anywhere at the next instant
            elif newest - self.next > self.max_wait:
                cutoff = newest - self.max_wait
                common = self._first_common(self.next + 1)
                target = common if common is not None and common < cutoff else cutoff
            if target is None or target <= self.next:
                return
            out.append(("gap", target - self.next, target))
            for r in chans:
                r.drop_below(target)
            self.next = target

    def _first_common(self, index: int) -> int | None:
        """The first index at or after ``index`` held by every channel, or None."""
        chans = [self.pending[c] for c in self.channels]
        cand = index
        while True:
            moved = False
            for r in chans:
                k = r.next_held(cand)
                if k is None:
                    return None
                if k > cand:
                    cand, moved = k, True
            if not moved:
                return cand


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes, str | None], None]) -> None:
        self.handle = handle

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.handle(data, str(addr[0]) if addr else None)

    def error_received(self, exc: Exception) -> None:  # ICMP errors: nothing to do
        log.debug("datacast socket: %s", exc)


class SeismicUdpReader(_SampleReader):
    """Receives Raspberry Shake datacast packets on a UDP port until cancelled.

    Only packets from ``udp_senders`` (default: this gateway, loopback) are taken. A
    datagram larger than one packet can be (``MAX_PACKET_S`` of samples), malformed
    (:func:`parse_datacast`), of an unknown channel, or stamped more than
    :data:`MAX_AHEAD_S` ahead of the gateway's clock is dropped and counted in
    :attr:`dropped`; so is one that moves the stream further ahead than the time since
    the last packet allows (``time_jump``), and one of a sender whose clock stepped to a
    time more than :data:`RESYNC_WITHIN_S` from the gateway's synchronised clock
    (``time_base``; see :class:`ChannelAligner`). Nothing a datagram holds ends the input.

    Args:
        now_ms: the gateway's wall clock, UTC ms.
        clock_synced: whether that clock is synchronised now (default: never, and the
            time a sender's clock steps to is not checked).
        mono: the monotonic clock, seconds (replays faster than real time need a
            faster one).
    """

    def __init__(
        self,
        dev: SeismicDevice,
        on_sample: SampleSink,
        on_gap: GapSink,
        now_ms: Callable[[], int],
        clock_synced: Callable[[], bool] = lambda: False,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(dev, on_sample, on_gap, now_ms)
        self.aligner = ChannelAligner([c.name for c in dev.channels], dev.sample_rate)
        self.clock_synced = clock_synced
        self.mono = mono
        self.max_samples = max(64, math.ceil(dev.sample_rate * MAX_PACKET_S))
        self.max_bytes = 96 + 14 * self.max_samples
        """Largest datagram read: a channel code, a time and ``max_samples`` counts."""
        self._senders = dev.senders
        self._names = {c.name for c in dev.channels}

    def allowed(self, sender: str) -> bool:
        """Whether packets from address ``sender`` are taken."""
        try:
            addr = ipaddress.ip_address(sender.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._senders)

    def handle(self, packet: bytes, sender: str | None = None) -> None:
        """Take one datagram from ``sender`` (an IP address; None: not checked, for tests
        and replays in process). Never raises."""
        try:
            self._handle(packet, sender)
        except Exception as exc:  # whatever a datagram holds, the input goes on
            self._internal(exc)

    def _handle(self, packet: bytes, sender: str | None) -> None:
        if sender is not None and not self.allowed(sender):
            self._drop("sender", f"a datagram from {sender}, not one of udp_senders")
            return
        if len(packet) > self.max_bytes:
            self._drop("size", f"a datagram of {len(packet)} bytes, at most {self.max_bytes}")
            return
        try:
            channel, t0, counts = parse_datacast(packet, self.max_samples)
        except InputError as exc:
            self._drop(exc.reason, str(exc))
            return
        if channel not in self._names:
            self._drop("channel", f"channel {channel!r} is not configured")
            return
        now_s = self.now_ms() / 1000
        if t0 > now_s + MAX_AHEAD_S:
            self._drop(
                "ahead",
                f"packet of {channel} stamped {t0 - now_s:.3g} s ahead of the gateway clock "
                "(is the gateway's or the sensor's clock synchronised?)",
            )
            return
        ts = self.now_ms()
        wall = ts / 1000 if self.clock_synced() else None
        for kind, a, b in self.aligner.feed(channel, t0, counts, self.mono(), wall):
            if kind == "sample":
                self._take(a % COUNTER_MOD, b, ts)
            elif kind == "time_jump":
                self._drop(
                    "time_jump",
                    f"packet of {channel} stamped {t0:.3f} moves the stream "
                    f"{(b + a - (self.aligner.head or 0)) / self.dev.sample_rate:.3g} s ahead, "
                    "more than the time since the last packet allows",
                )
            elif kind == "time_base":
                self._drop(
                    "time_base",
                    f"the sender's clock stepped to {t0:.3f}, {t0 - ts / 1000:+.3g} s from the "
                    "gateway's synchronised clock: not followed (is the sensor's clock "
                    "synchronised?)",
                )
            else:
                self._gap(kind, a, b)

    async def run(self) -> None:
        d = self.dev
        assert d.udp_port is not None
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Datagrams(self.handle), local_addr=(d.udp_host, d.udp_port)
        )
        log.info(
            "device %s: listening for datacast on udp %s:%d from %s",
            d.id,
            d.udp_host,
            d.udp_port,
            ", ".join(d.udp_senders or ["this gateway (loopback)"]),
        )
        try:
            await asyncio.Event().wait()
        finally:
            transport.close()
            self.report()
