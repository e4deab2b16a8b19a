"""Streaming seismic processing against ObsPy 1.5.1 reference results on real records:
STA/LTA fed sample by sample, triggers, PGA, the 0.1–10 Hz PGA/PGV pipeline and the
GB/T 17742-2020 intensity."""

from __future__ import annotations

import csv
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
    from drivers.seismic_stream import SeismicDevice

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
    from drivers.seismic_stream import SeismicDevice

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
