"""On-device strong-motion processing, streaming and pure Python: every class is fed one
sample at a time, keeps bounded state (no growing arrays) and gives results identical to
the batch reference implementations it is tested against.

- :class:`RecursiveStaLta` and :class:`ClassicStaLta`: the STA/LTA characteristic
  functions of ObsPy 1.5.1 (``obspy.signal.trigger.recursive_sta_lta`` /
  ``classic_sta_lta``: on the squared signal, no detrend), fed sample by sample.
- :class:`Trigger`: on/off hysteresis with ObsPy ``trigger_onset`` semantics.
- :func:`butter_bandpass` / :class:`SosFilter`: a causal Butterworth band-pass as cascaded
  second-order sections, designed like ``scipy.signal.iirfilter(N, Wn, btype="band",
  ftype="butter")`` (analog prototype, band transform, bilinear transform with pre-warping).
- :class:`GroundMotion`: 0.1–10 Hz band-pass, trapezoidal integration to velocity,
  three-component vector sum and their peaks: PGA and PGV.
- :func:`intensity`: the instrumental seismic intensity of GB/T 17742-2020, Appendix A.

Units: acceleration m/s², velocity m/s, sampling rate Hz.
"""

from __future__ import annotations

import cmath
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TINY = 2.2250738585072014e-308
"""numpy.finfo(float).tiny: the LTA's start value in ObsPy's recursive STA/LTA."""


class RecursiveStaLta:
    """Recursive STA/LTA (Withers et al. 1998), ObsPy's ``recursive_sta_lta``.

    ``feed(x)`` takes one sample and returns the characteristic function for it: 0 for the
    first ``nlta`` samples (the warm-up; ObsPy zeroes them too), STA/LTA of the squared
    signal afterwards. The first sample only starts the count (ObsPy's loop starts at 1).

    Args:
        nsta, nlta: short and long window lengths in samples.
    """

    __slots__ = ("_c_lta", "_c_sta", "_ic_lta", "_ic_sta", "i", "lta", "nlta", "sta")

    def __init__(self, nsta: int, nlta: int) -> None:
        if not 0 < nsta < nlta:
            raise ValueError(f"need 0 < nsta < nlta, got {nsta}, {nlta}")
        self.nlta = nlta
        self._c_sta = 1.0 / nsta
        self._c_lta = 1.0 / nlta
        self._ic_sta = 1.0 - self._c_sta
        self._ic_lta = 1.0 - self._c_lta
        self.sta = 0.0
        self.lta = TINY
        self.i = -1

    def feed(self, x: float) -> float:
        self.i += 1
        if self.i == 0:
            return 0.0
        sq = float(x) * float(x)
        self.sta = self._c_sta * sq + self._ic_sta * self.sta
        self.lta = self._c_lta * sq + self._ic_lta * self.lta
        if self.i < self.nlta:
            return 0.0
        return self.sta / self.lta


class ClassicStaLta:
    """Classic STA/LTA, ObsPy's ``classic_sta_lta``: trailing means of the squared signal
    over ``nsta`` and ``nlta`` samples, the current one included; 0 before sample
    ``nlta - 1``. Running sums over ring buffers of the last ``nlta`` squares."""

    __slots__ = ("_lta_win", "_sta_win", "i", "lta_sum", "nlta", "nsta", "sta_sum")

    def __init__(self, nsta: int, nlta: int) -> None:
        if not 0 < nsta < nlta:
            raise ValueError(f"need 0 < nsta < nlta, got {nsta}, {nlta}")
        self.nsta, self.nlta = nsta, nlta
        self._sta_win: deque[float] = deque()
        self._lta_win: deque[float] = deque()
        self.sta_sum = self.lta_sum = 0.0
        self.i = -1

    def feed(self, x: float) -> float:
        self.i += 1
        sq = float(x) * float(x)
        self._sta_win.append(sq)
        self._lta_win.append(sq)
        self.sta_sum += sq
        self.lta_sum += sq
        if len(self._sta_win) > self.nsta:
            self.sta_sum -= self._sta_win.popleft()
        if len(self._lta_win) > self.nlta:
            self.lta_sum -= self._lta_win.popleft()
        if self.i < self.nlta - 1:
            return 0.0
        lta = max(self.lta_sum / self.nlta, TINY)
        return (self.sta_sum / self.nsta) / lta


class Trigger:
    """Trigger on/off with hysteresis, as ObsPy's ``trigger_onset(cft, on, off)``: it turns
    on at the first sample with cft ≥ ``on``, and off after the last sample with cft ≥
    ``off``; a new on-crossing while on is ignored.

    ``feed(cft)`` returns ``("on", index)`` at the onset, ``("off", index_of_last_sample
    ≥ off)`` at the end, else None. :meth:`close` ends a trigger still on at the end of
    the data (on its last sample).
    """

    __slots__ = ("active", "i", "off", "on", "onset")

    def __init__(self, on: float, off: float) -> None:
        if off > on:
            raise ValueError(f"trigger off level {off} above the on level {on}")
        self.on, self.off = on, off
        self.active = False
        self.onset = -1
        self.i = -1

    def feed(self, cft: float) -> tuple[str, int] | None:
        self.i += 1
        if not self.active:
            if cft >= self.on:
                self.active = True
                self.onset = self.i
                return ("on", self.i)
            return None
        if cft < self.off:
            self.active = False
            return ("off", self.i - 1)
        return None

    def close(self) -> tuple[str, int] | None:
        if self.active:
            self.active = False
            return ("off", self.i)
        return None


# -- filters ----------------------------------------------------------------------------------


def butter_bandpass(
    order: int, low_hz: float, high_hz: float, fs: float
) -> list[tuple[float, float, float, float, float, float]]:
    """Digital Butterworth band-pass of ``order`` (per edge, as scipy's ``N``) between
    ``low_hz`` and ``high_hz`` at sampling rate ``fs``, as second-order sections
    ``(b0, b1, b2, a0=1, a1, a2)``.

    The design of ``scipy.signal.iirfilter(order, [low, high] / (fs/2), btype="band",
    ftype="butter")``: analog prototype poles exp(iπ(2k+N+1)/2N), band-pass transform at
    the pre-warped edges (ω = 4·tan(π·f/fs) on scipy's normalised scale), bilinear
    transform (zeros at z = +1 and z = −1); poles taken in conjugate pairs, each section
    with one zero at +1 and one at −1 (numerator 1 − z⁻²), the gain on the first section.

    Raises:
        ValueError: edges not within 0 < low < high < fs/2.
    """
    nyq = fs / 2
    if not 0 < low_hz < high_hz < nyq:
        raise ValueError(f"band {low_hz}–{high_hz} Hz must lie within 0–{nyq} Hz")
    fs2 = 4.0  # scipy's bilinear transform on the normalised scale (fs = 2)
    w1 = fs2 * math.tan(math.pi * (low_hz / nyq) / 2)
    w2 = fs2 * math.tan(math.pi * (high_hz / nyq) / 2)
    bw, wo = w2 - w1, math.sqrt(w1 * w2)
    proto = [cmath.exp(1j * math.pi * (2 * k + order + 1) / (2 * order)) for k in range(order)]
    analog: list[complex] = []
    for p in proto:
        p_lp = p * bw / 2
        root = cmath.sqrt(p_lp * p_lp - wo * wo)
        analog += [p_lp + root, p_lp - root]
    gain = bw**order
    digital = [(fs2 + p) / (fs2 - p) for p in analog]
    # analog zeros: order at s = 0 (→ z = 1); order at infinity (→ z = −1)
    k = gain * (fs2**order / _prod([fs2 - p for p in analog])).real
    upper = sorted((p for p in digital if p.imag > 0), key=lambda p: abs(p - 1))
    sections = []
    for p in upper:
        a1, a2 = -2 * p.real, abs(p) ** 2
        sections.append((1.0, 0.0, -1.0, 1.0, a1, a2))
    b0, b1, b2, a0, a1, a2 = sections[0]
    sections[0] = (k * b0, k * b1, k * b2, a0, a1, a2)
    return sections


def _prod(values: Sequence[complex]) -> complex:
    out = 1 + 0j
    for v in values:
        out *= v
    return out


class SosFilter:
    """Causal filtering by cascaded second-order sections (transposed direct form II, as
    ``scipy.signal.sosfilt``), zero initial state."""

    __slots__ = ("sos", "z")

    def __init__(self, sos: Sequence[tuple[float, float, float, float, float, float]]) -> None:
        self.sos = [tuple(s) for s in sos]
        self.z = [[0.0, 0.0] for _ in self.sos]

    def feed(self, x: float) -> float:
        for (b0, b1, b2, _a0, a1, a2), z in zip(self.sos, self.z, strict=True):
            y = b0 * x + z[0]
            z[0] = b1 * x - a1 * y + z[1]
            z[1] = b2 * x - a2 * y
            x = y
        return x


# -- ground motion and intensity --------------------------------------------------------------


@dataclass
class Peaks:
    """Peak values so far (m/s², m/s) and the sample indices where they occurred."""

    pga: float = 0.0
    pga_index: int = -1
    pgv: float = 0.0
    pgv_index: int = -1


class GroundMotion:
    """PGA and PGV of three components, as GB/T 17742-2020 Appendix A asks: each
    component band-passed 0.1–10 Hz (4th-order causal Butterworth, :func:`butter_bandpass`),
    integrated to velocity by the trapezoidal rule, and the peak of the three-component
    vector sum √(x² + y² + z²) taken for acceleration and velocity.

    ``feed(x, y, z)`` takes one sample per component (m/s², baseline removed) and returns
    the filtered vector acceleration and velocity of that sample; :attr:`peaks` holds the
    peaks since the start or the last :meth:`reset_peaks`.
    """

    def __init__(self, fs: float, low_hz: float = 0.1, high_hz: float = 10.0, order: int = 4):
        self.fs = fs
        sos = butter_bandpass(order, low_hz, high_hz, fs)
        self._filters = [SosFilter(sos) for _ in range(3)]
        self._prev_a = [0.0, 0.0, 0.0]
        self._vel = [0.0, 0.0, 0.0]
        self._half_dt = 0.5 / fs
        self.i = -1
        self.peaks = Peaks()

    def feed(self, x: float, y: float, z: float) -> tuple[float, float]:
        self.i += 1
        acc = [f.feed(v) for f, v in zip(self._filters, (x, y, z), strict=True)]
        if self.i > 0:  # cumulative trapezoid with initial 0
            for c in range(3):
                self._vel[c] += (acc[c] + self._prev_a[c]) * self._half_dt
        self._prev_a = acc
        a_vec = math.sqrt(acc[0] ** 2 + acc[1] ** 2 + acc[2] ** 2)
        v = self._vel
        v_vec = math.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2)
        pk = self.peaks
        if a_vec > pk.pga:
            pk.pga, pk.pga_index = a_vec, self.i
        if v_vec > pk.pgv:
            pk.pgv, pk.pgv_index = v_vec, self.i
        return a_vec, v_vec

    def reset_peaks(self) -> Peaks:
        """Return the peaks so far and start new ones (e.g. per 1 s summary)."""
        old, self.peaks = self.peaks, Peaks()
        return old


@dataclass(frozen=True)
class Intensity:
    """GB/T 17742-2020 instrumental intensity: I_A, I_V, the combined value (one decimal)
    and the degree (1–12)."""

    i_a: float
    i_v: float
    value: float
    degree: int


def intensity(pga: float, pgv: float) -> Intensity:
    """Instrumental seismic intensity, GB/T 17742-2020 Appendix A (A.5–A.8):
    I_A = 3.17·lg(PGA) + 6.59 and I_V = 3.00·lg(PGV) + 9.77 (PGA in m/s², PGV in m/s);
    I = I_V when I_A ≥ 6.0 and I_V ≥ 6.0, else (I_A + I_V)/2; clamped to [1.0, 12.0] and
    given to one decimal (half up). The degree is the nearest whole number: [1.0, 1.5) is
    I, [1.5, 2.5) is II, …, [11.5, 12.0] is XII.

    PGA or PGV of 0 (or less) count as −∞ (the result is then clamped to 1.0).
    """
    i_a = 3.17 * math.log10(pga) + 6.59 if pga > 0 else -math.inf
    i_v = 3.00 * math.log10(pgv) + 9.77 if pgv > 0 else -math.inf
    raw = i_v if (i_a >= 6.0 and i_v >= 6.0) else (i_a + i_v) / 2
    clamped = min(12.0, max(1.0, raw))
    value = math.floor(clamped * 10 + 0.5 + 1e-9) / 10
    degree = min(12, max(1, math.floor(value + 0.5)))
    return Intensity(i_a, i_v, value, degree)


ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII")
"""Degree names, index degree − 1."""


# -- the per-sensor processor -------------------------------------------------------------------


@dataclass
class SeismicOutput:
    """What the processor asks to publish: a 1 Hz ``summary`` (point results), an
    ``event`` (start/end, alarm priority) or a ``waveform`` excerpt."""

    kind: str
    ts_ms: int
    results: list[Any] | None = None
    doc: dict[str, Any] | None = None


class SeismicProcessor:
    """Everything a strong-motion sensor's samples go through on the gateway.

    ``feed(counts, arrival_ms)`` takes one sample instant (counts per channel, in the
    configured order) and returns what to publish:

    - every second of samples, a summary: PGA and PGV of that second (0.1–10 Hz vector,
      m/s², m/s), their GB/T 17742-2020 intensity, the current STA/LTA, the noise level
      (RMS of the band-passed vector acceleration) and the samples missing in gaps;
    - at the trigger onset, an ``event`` ``start`` (sent at the onset sample itself);
    - at the trigger end, an ``event`` ``end`` with the event's PGA/PGV (band-passed),
      the raw vector peak, intensity and duration;
    - ``post_event`` seconds later, the ``waveform`` from ``pre_event`` seconds before the
      onset (at most ``max_event`` seconds), as base64 little-endian float32 counts,
      interleaved by channel.

    STA/LTA runs on the raw counts of the trigger channel (ObsPy's convention: squared
    signal, no filter); sample times are the first sample's arrival plus index / rate.
    """

    def __init__(self, dev: Any) -> None:
        from drivers.seismic_stream import SeismicDevice

        assert isinstance(dev, SeismicDevice)
        self.dev = dev
        fs = dev.sample_rate
        self.fs = fs
        self.names = [c.name for c in dev.channels]
        self.scales = [c.scale for c in dev.channels]
        self.trig = self.names.index(dev.trigger_channel) if dev.trigger_channel else 0
        self._new_trigger()
        self.gm = GroundMotion(fs, dev.bandpass[0], dev.bandpass[1])
        self.i = -1
        self.t0_ms: float | None = None
        self.per_second = max(1, round(fs))
        self._sum_sq = 0.0
        self._n_sec = 0
        self._gap_samples = 0
        self.cft = 0.0
        self.pre: deque[tuple[float, ...]] = deque(maxlen=max(1, round(dev.pre_event * fs)))
        self._event: dict[str, Any] | None = None
        self._wave: list[tuple[float, ...]] = []
        self._wave_start = 0
        self._post_left = -1
        self._max_wave = round(dev.max_event * fs)

    def _new_trigger(self) -> None:
        """(Re)start STA/LTA and the trigger: after a gap the long window warms up again
        before anything can trigger."""
        dev, fs = self.dev, self.fs
        cls = RecursiveStaLta if dev.stalta == "recursive" else ClassicStaLta
        self.stalta: RecursiveStaLta | ClassicStaLta = cls(round(dev.sta * fs), round(dev.lta * fs))
        self.trigger = Trigger(dev.trigger_on, dev.trigger_off)
        band = dev.stalta_band
        self._prefilter = SosFilter(butter_bandpass(4, band[0], band[1], fs)) if band else None

    def time_ms(self, index: int) -> int:
        assert self.t0_ms is not None
        return round(self.t0_ms + index * 1000 / self.fs)

    def skip(self, samples: int) -> list[SeismicOutput]:
        """A gap of ``samples`` missing samples: time moves on, nothing is bridged, and
        STA/LTA warms up again. An event in progress ends at the last sample before the
        gap (its ``end`` and waveform are returned). Costs the same for any length of gap:
        nothing is done per missing sample or second (no summary covers a second without
        samples). ``samples`` ≤ 0 changes nothing."""
        out: list[SeismicOutput] = []
        if samples <= 0:
            return out
        e = self._event
        if e is not None and e["end_index"] is None and self.i >= 0:
            out.append(self._end(self.i))
        if self._event is not None:
            out.append(self._waveform())
        self._post_left = -1
        self.i += samples
        self._gap_samples += samples
        self._new_trigger()
        return out

    def feed(self, counts: Sequence[float], arrival_ms: int) -> list[SeismicOutput]:
        if not all(math.isfinite(c) for c in counts):  # (the readers refuse them already)
            return self.skip(1)
        self.i += 1
        i = self.i
        if self.t0_ms is None:
            self.t0_ms = arrival_ms - i * 1000 / self.fs
        out: list[SeismicOutput] = []
        acc = [c * s for c, s in zip(counts, self.scales, strict=True)]
        xyz = [*acc, 0.0, 0.0, 0.0][:3]
        a_vec, v_vec = self.gm.feed(*xyz)
        self._sum_sq += a_vec * a_vec
        self._n_sec += 1
        x = counts[self.trig]
        if self._prefilter is not None:
            x = self._prefilter.feed(x)
        self.cft = self.stalta.feed(x)
        ev = self.trigger.feed(self.cft)
        sample = tuple(counts)
        if self._event is not None:
            e = self._event
            if e["end_index"] is None:
                if a_vec > e["pga"]:
                    e["pga"], e["pga_index"] = a_vec, i
                if v_vec > e["pgv"]:
                    e["pgv"], e["pgv_index"] = v_vec, i
                raw = math.sqrt(sum(x * x for x in acc))
                if raw > e["peak_raw"]:
                    e["peak_raw"], e["peak_raw_index"] = raw, i
                e["peak_sta_lta"] = max(e["peak_sta_lta"], self.cft)
            if len(self._wave) < self._max_wave:
                self._wave.append(sample)
        if ev is not None and ev[0] == "on":
            out.append(self._start(i, a_vec, v_vec, acc, sample))
        elif ev is not None and ev[0] == "off" and self._event is not None:
            out.append(self._end(ev[1]))
            if self._post_left < 0:  # post_event 0: the excerpt is complete now
                out.append(self._waveform())
        if self._post_left >= 0:
            self._post_left -= 1
            if self._post_left < 0:
                out.append(self._waveform())
        self.pre.append(sample)
        if self._n_sec >= self.per_second:
            out.append(self._summary(i))
        return out

    def _start(
        self, i: int, a_vec: float, v_vec: float, acc: list[float], sample: tuple[float, ...]
    ) -> SeismicOutput:
        raw = math.sqrt(sum(x * x for x in acc))
        if self._post_left >= 0:  # a new event before the last excerpt went out
            self._post_left = -1
        self._event = {
            "onset_index": i,
            "end_index": None,
            "pga": a_vec,
            "pga_index": i,
            "pgv": v_vec,
            "pgv_index": i,
            "peak_raw": raw,
            "peak_raw_index": i,
            "peak_sta_lta": self.cft,
        }
        self._wave = list(self.pre)
        self._wave_start = i - len(self._wave)
        self._wave.append(sample)
        inten = intensity(a_vec, v_vec)
        return SeismicOutput(
            "event",
            self.time_ms(i),
            doc={
                "event": "start",
                "onset": self.time_ms(i),
                "onset_sample": i,
                "trigger_channel": self.names[self.trig],
                "sta_lta": self.cft,
                "pga": a_vec,
                "pgv": v_vec,
                "intensity": inten.value,
                "degree": inten.degree,
                "delay_s": 0.0,
            },
        )

    def _end(self, last: int) -> SeismicOutput:
        e = self._event
        assert e is not None
        e["end_index"] = last
        onset = e["onset_index"]
        inten = intensity(e["pga"], e["pgv"])
        # the excerpt ends post_event after the last triggered sample (the sample that
        # ended the trigger, last + 1, is already in it and counts)
        self._post_left = round(self.dev.post_event * self.fs) - 1
        return SeismicOutput(
            "event",
            self.time_ms(last),
            doc={
                "event": "end",
                "onset": self.time_ms(onset),
                "onset_sample": onset,
                "end": self.time_ms(last),
                "end_sample": last,
                "duration_s": (last - onset) / self.fs,
                "trigger_channel": self.names[self.trig],
                "peak_sta_lta": e["peak_sta_lta"],
                "pga": e["pga"],
                "pga_at": self.time_ms(e["pga_index"]),
                "pgv": e["pgv"],
                "pgv_at": self.time_ms(e["pgv_index"]),
                "peak_raw": e["peak_raw"],
                "peak_raw_at": self.time_ms(e["peak_raw_index"]),
                "peak_raw_sample": e["peak_raw_index"],
                "intensity": inten.value,
                "degree": inten.degree,
                "i_a": inten.i_a,
                "i_v": inten.i_v,
            },
        )

    def _waveform(self) -> SeismicOutput:
        import base64
        import struct

        e = self._event or {}
        if e.get("end_index") is not None:  # up to post_event after the last triggered sample
            keep = e["end_index"] + round(self.dev.post_event * self.fs) - self._wave_start + 1
            del self._wave[max(0, keep) :]
        flat = [v for s in self._wave for v in s]
        data = base64.b64encode(struct.pack(f"<{len(flat)}f", *flat)).decode()
        doc = {
            "onset": self.time_ms(e.get("onset_index", self._wave_start)),
            "start": self.time_ms(self._wave_start),
            "sample_rate": self.fs,
            "channels": self.names,
            "scale": self.scales,
            "samples": len(self._wave),
            "encoding": "base64 float32 little-endian counts, interleaved by channel",
            "data": data,
        }
        self._wave = []
        self._event = None
        return SeismicOutput("waveform", self.time_ms(self._wave_start), doc=doc)

    def _summary(self, i: int) -> SeismicOutput:
        from drivers.base import PointResult

        pk = self.gm.reset_peaks()
        inten = intensity(pk.pga, pk.pgv)
        noise = math.sqrt(self._sum_sq / self._n_sec) if self._n_sec else 0.0
        results = [
            PointResult("pga", pk.pga),
            PointResult("pgv", pk.pgv),
            PointResult("intensity", inten.value),
            PointResult("sta_lta", round(self.cft, 4)),
            PointResult("noise", noise),
            PointResult("gap_samples", self._gap_samples),
        ]
        self._sum_sq = 0.0
        self._n_sec = 0
        self._gap_samples = 0
        return SeismicOutput("summary", self.time_ms(i), results=results)
