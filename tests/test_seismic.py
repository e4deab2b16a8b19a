"""Streaming seismic processing against ObsPy 1.5.1 reference results on real records:
STA/LTA fed sample by sample, triggers, PGA, the 0.1–10 Hz PGA/PGV pipeline and the
GB/T 17742-2020 intensity."""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from agent.seismic import (
    ClassicStaLta,
    GroundMotion,
    RecursiveStaLta,
    Trigger,
    butter_bandpass,
    intensity,
)

DATA = Path(__file__).parent / "data" / "seismic"
REF = json.loads((DATA / "reference_values.json").read_text())
ARRAYS = np.load(DATA / "reference_arrays.npz")


def rjob(component: str) -> list[float]:
    return [float(v) for v in (DATA / f"loc_RJOB20050801145719850.{component}").read_text().split()]


def knet_counts() -> list[int]:
    rows = (DATA / "knet_AKT013_19960811_EW_counts.csv").read_text().split()[1:]
    return [int(v) for v in rows]


def k2_counts() -> list[tuple[int, int, int]]:
    with (DATA / "kinemetrics_K2_STN_20020722_counts.csv").open() as f:
        return [(int(r["X"]), int(r["Y"]), int(r["Z"])) for r in csv.DictReader(f)]


def stream(cls: type, samples: list[float], nsta: int, nlta: int) -> list[float]:
    """The streaming object fed one sample at a time."""
    f = cls(nsta, nlta)
    return [f.feed(x) for x in samples]


def triggers(cft: list[float], on: float, off: float) -> list[list[int]]:
    t = Trigger(on, off)
    out: list[list[int]] = []
    for c in cft:
        ev = t.feed(c)
        if ev and ev[0] == "on":
            out.append([ev[1]])
        elif ev:
            out[-1].append(ev[1])
    end = t.close()
    if end:
        out[-1].append(end[1])
    return out


def test_recursive_sta_lta_matches_obspy_sample_by_sample() -> None:
    cft = stream(RecursiveStaLta, rjob("z"), 100, 2000)
    ref = ARRAYS["rjob_z_recursive_sta_lta_100_2000"]
    assert len(cft) == len(ref) == 12000
    np.testing.assert_allclose(cft, ref, rtol=1e-9, atol=0)
    assert triggers(cft, 3.0, 1.5) == [[6128, 6719]]
    for comp, expected in (("n", [[6128, 6744]]), ("e", [[6135, 6763]])):
        c = stream(RecursiveStaLta, rjob(comp), 100, 2000)
        np.testing.assert_allclose(c, ARRAYS[f"rjob_{comp}_recursive_sta_lta_100_2000"], rtol=1e-9)
        assert triggers(c, 3.0, 1.5) == expected


def test_classic_sta_lta_matches_obspy() -> None:
    cft = stream(ClassicStaLta, rjob("z"), 100, 2000)
    np.testing.assert_allclose(cft, ARRAYS["rjob_z_classic_sta_lta_100_2000"], rtol=1e-6)
    assert triggers(cft, 3.0, 1.5) == [[6128, 6607]]


def test_knet_record_trigger_and_pga() -> None:
    counts = knet_counts()
    ref = REF["knet_AKT013_EW_100hz"]
    mean = sum(counts) / len(counts)
    assert mean == pytest.approx(ref["whole_record_mean_counts"], rel=1e-12)
    gal = [(c - mean) * ref["gal_per_count"] for c in counts]
    cft = stream(RecursiveStaLta, gal, 50, 500)
    np.testing.assert_allclose(cft, ARRAYS["knet_recursive_sta_lta_50_500"], rtol=1e-9)
    assert triggers(cft, 3.0, 1.5) == [[928, 1545]]
    pga = max(abs(a) for a in gal)
    assert pga == pytest.approx(4.383276478718903, rel=1e-12)  # gal
    assert round(pga / 100, 6) == 0.043833  # m/s²


def test_k2_record_pga_pgv_and_intensity() -> None:
    """The 3-component K2 record through the documented 0.1–10 Hz causal 4th-order
    Butterworth, trapezoidal velocity and vector sums: PGA, PGV and I = 2.8 (degree III)."""
    fs = REF["kinemetrics_K2_STN_250hz"]["sampling_rate_hz"]
    per_count = (1.1682748289245507e-06, 1.1682281943836448e-06, 1.1687419361571917e-06)
    counts = k2_counts()
    acc = [[c[i] * per_count[i] for c in counts] for i in range(3)]
    base = [sum(ch[:500]) / 500 for ch in acc]
    gm = GroundMotion(fs)
    for x, y, z in zip(*acc, strict=True):
        gm.feed(x - base[0], y - base[1], z - base[2])
    pk = gm.peaks
    assert pk.pga == pytest.approx(0.07197928537396879, rel=1e-7)
    assert pk.pga_index == 1809
    assert pk.pgv == pytest.approx(0.003969169609382586, rel=1e-7)
    assert pk.pgv_index == 1697
    i = intensity(pk.pga, pk.pgv)
    assert i.i_a == pytest.approx(2.9673478719006767, abs=1e-6)
    assert i.i_v == pytest.approx(2.566098972341365, abs=1e-6)
    assert (i.value, i.degree) == (2.8, 3)
    print(
        f"\nK2: PGA {pk.pga:.10f} m/s² (ref 0.0719792854), PGV {pk.pgv:.10f} m/s "
        f"(ref 0.0039691696), I = {i.value} (degree {i.degree})"
    )


@pytest.mark.parametrize(
    ("i_a", "i_v", "value"),
    [
        (8.0, 5.99, 7.0),  # A.7: not both ≥ 6: the mean, (8 + 5.99)/2 = 6.995 → 7.0
        (8.0, 6.00, 6.0),  # both ≥ 6: I = I_V
        (6.0, 7.3, 7.3),
        (5.99, 7.3, 6.6),  # 6.645 → 6.6 (one decimal of the float 6.6449999…)
        (0.2, 0.1, 1.0),  # clamped
        (13.0, 12.5, 12.0),
    ],
)
def test_intensity_switch_and_clamps(i_a: float, i_v: float, value: float) -> None:
    pga = 10 ** ((i_a - 6.59) / 3.17)
    pgv = 10 ** ((i_v - 9.77) / 3.00)
    got = intensity(pga, pgv)
    assert got.value == value, got


@pytest.mark.parametrize(
    ("value", "degree"),
    [
        (1.0, 1),
        (1.4, 1),
        (1.5, 2),
        (2.4, 2),
        (2.5, 3),
        (3.4, 3),
        (6.5, 7),
        (11.4, 11),
        (11.5, 12),
        (12.0, 12),
    ],
)
def test_intensity_degree_bands(value: float, degree: int) -> None:
    # I_V = I_A = value (below 6: the mean of two equal values)
    pga = 10 ** ((value - 6.59) / 3.17)
    pgv = 10 ** ((value - 9.77) / 3.00)
    got = intensity(pga, pgv)
    assert (got.value, got.degree) == (value, degree)


def test_no_motion_is_intensity_one() -> None:
    assert intensity(0.0, 0.0).value == 1.0


def test_bandpass_design_is_a_bandpass() -> None:
    """Gain 1 (0 dB) in the pass band, −3 dB at the edges, nothing at DC."""
    fs = 250.0
    sos = butter_bandpass(4, 0.1, 10.0, fs)

    def gain(f: float) -> float:
        z = complex(math.cos(2 * math.pi * f / fs), math.sin(2 * math.pi * f / fs))
        h = 1 + 0j
        for b0, b1, b2, a0, a1, a2 in sos:
            h *= (b0 + b1 / z + b2 / z**2) / (a0 + a1 / z + a2 / z**2)
        return abs(h)

    assert gain(1.0) == pytest.approx(1.0, abs=1e-3)
    assert gain(0.1) == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert gain(10.0) == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert gain(0.001) < 1e-6 and gain(60.0) < 1e-3


def test_processor_events_on_the_local_record_fed_in_process() -> None:
    """The whole per-sensor processing on the 200 Hz record: start and end at the
    reference trigger, raw vector peak, and an excerpt even with post_event 0."""
    from agent.seismic import SeismicProcessor
    from drivers.seismic_config import SeismicDevice

    dev = SeismicDevice.model_validate(
        {
            "driver": "seismic",
            "id": "q",
            "serial_port": "/dev/null",
            "sample_rate": 200,
            "channels": [{"name": c} for c in "zne"],
            "pre_event": "1s",
            "post_event": "0s",
        }
    )
    proc = SeismicProcessor(dev)
    outs = []
    for i, sample in enumerate(zip(rjob("z"), rjob("n"), rjob("e"), strict=True)):
        outs += [o for o in proc.feed(sample, 1_000_000 + 5 * i) if o.kind != "summary"]
    kinds = [(o.kind, (o.doc or {}).get("event")) for o in outs]
    assert kinds == [("event", "start"), ("event", "end"), ("waveform", None)]
    start, end, wave = (o.doc or {} for o in outs)
    assert (start["onset_sample"], end["end_sample"]) == (6128, 6719)
    assert end["peak_raw"] == REF["rjob_local_event_200hz"]["vector_peak"]
    assert wave["samples"] == 6719 - (6128 - 200) + 1


def test_gap_ends_the_event_and_warms_up_again() -> None:
    """A gap in the middle of the event: the event ends at the last sample before it,
    the excerpt goes out, and nothing triggers until the long window is full again."""
    from agent.seismic import SeismicProcessor
    from drivers.seismic_config import SeismicDevice

    dev = SeismicDevice.model_validate(
        {
            "driver": "seismic",
            "id": "q",
            "serial_port": "/dev/null",
            "sample_rate": 200,
            "channels": [{"name": "z"}],
            "stalta": "classic",
        }
    )
    proc = SeismicProcessor(dev)
    z = rjob("z")
    outs = []
    for i in range(6300):
        outs += [o for o in proc.feed([z[i]], 5 * i) if o.kind != "summary"]
    assert [(o.doc or {}).get("event") for o in outs] == ["start"]
    assert (outs[0].doc or {})["onset_sample"] == 6128, "classic STA/LTA: [[6128, 6607]]"
    ended = proc.skip(100)
    assert [(o.kind, (o.doc or {}).get("event")) for o in ended] == [
        ("event", "end"),
        ("waveform", None),
    ]
    assert (ended[0].doc or {})["end_sample"] == 6299
    after = []
    for i in range(6400, 12000):  # loud, but the long window (2000 samples) is new
        after += [o for o in proc.feed([z[i]], 5 * i) if o.kind == "event"]
    assert all((o.doc or {})["onset_sample"] >= 6400 + 1999 for o in after), after


# -- invalid samples: never in any state, bridged, flagged ------------------------------------


def non_finite(
    obj: object, path: str = "proc", seen: set[int] | None = None, skip: tuple[str, ...] = ()
) -> list[str]:
    """Where ``obj``'s state (attributes, slots, containers, dataclasses, nested) holds a
    float that is not finite; [] when none does. Attributes named in ``skip`` are left
    out (at any depth)."""
    import collections

    seen = set() if seen is None else seen
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{path} = {obj!r}"]
    if obj is None or isinstance(obj, int | str | bytes | bool | type) or callable(obj):
        return []
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += non_finite(v, f"{path}[{k!r}]", seen, skip)
    elif isinstance(obj, list | tuple | collections.deque | set):
        for k, v in enumerate(obj):
            found += non_finite(v, f"{path}[{k}]", seen, skip)
    else:
        names = list(getattr(obj, "__dict__", {}))
        for cls in type(obj).__mro__:
            names += [s for s in getattr(cls, "__slots__", ()) if hasattr(obj, s)]
        for name in names:
            if not name.startswith("__") and name not in skip:
                found += non_finite(getattr(obj, name), f"{path}.{name}", seen, skip)
    return found


def test_the_state_checker_finds_what_it_looks_for() -> None:
    from agent.seismic import SeismicProcessor

    proc = SeismicProcessor(quake_device())
    assert non_finite(proc) == []
    proc.gm._filters[1].z[0][1] = math.nan
    proc.pre.append(((1.0, math.inf, 2.0), False))
    assert non_finite(proc) == ["proc.gm._filters[1].z[0][1] = nan", "proc.pre[0][0][1] = inf"]


def quake_device(**extra: object) -> object:
    """The RJOB record's three components at 200 Hz, scaled so that its strong motion
    reads as intensity 6–7 (the record is in relative units)."""
    from drivers.seismic_config import SeismicDevice

    return SeismicDevice.model_validate(
        {
            "driver": "seismic",
            "id": "q",
            "serial_port": "/dev/null",
            "sample_rate": 200,
            "channels": [{"name": c, "scale": 3e-4} for c in "zne"],
            "pre_event": "2s",
            "post_event": "2s",
            **extra,
        }
    )


@functools.cache
def clean_frames() -> tuple[list, object]:
    return stream_frames(None)


def stream_frames(bad: tuple[int, int, str] | None, check: bool = False) -> tuple[list, object]:
    """The RJOB record as $SMP frames through the serial reader into the processor; with
    ``bad`` = (sample, channel, text) that frame's count is ``text`` (checksum valid).
    With ``check``, the processor's state is checked after every frame (the sample
    history, ``pre`` and ``_wave``, every 100th frame: each sample stays 400 frames in
    ``pre``, so every one is checked)."""
    from agent.seismic import SeismicProcessor
    from drivers.seismic_stream import SeismicSerialReader
    from drivers.serial_line import nmea_checksum

    dev = quake_device()
    proc = SeismicProcessor(dev)
    outs: list = []
    gaps: list = []
    reader = SeismicSerialReader(
        dev,  # type: ignore[arg-type]
        lambda n, c, ts: outs.extend(proc.feed(c, ts)),
        lambda kind, k, n: gaps.append((kind, k, n)) or outs.extend(proc.skip(k)),
        lambda: 1_000_000,
    )
    reader.asm.synced = True  # as after opening: frames check themselves
    z, n, e = rjob("z"), rjob("n"), rjob("e")
    for i in range(12000):
        fields = [f"{v:g}" for v in (z[i], n[i], e[i])]
        if bad is not None and i == bad[0]:
            fields[bad[1]] = bad[2]
        body = "SMP," + ",".join([str(i), *fields])
        reader.handle(f"${body}*{nmea_checksum(body):02X}\r\n".encode(), i / 200)
        if check:
            history = () if i % 100 == 0 else ("pre", "_wave")
            assert non_finite(proc, skip=history) == [], f"after frame {i}"
    assert gaps == [] and reader.errors == 0
    return outs, reader


def points(out: object) -> dict[str, object]:
    return {r.point: r for r in out.results}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("bad", "label"),
    [
        ((6420, 0, "nan"), "NaN on z in the strongest second"),
        ((6301, 2, "inf"), "Inf on e at the peak"),
        ((6250, 1, "-inf"), "-Inf on n"),
        ((6555, 2, "3000000000"), "beyond ±2^31 on e"),
    ],
)
def test_one_invalid_frame_in_strong_shaking_changes_nothing_later(
    bad: tuple[int, int, str], label: str
) -> None:
    """One frame with a non-finite (or out-of-range) count, valid checksum, in the middle
    of the strong motion of the real record: no state ever holds a non-finite number;
    its second is flagged (measured points null, quality invalid, invalid_samples 1);
    every earlier summary is the clean stream's, every later one within 1 % (PGA, PGV)
    and 0.1 (intensity); the event is the clean stream's, its end and waveform say so."""
    clean, _ = clean_frames()
    got, reader = stream_frames(bad, check=True)
    assert reader.invalid == 1 and reader.samples == 12000
    cs = [points(o) for o in clean if o.kind == "summary"]
    gs = [points(o) for o in got if o.kind == "summary"]
    assert len(cs) == len(gs) == 60
    second = bad[0] // 200
    assert cs[second]["intensity"].value >= 6.0, "strong shaking there"
    for k, (c, g) in enumerate(zip(cs, gs, strict=True)):
        if k < second:
            assert g == c
            continue
        if k == second:
            assert g["invalid_samples"].value == 1 and c["invalid_samples"].value == 0
            for name in ("pga", "pgv", "intensity", "sta_lta", "noise"):
                assert (g[name].value, g[name].quality) == (None, "invalid"), name
                assert "not finite" in (g[name].error or "")
            continue
        assert g["invalid_samples"].value == 0 and g["pga"].quality == "good"
        assert g["pga"].value == pytest.approx(c["pga"].value, rel=0.01), k
        assert g["pgv"].value == pytest.approx(c["pgv"].value, rel=0.01), k
        assert abs(g["intensity"].value - c["intensity"].value) <= 0.1 + 1e-9, k
    later = range(second + 1, 60)
    worst = {
        name: max(abs(gs[k][name].value / cs[k][name].value - 1) for k in later)
        for name in ("pga", "pgv")
    }
    worst["intensity"] = max(
        abs(gs[k]["intensity"].value - cs[k]["intensity"].value) for k in later
    )
    events = [(o.kind, o.doc) for o in got if o.kind != "summary"]
    clean_events = [(o.kind, o.doc) for o in clean if o.kind != "summary"]
    assert [k for k, _ in events] == ["event", "event", "waveform"]
    (_, start), (_, end), (_, wave) = events
    (_, c_start), (_, c_end), (_, c_wave) = clean_events
    assert start == c_start
    assert (end["onset_sample"], end["end_sample"]) == (c_end["onset_sample"], c_end["end_sample"])
    assert end["invalid_samples"] == 1 and c_end["invalid_samples"] == 0
    assert end["pga"] == pytest.approx(c_end["pga"], rel=0.01)
    assert end["pgv"] == pytest.approx(c_end["pgv"], rel=0.01)
    first = end["onset_sample"] - 400  # pre_event 2 s
    assert wave["bridged"] == [[bad[0] - first, 1]] and c_wave["bridged"] == []
    assert wave["samples"] == c_wave["samples"]
    print(
        f"\n{label}: later seconds' worst deviation PGA {worst['pga']:.2e}, "
        f"PGV {worst['pgv']:.2e}, intensity {worst['intensity']:.1f}; event PGV "
        f"{end['pgv'] / c_end['pgv'] - 1:+.2e}"
    )


def test_bridging_a_straight_line_is_exact() -> None:
    """Invalid instants on a ramp are bridged by the straight line: afterwards every
    filter, ratio and peak holds exactly what the clean ramp gives."""
    from agent.seismic import SeismicProcessor

    dev = quake_device(channels=[{"name": "z"}, {"name": "n"}])
    clean, bridged = SeismicProcessor(dev), SeismicProcessor(dev)
    for i in range(400):
        clean.feed([10.0 * i, -4.0 * i], 5 * i)
        c: list[float | None] = [10.0 * i, -4.0 * i]
        if 100 <= i < 103:
            c[0] = math.nan  # three in a row on z
        if i in (101, 104):
            c[1] = None  # and n, overlapping and after
        bridged.feed(c, 5 * i)
    assert bridged.invalid == 4
    assert clean.gm._vel == bridged.gm._vel and clean.gm._prev_a == bridged.gm._prev_a
    assert [f.z for f in clean.gm._filters] == [f.z for f in bridged.gm._filters]
    assert (clean.stalta.sta, clean.stalta.lta) == (bridged.stalta.sta, bridged.stalta.lta)
    assert clean.i == bridged.i == 399


def test_a_long_invalid_run_is_a_gap_and_nothing_before_a_valid_sample_is_bridged() -> None:
    """More than 0.1 s of invalid instants is skipped like a gap (the event ends at the
    last valid sample, STA/LTA warms up again); invalid instants before any valid one
    (at the start, after a gap) are skipped. Both counted and flagged, no state NaN."""
    from agent.seismic import SeismicProcessor

    proc = SeismicProcessor(quake_device())
    z, n, e = rjob("z"), rjob("n"), rjob("e")
    outs = []
    for i in range(12000):
        c: list[float | None] = [z[i], n[i], e[i]]
        if i < 3 or 6400 <= i < 6430 or 6430 <= i < 6432:
            c[1] = math.inf if i % 2 else math.nan
        outs += proc.feed(c, 5 * i)
        assert non_finite(proc, skip=() if i % 100 == 0 else ("pre", "_wave")) == [], i
    assert proc.invalid == 3 + 32
    kinds = [(o.kind, (o.doc or {}).get("event")) for o in outs if o.kind != "summary"]
    assert kinds[:3] == [("event", "start"), ("event", "end"), ("waveform", None)]
    end = next(o.doc for o in outs if o.kind == "event" and (o.doc or {})["event"] == "end")
    # 21 instants waited (0.1 s at 200 Hz is 20): skipped at the 21st, the event ended at
    # the last valid sample, 6399; the 11 after it had nothing valid before them
    assert end["end_sample"] == 6399 and end["invalid_samples"] == 0
    summaries = [points(o) for o in outs if o.kind == "summary"]
    flagged = {
        k: s["invalid_samples"].value for k, s in enumerate(summaries) if s["invalid_samples"].value
    }
    assert sum(flagged.values()) == 35 and 0 in flagged
    assert all(summaries[k]["intensity"].quality == "invalid" for k in flagged)
    # the long window (10 s) starts again after the last skipped instant, 6431 (the
    # summaries' seconds are 35 samples later than the record's from then on)
    after = [s["sta_lta"].value for s in summaries[33:41]]
    assert after == [0.0] * 8 and summaries[42]["sta_lta"].value > 0, "warms up again"


def test_the_trigger_end_after_a_gap_is_counted_from_the_stream() -> None:
    """An event after a gap ends at its own sample (the trigger restarts at the gap and
    counts from there; the processor does not)."""
    from agent.seismic import SeismicProcessor
    from drivers.seismic_config import SeismicDevice

    dev = SeismicDevice.model_validate(
        {
            "driver": "seismic",
            "id": "q",
            "serial_port": "/dev/null",
            "sample_rate": 200,
            "channels": [{"name": "z"}],
            "sta": "200ms",
            "lta": "2s",
        }
    )
    proc = SeismicProcessor(dev)
    z = rjob("z")
    docs = []
    for i in range(12000):
        if i == 3000:
            proc.skip(100)
        if 3000 <= i < 3100:
            continue
        docs += [o.doc or {} for o in proc.feed([z[i]], 5 * i) if o.kind == "event"]
    start, end = docs
    assert start["onset_sample"] == 6128 and end["onset_sample"] == 6128
    assert end["end_sample"] > 6128 and end["duration_s"] > 0, end


def test_intensity_is_never_computed_from_a_missing_value() -> None:
    for pga, pgv in ((math.nan, 0.01), (0.5, math.nan), (math.inf, 0.01), (0.5, -math.inf)):
        with pytest.raises(ValueError, match="finite"):
            intensity(pga, pgv)
