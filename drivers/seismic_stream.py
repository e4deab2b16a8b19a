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
from drivers.modbus.config import Name
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
    serial_port: str = Field(min_length=1)
    baudrate: int = Field(default=115200, ge=50, le=4_000_000)
    format: Literal["ascii"] = Field(default="ascii", description="Frame format (see docs)")
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


class _Port(asyncio.Protocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def data_received(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)


SampleSink = Callable[[int, list[float], int], None]
"""Receives (sample counter, counts, wall time of arrival in UTC ms)."""
GapSink = Callable[[str, int, int], None]
"""Receives (``gap`` or ``overlap``, samples, counter of the sample that showed it)."""


class SeismicSerialReader:
    """Reads frames from the serial port until cancelled, reopening the port when it
    comes back; counts garbled frames in :attr:`errors` (logged at most every 10 s)."""

    def __init__(
        self, dev: SeismicDevice, on_sample: SampleSink, on_gap: GapSink, now_ms: Callable[[], int]
    ) -> None:
        self.dev = dev
        self.on_sample = on_sample
        self.on_gap = on_gap
        self.now_ms = now_ms
        self.parse = FRAME_PARSERS[dev.format]
        self.clock = SampleClock()
        self.asm = LineAssembler(b"\n", 1024)
        self.errors = 0
        self.samples = 0
        self._logged_at = -1e9

    def _error(self, msg: str) -> None:
        self.errors += 1
        if time.monotonic() - self._logged_at >= 10.0:
            log.warning("device %s: bad frame (%d so far): %s", self.dev.id, self.errors, msg)
            self._logged_at = time.monotonic()

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
        from pymodbus.transport.serialtransport import create_serial_connection

        d = self.dev
        announced = False
        while True:
            port = _Port()
            try:
                transport, _ = await create_serial_connection(
                    asyncio.get_running_loop(),
                    lambda p=port: p,
                    d.serial_port,
                    baudrate=d.baudrate,
                    bytesize=8,
                    parity="N",
                    stopbits=1,
                    timeout=0,
                )
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
