"""End to end: `edge-agent replay` streams the 200 Hz local-event record through a pty
into the running agent; the platform gets 1 Hz summaries, the event at its onset and at
its end, and the waveform excerpt."""

from __future__ import annotations

import base64
import itertools
import json
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.readings import parse_iso_ms
from drivers.seismic_stream import SampleClock, ascii_frame, datacast_packet, parse_ascii_frame
from drivers.serial_line import LineError
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    Shake,
    Subscriber,
    assert_all_delivered,
    free_port,
    start_line,
    wait_until,
    write_config,
)

DATA = Path(__file__).parent / "data" / "seismic"
REF = json.loads((DATA / "reference_values.json").read_text())["rjob_local_event_200hz"]


def test_frames_and_sample_clock() -> None:
    frame = ascii_frame(41, [12.5, -3, 7])
    assert frame == b"$SMP,41,12.5,-3,7*" + frame[18:20] + b"\r\n"
    assert parse_ascii_frame(frame, 3) == (41, [12.5, -3.0, 7.0])
    bad = frame.replace(b"12.5", b"12.6")
    for wrong, message in ((bad, "checksum error"), (frame, "2 channel")):
        try:
            parse_ascii_frame(wrong, 3 if wrong is bad else 2)
        except LineError as exc:
            assert message in str(exc) or "channel(s), expected 2" in str(exc)
        else:
            raise AssertionError("accepted")
    clock = SampleClock()
    seen = [clock.feed(n) for n in (2**32 - 2, 2**32 - 1, 0, 1, 5, 5, 3, 6)]
    assert seen == [
        ("first", 0),
        ("ok", 0),
        ("ok", 0),  # the counter wraps
        ("ok", 0),
        ("gap", 3),
        ("overlap", 0),
        ("overlap", 2),
        ("ok", 0),
    ]


def test_replayed_earthquake_end_to_end(tmp_path: Path, broker: Mosquitto) -> None:
    sensor, agent_tty = str(tmp_path / "sensor"), str(tmp_path / "agent-tty")
    line = start_line(sensor, agent_tty)
    devices = (
        f"  - id: quake-1\n    driver: seismic\n    serial_port: {agent_tty}\n"
        "    sample_rate: 200\n    channels: [{name: z}, {name: n}, {name: e}]\n"
        "    sta: 500ms\n    lta: 10s\n    trigger_on: 3.0\n    trigger_off: 1.5\n"
        "    pre_event: 2s\n    post_event: 2s\n"
    )
    # intensity thresholds drive alarms like any point (the record is in relative units,
    # so its "intensity" here is only a number to compare)
    alarms = (
        "alarms:\n  - {id: strong-shaking, device: quake-1, point: intensity, kind: high,"
        " setpoint: 6, severity: critical}\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices, tail=alarms)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: "quake-1: " in agent.log() and "open" in agent.log(), 15, "port open")
    files = [str(DATA / f"loc_RJOB20050801145719850.{c}") for c in "zne"]
    replay = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "replay",
            *files,
            "--to",
            sensor,
            "--rate",
            "200",
            "--speed",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    assert "sent 12000 samples" in replay.stderr

    def waveform() -> list[dict]:
        return [m.json() for m in sub.messages if "/waveform/" in m.topic]

    wait_until(waveform, 15, "the waveform excerpt")
    wait_until(lambda: len(sub.telemetry()) >= 59, 15, "the last summaries")
    assert agent.stop() == 0, agent.log()
    line.terminate()
    line.wait(5)
    assert_all_delivered(sub, tmp_path / "state")
    events = [m.json() for m in sub.messages if "/events/quake-1" in m.topic]
    alarm = [e for e in events if e["type"] == "alarm"]
    assert alarm and alarm[0]["rule"] == "strong-shaking" and alarm[0]["event"] == "raise"
    start, end = [e for e in events if e["type"] == "seismic"]
    # the onset: sample 6128 (30.640 s), announced by the message of that very sample
    assert (start["event"], start["onset_sample"], start["delay_s"]) == ("start", 6128, 0.0)
    assert start["sta_lta"] == REF["z_recursive_sta_lta_nsta100_nlta2000"]["values_at"]["6128"]
    assert start["trigger_channel"] == "z" and start["type"] == "seismic"
    # the end: [[6128, 6719]], with the record's peaks
    assert (end["event"], end["onset_sample"], end["end_sample"]) == ("end", 6128, 6719)
    assert end["duration_s"] == (6719 - 6128) / 200
    assert end["peak_sta_lta"] == REF["z_recursive_sta_lta_nsta100_nlta2000"]["max"]
    assert (
        end["peak_raw"] == REF["vector_peak"] and end["peak_raw_sample"] == REF["vector_peak_index"]
    )
    assert end["onset"] == start["onset"] and end["onset"].endswith("Z")
    # 1 Hz summaries all along, no gap
    summaries = [m.json()["points"] for m in sub.telemetry()]
    assert 59 <= len(summaries) <= 61, len(summaries)
    assert all(p["gap_samples"]["value"] == 0 for p in summaries)
    assert max(p["sta_lta"]["value"] for p in summaries) > 3.0
    assert {"pga", "pgv", "intensity", "noise"} <= set(summaries[0])
    # the waveform: 2 s before the onset to 2 s after the end, the record's own counts
    (wave,) = waveform()
    assert wave["channels"] == ["z", "n", "e"] and wave["sample_rate"] == 200.0
    first = 6128 - 400
    assert wave["samples"] == (6719 + 400) - first + 1
    counts = struct.unpack(f"<{wave['samples'] * 3}f", base64.b64decode(wave["data"]))
    z = [float(v) for v in (DATA / "loc_RJOB20050801145719850.z").read_text().split()]
    assert counts[0] == struct.unpack("<f", struct.pack("<f", z[first]))[0]
    assert "gap" not in agent.log().lower().replace("gap_samples", "")


def test_datacast_packets_are_aligned_across_channels() -> None:
    from drivers.seismic_stream import ChannelAligner, datacast_packet, parse_datacast

    assert parse_datacast(b"{'EHZ', 1507760140.530, 614, 813, -2}") == (
        "EHZ",
        1507760140.53,
        [614, 813, -2],
    )
    t = 1507760150.25
    assert parse_datacast(datacast_packet("ENN", t, [1, 2])) == ("ENN", t, [1, 2])
    al = ChannelAligner(["EHZ", "ENN"], rate=4.0)
    got: list[tuple[int, list[float]]] = []
    gaps: list[tuple[str, int, int]] = []

    def feed(ch: str, t: float, counts: list[int]) -> None:
        for kind, a, b in al.feed(ch, t, counts):
            if kind == "sample":
                got.append((a, b))
            else:
                gaps.append((kind, a, b))

    feed("EHZ", 100.0, [1, 2, 3, 4])  # waits for ENN
    assert got == []
    feed("ENN", 100.0, [10, 20, 30, 40])
    assert got == [(0, [1.0, 10.0]), (1, [2.0, 20.0]), (2, [3.0, 30.0]), (3, [4.0, 40.0])]
    feed("ENN", 102.0, [50])  # 1 s missing on both channels: a gap of 4 samples
    feed("EHZ", 102.0, [5])
    assert gaps == [("gap", 4, 8)] and got[-1] == (8, [5.0, 50.0])
    feed("EHZ", 101.0, [9])  # from the past: dropped
    assert gaps[-1] == ("overlap", 1, 4)


def test_datacast_over_udp_into_the_processor() -> None:
    """The UDP reader on a real socket, fed by `edge-agent replay --to udp://`: the
    local-event record triggers at sample 6128 as over the serial line."""
    import asyncio
    import socket

    from agent.readings import now_ms
    from agent.seismic import SeismicProcessor
    from drivers.seismic_config import SeismicDevice
    from drivers.seismic_stream import SeismicUdpReader

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dev = SeismicDevice.model_validate(
        {
            "driver": "seismic",
            "id": "shake",
            "udp_port": port,
            "udp_host": "127.0.0.1",
            "format": "datacast",
            "sample_rate": 200,
            "channels": [{"name": "EHZ"}, {"name": "ENN"}, {"name": "ENE"}],
        }
    )
    proc = SeismicProcessor(dev)
    events: list[dict] = []
    gaps: list[tuple[str, int, int]] = []

    def on_sample(n: int, counts: list[float], ts: int) -> None:
        events.extend(o.doc or {} for o in proc.feed(counts, ts) if o.kind == "event")

    async def run() -> SeismicUdpReader:
        reader = SeismicUdpReader(dev, on_sample, lambda *g: gaps.append(g), now_ms)
        task = asyncio.create_task(reader.run())
        await asyncio.sleep(0.2)
        files = [str(DATA / f"loc_RJOB20050801145719850.{c}") for c in "zne"]
        replay = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent",
            "replay",
            *files,
            "--to",
            f"udp://127.0.0.1:{port}",
            "--rate",
            "200",
            "--speed",
            "20",
        )
        assert await replay.wait() == 0
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return reader

    reader = asyncio.run(run())
    assert reader.samples == 12000 and reader.errors == 0 and gaps == []
    assert [(e["event"], e["onset_sample"]) for e in events] == [("start", 6128), ("end", 6128)]
    assert events[1]["end_sample"] == 6719


def test_forged_datagrams_cost_the_running_agent_no_genuine_sample(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A sensor whose clock is 10 min behind the gateway's (synchronised) clock streams
    datacast into the agent. A datagram from its address stamped with the gateway's time
    (plausible, 10 min ahead of the stream) is dropped as ``time_jump``: no gap, no
    overlap, summaries a second apart at the gateway's time. While the sensor pauses,
    7 s of packets stamped a day back are not followed (``time_base``). Every genuine
    sample instant is taken."""
    port = free_port()
    devices = (
        f"  - id: shake\n    driver: seismic\n    format: datacast\n    udp_port: {port}\n"
        "    udp_senders: [127.0.0.1]\n    sample_rate: 100\n"
        "    channels: [{name: EHZ}, {name: ENN}, {name: ENE}]\n"
    )
    cfg = write_config(
        tmp_path / "agent.yaml", broker.port, devices, tail="clock: {sync: assume}\n"
    )
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: "listening for datacast" in agent.log(), 15, "the datacast socket")
    sensor = Shake(port, ("EHZ", "ENN", "ENE"), 100, offset=-600.0)

    def summaries() -> list[dict]:
        return [m.json() for m in sub.telemetry() if m.topic.endswith("/shake")]

    try:
        wait_until(lambda: len(summaries()) >= 3, 15, "summaries")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(datacast_packet("ENN", time.time(), [9] * 25), ("127.0.0.1", port))
            wait_until(lambda: len(summaries()) >= 8, 15, "summaries after the forged datagram")
            sensor.paused.set()
            time.sleep(0.5)
            day_back = time.time() - 86400
            for k in range(28):
                for ch in ("EHZ", "ENN", "ENE"):
                    stamp = day_back + k / 4
                    s.sendto(datacast_packet(ch, stamp, [7] * 25), ("127.0.0.1", port))
            time.sleep(0.5)
            sensor.paused.clear()
            n = len(summaries())
            wait_until(lambda: len(summaries()) >= n + 3, 15, "summaries after the pause")
    finally:
        sensor.stop()
    time.sleep(0.5)
    assert agent.stop() == 0, agent.log()
    log = agent.log()
    assert_all_delivered(sub, tmp_path / "state")
    got = summaries()
    times = [parse_iso_ms(d["ts"]) for d in got]
    gaps = [d["points"]["gap_samples"]["value"] for d in got]
    # through the forged datagram: whole seconds, one after another, at the gateway's time
    assert set(gaps[:8]) == {0}, gaps
    assert all(b - a == 1000 for a, b in itertools.pairwise(times[:8])), times
    assert abs(times[-1] - time.time() * 1000) < 5000, got[-1]["ts"]
    report = re.search(
        r"device shake: (\d+) sample instant\(s\) taken; dropped bad input: (.*?); "
        r"(\d+) gap\(s\) of (\d+) sample\(s\) skipped, (\d+) sample\(s\) of overlaps",
        log,
    )
    assert report is not None, log[-2000:]
    taken, dropped_text, n_gaps, gap_samples, overlaps = report.groups()
    assert int(taken) == sensor.sent * 25, (taken, sensor.sent)
    dropped = dict(kv.split(" ") for kv in dropped_text.split(", "))
    assert dropped == {"time_jump": "1", "time_base": str(3 * (28 - 19))}, dropped
    assert int(overlaps) == 3 * 19 * 25, "the day-back packets before the run was judged"
    assert n_gaps == "1" and 0 < int(gap_samples) == sum(gaps) <= 150, "the pause only"
    assert "Traceback" not in log


def test_invalid_frames_in_the_running_agent_keep_the_intensity_alarm(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """`edge-agent replay` streams the record with one frame whose z count is NaN (in the
    second after the intensity alarm rose) and one whose e count is infinite (the second
    after): those two summaries are flagged (measured points null, quality invalid,
    invalid_samples 1), every other one is the clean stream's (computed here in process)
    within 1 % (PGA, PGV) and 0.1 (intensity); the alarm rises once and clears once, at
    the seconds the clean stream gives, never at a flagged one."""
    from tests.test_seismic import clean_frames, points

    setpoint, clear = 5.5, 5.0
    clean_summaries = [points(o) for o in clean_frames()[0] if o.kind == "summary"]
    clean_i = [s["intensity"].value for s in clean_summaries]
    rise = next(k for k, v in enumerate(clean_i) if v >= setpoint)
    fall = next(k for k in range(rise, 60) if clean_i[k] < clear)
    nan_at, inf_at = (rise + 1) * 200 + 20, (rise + 2) * 200 + 100  # samples 6420, 6700
    assert fall > rise + 3, "the alarm is active through both"
    files = []
    for c, bad in (("z", (nan_at, "nan")), ("n", None), ("e", (inf_at, "inf"))):
        values = (DATA / f"loc_RJOB20050801145719850.{c}").read_text().split()
        if bad is not None:
            values[bad[0]] = bad[1]
        (tmp_path / c).write_text("\n".join(values) + "\n")
        files.append(str(tmp_path / c))
    sensor, agent_tty = str(tmp_path / "sensor"), str(tmp_path / "agent-tty")
    line = start_line(sensor, agent_tty)
    devices = (
        f"  - id: quake-1\n    driver: seismic\n    serial_port: {agent_tty}\n"
        "    sample_rate: 200\n"
        "    channels: [{name: z, scale: 3e-4}, {name: n, scale: 3e-4}, {name: e, scale: 3e-4}]\n"
        "    pre_event: 2s\n    post_event: 2s\n"
    )
    alarms = (
        "alarms:\n  - {id: strong-shaking, device: quake-1, point: intensity, kind: high,"
        f" setpoint: {setpoint}, deadband: {setpoint - clear}, severity: critical}}\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices, tail=alarms)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: "quake-1: " in agent.log() and "open" in agent.log(), 15, "port open")
    command = [sys.executable, "-m", "agent", "replay", *files, "--to", sensor]
    replay = subprocess.run(
        [*command, "--rate", "200", "--speed", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    wait_until(lambda: len(sub.telemetry()) >= 60, 15, "the last summaries")
    assert agent.stop() == 0, agent.log()
    line.terminate()
    line.wait(5)
    assert_all_delivered(sub, tmp_path / "state")
    telemetry = [m.json() for m in sub.telemetry()]
    got = [t["points"] for t in telemetry]
    assert len(got) == 60, len(got)
    flagged = [k for k, p in enumerate(got) if p["invalid_samples"]["value"]]
    assert flagged == [rise + 1, rise + 2]
    for k, (p, c) in enumerate(zip(got, clean_summaries, strict=True)):
        if k in flagged:
            assert p["invalid_samples"]["value"] == 1
            for name in ("pga", "pgv", "intensity", "sta_lta", "noise"):
                assert p[name]["value"] is None and p[name]["quality"] == "invalid", (k, name)
            continue
        assert p["pga"]["value"] == pytest.approx(c["pga"].value, rel=0.01), k
        assert p["pgv"]["value"] == pytest.approx(c["pgv"].value, rel=0.01), k
        assert abs(p["intensity"]["value"] - c["intensity"].value) <= 0.1 + 1e-9, k
    events = [m.json() for m in sub.messages if "/events/quake-1" in m.topic]
    alarm = [e for e in events if e["type"] == "alarm"]
    assert [(e["event"], e["quality"]) for e in alarm] == [("raise", "good"), ("clear", "good")]
    assert alarm[0]["ts"] == telemetry[rise]["ts"] and alarm[1]["ts"] == telemetry[fall]["ts"]
    end = next(e for e in events if e["type"] == "seismic" and e["event"] == "end")
    assert end["invalid_samples"] == 2
    (wave,) = [m.json() for m in sub.messages if "/waveform/" in m.topic]
    first = end["onset_sample"] - 400
    assert wave["bridged"] == [[nan_at - first, 1], [inf_at - first, 1]]
    log = agent.log()
    assert "z not a finite count" in log and "2 sample instant(s) with an invalid count" in log


def test_replay_sends_nan_and_inf_counts_over_datacast(tmp_path: Path) -> None:
    """`edge-agent replay --to udp://` sends a record's NaN and infinite values as such
    (as a faulty sensor would), and the parser takes them as invalid counts."""
    from drivers.seismic_stream import parse_datacast

    record = tmp_path / "z.txt"
    record.write_text("1\n2\nnan\n4\n-inf\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        replay = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "replay",
                str(record),
                "--rate",
                "20",
                "--to",
                f"udp://127.0.0.1:{s.getsockname()[1]}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert replay.returncode == 0, replay.stderr
        packet = s.recv(2000)
    assert parse_datacast(packet)[2] == [1, 2, None, 4, None]
