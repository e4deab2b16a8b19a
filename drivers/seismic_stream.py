"""Strong-motion sensors streaming samples continuously: the frame formats, the sample
clock (gaps and overlaps), and the serial reader.

Default frame format (``format: ascii``), one text line per sample instant::

    $SMP,<n>,<c1>[,<c2>[,<c3>]]*hh

``n`` is the sensor's sample counter (unsigned, wrapping at 2³²), ``c1..c3`` the counts of
the channels in the configured order (integers or decimals), ``hh`` the NMEA-style checksum
(XOR of the characters between ``$`` and ``*``, two hex digits). The counter is what tells
a gap (samples lost on the line) from an overlap (a sample sent twice) — never bridged,
always reported. Other formats plug in through :data:`FRAME_PARSERS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from drivers.common import Duration, StrictModel, at_least
from drivers.names import DisplayName, Name
from drivers.serial_io import PortQueue, open_serial
from drivers.serial_line import LineAssembler, LineError, nmea_checksum

log = logging.getLogger(__name__)

COUNTER_MOD = 2**32


class SeismicChannel(StrictModel):
    """One component: its name and counts → m/s² factor."""

    name: Name
    scale: float = Field(default=1.0, gt=0, description="m/s² per count")


class SeismicDevice(StrictModel):
    """A 1–3 component accelerometer streaming samples over a serial line."""

    driver: Literal["seismic"]
    id: Name
    name: DisplayName | None = Field(
        default=None, description="Text for people (any Unicode); in payloads, never in topics"
    )
    serial_port: str | None = Field(default=None, min_length=1, description="Serial source")
    udp_port: int | None = Field(
        default=None, ge=1, le=65535, description="Or: UDP port for Raspberry Shake datacast"
    )
    udp_host: str = Field(default="0.0.0.0", description="Address to listen on for UDP")
    baudrate: int = Field(default=115200, ge=50, le=4_000_000)
    format: Literal["ascii", "datacast"] = Field(
        default="ascii", description="ascii ($SMP frames, serial) or datacast (UDP)"
    )
    sample_rate: float = Field(gt=0, le=2000, description="Samples per second per channel")
    channels: list[SeismicChannel] = Field(min_length=1, max_length=3)
    trigger_channel: Name | None = Field(
        default=None, description="STA/LTA runs on this channel (default: the first)"
    )
    sta: Annotated[Duration, at_least("10ms")] = 0.5
    lta: Annotated[Duration, at_least("1s")] = 10.0
    stalta: Literal["recursive", "classic"] = Field(
        default="recursive", description="STA/LTA variant (ObsPy's definitions)"
    )
    stalta_band: tuple[float, float] | None = Field(
        default=None,
        description="Band-pass (Hz) on the trigger channel before STA/LTA; default: raw counts",
    )
    trigger_on: float = Field(default=3.0, gt=0)
    trigger_off: float = Field(default=1.5, gt=0)
    bandpass: tuple[float, float] = Field(
        default=(0.1, 10.0), description="PGA/PGV band (Hz), GB/T 17742-2020 Appendix A"
    )
    pre_event: Annotated[Duration, at_least("0s")] = 5.0
    post_event: Annotated[Duration, at_least("0s")] = 10.0
    max_event: Annotated[Duration, at_least("1s")] = Field(
        default=120.0, description="Longest waveform excerpt kept for one event"
    )
    profile: None = None

    @model_validator(mode="after")
    def _check(self) -> SeismicDevice:
        if (self.serial_port is None) == (self.udp_port is None):
            raise ValueError("give serial_port (with format ascii) or udp_port (datacast)")
        if (self.udp_port is not None) != (self.format == "datacast"):
            raise ValueError("UDP carries format datacast; a serial port format ascii")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError("channel names must differ")
        if self.trigger_channel is not None and self.trigger_channel not in names:
            raise ValueError(f"trigger_channel {self.trigger_channel!r} is not one of {names}")
        if self.sta >= self.lta:
            raise ValueError("sta must be shorter than lta")
        if self.trigger_off > self.trigger_on:
            raise ValueError("trigger_off must not be above trigger_on")
        for key in ("bandpass", "stalta_band"):
            band = getattr(self, key)
            if band is not None and not 0 < band[0] < band[1] < self.sample_rate / 2:
                raise ValueError(
                    f"{key} {band[0]}–{band[1]} Hz must lie within 0–{self.sample_rate / 2} Hz"
                )
        return self

    @property
    def bus(self) -> str:
        if self.udp_port is not None:
            return f"udp:{self.udp_host}:{self.udp_port}"
        return f"serial:{self.serial_port}"

    @property
    def points(self) -> list[Any]:
        """The points of its 1 Hz summary (name and unit), for telemetry and alarm rules."""
        from drivers.serial_line import LinePoint

        return [
            LinePoint(name=n, unit=u)
            for n, u in (
                ("pga", "m/s2"),
                ("pgv", "m/s"),
                ("intensity", None),
                ("sta_lta", None),
                ("noise", "m/s2"),
                ("gap_samples", None),
            )
        ]


def parse_ascii_frame(line: bytes, channels: int) -> tuple[int, list[float]]:
    """``$SMP,<n>,<c1>,…*hh`` → (sample counter, counts). Pure.

    Raises:
        LineError: not such a frame, a bad checksum, or the wrong number of channels.
    """
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        raise LineError(f"not ASCII: {line[:60]!r}") from None
    if not text.startswith("$SMP,"):
        raise LineError(f"not a $SMP frame: {text[:60]!r}")
    body, star, check = text[1:].partition("*")
    if not star or len(check) < 2:
        raise LineError(f"frame without checksum: {text[:60]!r}")
    try:
        given = int(check[:2], 16)
    except ValueError:
        raise LineError(f"checksum {check[:2]!r} is not hex: {text[:60]!r}") from None
    if given != nmea_checksum(body):
        raise LineError(f"checksum error (frame {given:02X}, computed {nmea_checksum(body):02X})")
    fields = body.split(",")[1:]
    if len(fields) != channels + 1:
        raise LineError(f"{len(fields) - 1} channel(s), expected {channels}: {text[:60]!r}")
    try:
        n = int(fields[0]) % COUNTER_MOD
        counts = [float(v) for v in fields[1:]]
    except ValueError:
        raise LineError(f"not numbers: {text[:60]!r}") from None
    return n, counts


def ascii_frame(n: int, counts: list[float]) -> bytes:
    """The frame of sample counter ``n`` (inverse of :func:`parse_ascii_frame`)."""
    body = "SMP," + ",".join([str(n % COUNTER_MOD), *(f"{c:g}" for c in counts)])
    return f"${body}*{nmea_checksum(body):02X}\r\n".encode()


FRAME_PARSERS: dict[str, Callable[[bytes, int], tuple[int, list[float]]]] = {
    "ascii": parse_ascii_frame,
}
"""Frame parsers by ``format`` name: (frame bytes, channel count) → (counter, counts)."""


class SampleClock:
    """Follows the sample counter: ``feed(n)`` returns ``(kind, count)`` with kind
    ``first``, ``ok``, ``gap`` (``count`` samples missing before this one) or ``overlap``
    (a sample at or before the last one: ``count`` samples back; the caller drops it).
    Pure apart from its own state."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.gaps = 0
        self.missing = 0
        self.overlaps = 0

    def feed(self, n: int) -> tuple[str, int]:
        if self.last is None:
            self.last = n
            return ("first", 0)
        step = (n - self.last) % COUNTER_MOD
        if step == 1:
            self.last = n
            return ("ok", 0)
        if step == 0 or step > COUNTER_MOD // 2:  # repeated or from the past
            self.overlaps += 1
            return ("overlap", (self.last - n) % COUNTER_MOD)
        self.gaps += 1
        self.missing += step - 1
        self.last = n
        return ("gap", step - 1)


SampleSink = Callable[[int, list[float], int], None]
"""Receives (sample counter, counts, wall time of arrival in UTC ms)."""
GapSink = Callable[[str, int, int], None]
"""Receives (``gap`` or ``overlap``, samples, counter of the sample that showed it)."""


class _SampleReader:
    """What both seismic readers share: the callbacks and the count of bad input
    (logged at most every 10 s)."""

    def __init__(
        self, dev: SeismicDevice, on_sample: SampleSink, on_gap: GapSink, now_ms: Callable[[], int]
    ) -> None:
        self.dev = dev
        self.on_sample = on_sample
        self.on_gap = on_gap
        self.now_ms = now_ms
        self.errors = 0
        self.samples = 0
        self._logged_at = -1e9

    def _error(self, msg: str) -> None:
        self.errors += 1
        if time.monotonic() - self._logged_at >= 10.0:
            log.warning("device %s: bad input (%d so far): %s", self.dev.id, self.errors, msg)
            self._logged_at = time.monotonic()


class SeismicSerialReader(_SampleReader):
    """Reads frames from the serial port until cancelled, reopening the port when it
    comes back; counts garbled frames in :attr:`errors`."""

    def __init__(
        self, dev: SeismicDevice, on_sample: SampleSink, on_gap: GapSink, now_ms: Callable[[], int]
    ) -> None:
        super().__init__(dev, on_sample, on_gap, now_ms)
        self.parse = FRAME_PARSERS[dev.format]
        self.clock = SampleClock()
        self.asm = LineAssembler(b"\n", 1024)

    def handle(self, data: bytes) -> None:
        """Feed received bytes (also used by tests and by the replay of a file)."""
        lines, errors = self.asm.feed(data)
        for e in errors:
            self._error(e)
        nch = len(self.dev.channels)
        ts = self.now_ms()
        for line in lines:
            try:
                n, counts = self.parse(line, nch)
            except LineError as exc:
                self._error(str(exc))
                continue
            kind, k = self.clock.feed(n)
            if kind == "overlap":
                self.on_gap("overlap", k, n)
                continue
            if kind == "gap":
                self.on_gap("gap", k, n)
            self.samples += 1
            self.on_sample(n, counts, ts)

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
                while (data := await port.queue.get()) is not None:
                    self.handle(data)
            finally:
                transport.close()
            log.warning("device %s: %s went away; reopening when it is back", d.id, d.serial_port)


# -- Raspberry Shake "datacast" over UDP ----------------------------------------------------


def parse_datacast(packet: bytes) -> tuple[str, float, list[int]]:
    """``{'EHZ', 1507760140.530, 614, 813, …}`` → (channel, epoch seconds of the first
    sample, integer counts): the Raspberry Shake UDP data-cast format (Raspberry Shake
    manual, "Data Producer UDP Output"). Pure.

    Raises:
        LineError: anything else.
    """
    try:
        text = packet.decode("ascii").strip()
    except UnicodeDecodeError:
        raise LineError(f"not ASCII: {packet[:60]!r}") from None
    if not (text.startswith("{") and text.endswith("}")):
        raise LineError(f"not a datacast packet: {text[:60]!r}")
    parts = [p.strip() for p in text[1:-1].split(",")]
    if len(parts) < 3:
        raise LineError(f"datacast packet without samples: {text[:60]!r}")
    channel = parts[0].strip("'\"")
    try:
        t0 = float(parts[1])
        counts = [int(v) for v in parts[2:]]
    except ValueError:
        raise LineError(f"datacast numbers unreadable: {text[:60]!r}") from None
    return channel, t0, counts


def datacast_packet(channel: str, t0: float, counts: list[int]) -> bytes:
    """Inverse of :func:`parse_datacast` (for the replay tool and tests)."""
    return ("{'" + channel + "', " + f"{t0:.3f}, " + ", ".join(map(str, counts)) + "}").encode()


class ChannelAligner:
    """Puts per-channel datacast packets together into sample instants.

    Each packet's samples get a global index from its start time: round((t − T0)·rate),
    T0 being the first packet's time. ``feed`` returns the instants complete on every
    channel, in order, and reports gaps (indices no channel delivered, skipped: never
    bridged) and overlaps (samples already passed, dropped). A channel that falls more
    than ``max_wait`` seconds behind the others counts as a gap for the instants it misses.
    """

    def __init__(self, channels: list[str], rate: float, max_wait: float = 2.0) -> None:
        self.channels = channels
        self.rate = rate
        self.t0: float | None = None
        self.next = 0
        self.pending: dict[str, dict[int, int]] = {c: {} for c in channels}
        self.max_wait = round(max_wait * rate)

    def feed(
        self, channel: str, t0: float, counts: list[int]
    ) -> tuple[list[tuple[int, list[float]]], list[tuple[str, int, int]]]:
        samples: list[tuple[int, list[float]]] = []
        gaps: list[tuple[str, int, int]] = []
        if channel not in self.pending:
            return samples, gaps
        if self.t0 is None:
            self.t0 = t0
        first = round((t0 - self.t0) * self.rate)
        late = 0
        for j, v in enumerate(counts):
            k = first + j
            if k < self.next:
                late += 1
                continue
            self.pending[channel][k] = v
        if late:
            gaps.append(("overlap", late, first))
        while True:
            if all(self.next in p for p in self.pending.values()):
                samples.append(
                    (self.next, [float(self.pending[c].pop(self.next)) for c in self.channels])
                )
                self.next += 1
                continue
            ahead = [min(p) for p in self.pending.values() if p]
            newest = max((max(p) for p in self.pending.values() if p), default=self.next)
            if ahead and (
                (len(ahead) == len(self.channels) and min(ahead) > self.next)
                or newest - self.next > self.max_wait
            ):
                target = min(ahead) if min(ahead) > self.next else self.next + 1
                for p in self.pending.values():
                    for k in [k for k in p if k < target]:
                        del p[k]
                gaps.append(("gap", target - self.next, target))
                self.next = target
                continue
            break
        return samples, gaps


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes], None]) -> None:
        self.handle = handle

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.handle(data)


class SeismicUdpReader(_SampleReader):
    """Receives Raspberry Shake datacast packets on a UDP port until cancelled."""

    def __init__(
        self, dev: SeismicDevice, on_sample: SampleSink, on_gap: GapSink, now_ms: Callable[[], int]
    ) -> None:
        super().__init__(dev, on_sample, on_gap, now_ms)
        self.aligner = ChannelAligner([c.name for c in dev.channels], dev.sample_rate)

    def handle(self, packet: bytes) -> None:
        try:
            channel, t0, counts = parse_datacast(packet)
        except LineError as exc:
            self._error(str(exc))
            return
        samples, gaps = self.aligner.feed(channel, t0, counts)
        ts = self.now_ms()
        for kind, k, n in gaps:
            self.on_gap(kind, k, n)
        for n, values in samples:
            self.samples += 1
            self.on_sample(n % COUNTER_MOD, values, ts)

    async def run(self) -> None:
        d = self.dev
        assert d.udp_port is not None
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Datagrams(self.handle), local_addr=(d.udp_host, d.udp_port)
        )
        log.info("device %s: listening for datacast on udp %s:%d", d.id, d.udp_host, d.udp_port)
        try:
            await asyncio.Event().wait()
        finally:
            transport.close()
