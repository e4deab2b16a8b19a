"""Hostile input stopped at the edge: the pure parts that bound memory and time (line
assembly, port queue, frame and datagram parsers, the sample clock, the channel aligner)
and the Modbus connections against flooding peers on real sockets and pseudo-terminals.

The whole agent against the same peers: ``tests/test_hostile_peers.py``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.modbus.line import RX_LIMIT as LINE_LIMIT
from drivers.modbus.line import FrameError, SerialLine, crc16
from drivers.modbus.tcp import MAX_STALE, MbapClient
from drivers.modbus.tcp import RX_LIMIT as MBAP_LIMIT
from drivers.seismic_config import SeismicDevice
from drivers.seismic_stream import (
    MAX_AHEAD_S,
    ChannelAligner,
    InputError,
    SampleClock,
    SeismicUdpReader,
    ascii_frame,
    datacast_packet,
    parse_ascii_frame,
    parse_datacast,
)
from drivers.serial_config import SerialLineDevice
from drivers.serial_io import GET_MAX, PortQueue
from drivers.serial_line import LineAssembler, SerialLineReader, to_results
from tests.helpers import TcpPeer

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- text lines -------------------------------------------------------------------------------


def reference_lines(stream: bytes, term: bytes, max_line: int) -> list[bytes]:
    """What a line assembler must give for ``stream`` fed from the start of a port: the
    complete lines, less the first (perhaps partial) one and those over ``max_line``."""
    parts = stream.split(term)[1:-1]
    out = [p[:-1] if term == b"\n" and p.endswith(b"\r") else p for p in parts]
    return [p for p in out if len(p) <= max_line]


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [b"a", b"bb", b"\r", b"\n", b"\r\n", b"x" * 40, b"y" * 9, b";", b"<-", b">"]
        ),
        max_size=60,
    ),
    st.lists(st.integers(1, 30), min_size=1, max_size=20),
    st.sampled_from([b"\n", b"\r\n", b"\r", b";", b"<->"]),
)
def test_lines_are_the_same_however_the_reads_fall(
    pieces: list[bytes], cuts: list[int], term: bytes
) -> None:
    stream = b"".join(pieces)
    asm = LineAssembler(term, max_line=16)
    got: list[bytes] = []
    pos, i = 0, 0
    while pos < len(stream):
        chunk = stream[pos : pos + cuts[i % len(cuts)]]
        pos, i = pos + len(chunk), i + 1
        lines, _ = asm.feed(chunk)
        got += lines
        assert len(asm.buf) <= 16 + len(term)
    assert got == reference_lines(stream, term, 16)


@pytest.mark.parametrize(
    ("reads", "lines", "too_long"),
    [
        # 10 MB without a line end in one read, then the end of it and a good line
        ([b"ok=0\n", b"x" * 10_000_000, b"\nok=1\n"], [b"ok=1"], 1),
        # the same 10 MB in 1 KB reads
        ([b"ok=0\n", *[b"x" * 1024] * 10_000, b"\nok=1\n"], [b"ok=1"], 1),
        # an over-long line with its line end in the same read as what follows
        ([b"ok=0\n", b"y" * 5000 + b"\nok=2\n"], [b"ok=2"], 1),
        # the line end of an over-long line split across two reads
        ([b"ok=0\r\n", b"z" * 3000 + b"\r", b"\nok=3\r\n"], [b"ok=3"], 1),
        # the first (partial) line is long: dropped, and the next one is taken
        ([b"w" * 9000, b"\nok=4\n"], [b"ok=4"], 0),
        # exactly max_line bytes with its two-byte line end split
        ([b"ok=0\r\n", b"q" * 512 + b"\r", b"\n"], [b"q" * 512], 0),
    ],
)
def test_an_overlong_line_costs_no_more_than_max_line(
    reads: list[bytes], lines: list[bytes], too_long: int
) -> None:
    term = b"\r\n" if reads[0].endswith(b"\r\n") else b"\n"
    peaks = []
    # tracemalloc counts every thread of the process: a thread left by an earlier test may
    # allocate during one try, but a copy of a read would show in every try
    for _ in range(3):
        asm = LineAssembler(term, max_line=512)
        got: list[bytes] = []
        tracemalloc.start()
        try:
            for data in reads:
                got += asm.feed(data)[0]
                assert len(asm.buf) <= 512 + len(term)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got == lines and asm.too_long == too_long
        peaks.append(peak)
    # a line is copied only once it is known to fit: about max_line bytes, never a read
    assert min(peaks) < 4096, f"{peaks} bytes allocated while cutting lines"


def test_fields_that_are_not_finite_or_too_large_are_bad_quality() -> None:
    dev = SerialLineDevice.model_validate(
        {
            "driver": "serial_line",
            "id": "g",
            "serial_port": "/dev/null",
            "parser": {"kind": "kv"},
            "points": [
                {"name": "a"},
                {"name": "b"},
                {"name": "c", "type": "int", "scale": 0.5},
                {"name": "d", "decimals": 2},
                {"name": "e", "type": "int"},
            ],
        }
    )
    fields = {"a": "nan", "b": "-inf", "c": "9" * 400, "d": "1e999", "e": "12"}
    got = {r.point: (r.quality, r.value) for r in to_results(fields, dev.points)}
    assert got == {
        "a": ("nan", None),
        "b": ("inf", None),
        "c": ("decode_error", None),
        "d": ("inf", None),
        "e": ("good", 12),
    }


# -- the port queue -----------------------------------------------------------------------------


def test_port_queue_holds_at_most_its_limit() -> None:
    async def run() -> None:
        q = PortQueue(limit=4096)
        for i in range(10_000):  # 10 MB nobody reads
            q.data_received(bytes([i % 256]) * 1024)
            assert q.queued <= 4096
        assert q.dropped == 10_000 * 1024 - 4096
        assert q.take_lost() == q.dropped and q.take_lost() == 0
        data = await q.get()
        assert data == b"".join(bytes([i % 256]) * 1024 for i in range(9996, 10_000))
        big = PortQueue()
        for i in range(10):  # handed over at most GET_MAX bytes at a time, whole reads
            big.data_received(bytes([i]) * 1024)
        first = await big.get()
        assert first is not None and len(first) == GET_MAX == 8 * 1024
        assert await big.get() == b"\x08" * 1024 + b"\x09" * 1024 and big.queued == 0
        q.data_received(b"x" * 10_000)  # one read larger than the limit: its newest bytes
        assert await q.get() == b"x" * 4096 and q.take_lost() == 10_000 - 4096
        q.data_received(b"tail")
        q.connection_lost(None)
        assert await q.get() == b"tail"
        assert await q.get() is None
        assert not q.discard()

    asyncio.run(run())


def test_request_mode_reader_survives_10_mb_without_a_line_end(
    line: tuple[str, str],
) -> None:
    """A sensor asked every 300 ms sends 10 MB without a line end, then answers properly
    again: the reader's memory stays bounded, the answers in between are bad quality, and
    the first proper answer afterwards is a good reading."""
    far, agent_end = line
    dev = SerialLineDevice.model_validate(
        {
            "driver": "serial_line",
            "id": "gauge",
            "serial_port": agent_end,
            "request": "READ\n",
            "poll_interval": "300ms",
            "timeout": "200ms",
            "parser": {"kind": "kv"},
            "points": [{"name": "level"}],
        }
    )
    readings: list[Any] = []
    flooded = threading.Event()

    def sensor() -> None:
        fd = os.open(far, os.O_RDWR | os.O_NOCTTY)
        try:
            junk = b"x" * 65536
            left = 10_000_000
            while left > 0:
                left -= os.write(fd, junk[: min(left, len(junk))])
            os.write(fd, b"\n")
            flooded.set()
            end = time.monotonic() + 5
            while time.monotonic() < end:  # answer each request
                if b"READ" in os.read(fd, 4096):
                    os.write(fd, b"level=3.0\n")
        except OSError:
            pass  # the reader closed its end
        finally:
            os.close(fd)

    async def run() -> SerialLineReader:
        reader = SerialLineReader(dev, lambda d, ts, r: readings.append(r[0]), lambda: 0)
        task = asyncio.create_task(reader.run())
        threading.Thread(target=sensor, daemon=True).start()
        tracemalloc.start()
        try:
            deadline = time.monotonic() + 30
            while not any(r.value == 3.0 for r in readings):
                assert time.monotonic() < deadline, "no good reading after the flood"
                await asyncio.sleep(0.05)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert peak < 2_000_000, f"{peak} bytes held while 10 MB came"
        return reader

    reader = asyncio.run(run())
    assert flooded.is_set()
    bad = {r.quality for r in readings if r.value is None}
    assert bad <= {"timeout", "frame_error"} and bad, readings[:5]
    assert reader.errors >= 1


# -- seismic frames and datagrams ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "outcome"),
    [
        ("1,2,3", [1.0, 2.0, 3.0]),
        ("nan,2,3", [None, 2.0, 3.0]),
        ("1,inf,3", [1.0, None, 3.0]),
        ("1,2,-inf", [1.0, 2.0, None]),
        ("1e400,2,3", [None, 2.0, 3.0]),
        ("3000000000,2,3", [None, 2.0, 3.0]),
        ("NaN,-Infinity,2147483648", [None, None, 2147483648.0]),
        ("1,2,0x10", "value"),
        ("1,2", "format"),
    ],
)
def test_smp_frames_mark_counts_that_are_not_finite(
    counts: str, outcome: list[float | None] | str
) -> None:
    """A count that is a number but not a finite one within ±2^31 is None (the instant
    is kept, invalid); text that is no number drops the frame."""
    from drivers.serial_line import nmea_checksum

    body = f"SMP,7,{counts}"
    frame = f"${body}*{nmea_checksum(body):02X}\r\n".encode()
    if isinstance(outcome, list):
        assert parse_ascii_frame(frame, 3) == (7, outcome)
        return
    with pytest.raises(InputError) as err:
        parse_ascii_frame(frame, 3)
    assert err.value.reason == outcome


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"{'EHZ', 1800000000.250, 1, -2, 3}", None),
        (b"{'EHZ', nan, 1, 2}", "time"),
        (b"{'EHZ', inf, 1, 2}", "time"),
        (b"{'EHZ', -inf, 1, 2}", "time"),
        (b"{'EHZ', 1e308, 1, 2}", "time"),
        (b"{'EHZ', 5.0, 1, 2}", "time"),
        (b"{'EHZ', 1800000000, nan, 2}", [None, 2]),
        (b"{'EHZ', 1800000000, inf, 2}", [None, 2]),
        (b"{'EHZ', 1800000000, -Infinity, 1e999}", [None, None]),
        (b"{'EHZ', 1800000000, 1.5, 2}", "value"),
        (b"{'EHZ', 1800000000, 1e3, 2}", "value"),
        (b"{'EHZ', 1800000000, 1_000, 2}", "value"),
        (b"{'EHZ', 1800000000, 0x10, 2}", "value"),
        (b"{'EHZ', 1800000000, 99999999999, 2}", [None, 2]),
        (b"{'EHZ', 1800000000, 2147483649, 2}", [None, 2]),
        (b"{'EHZ', 1800000000, " + b", ".join([b"1"] * 1000) + b"}", "samples"),
        (b"{'EHZ', 1800000000}", "format"),
        (b"{'EHZ', later, 1}", "format"),
        (b"{'', 1800000000, 1}", "format"),
        (b"\xff\xfe{", "format"),
        (b"", "format"),
    ],
)
def test_datacast_parser_reasons(packet: bytes, reason: str | list[int | None] | None) -> None:
    if reason is None:
        assert parse_datacast(packet, 400) == ("EHZ", 1800000000.25, [1, -2, 3])
        return
    if isinstance(reason, list):  # NaN, ±inf, beyond ±2^31: invalid counts, kept as None
        assert parse_datacast(packet, 400) == ("EHZ", 1800000000.0, reason)
        return
    with pytest.raises(InputError) as err:
        parse_datacast(packet, 400)
    assert err.value.reason == reason


def shake(**extra: Any) -> SeismicDevice:
    return SeismicDevice.model_validate(
        {
            "driver": "seismic",
            "id": "shake",
            "udp_port": 18001,
            "format": "datacast",
            "sample_rate": 100,
            "channels": [{"name": "EHZ"}, {"name": "ENN"}],
            **extra,
        }
    )


class Collect:
    """A datacast reader whose samples and gaps are kept, on settable wall and monotonic
    clocks and a settable trust in the wall clock."""

    def __init__(self, dev: SeismicDevice) -> None:
        self.samples: list[tuple[int, list[float]]] = []
        self.gaps: list[tuple[str, int, int]] = []
        self.now = NOW
        self.mono = 100.0
        self.synced = False
        self.reader = SeismicUdpReader(
            dev,
            lambda n, c, ts: self.samples.append((n, c)),
            lambda *g: self.gaps.append(g),
            lambda: round(self.now * 1000),
            lambda: self.synced,
            lambda: self.mono,
        )

    def second(self, t: float, sender: str | None = "127.0.0.1") -> None:
        """One second of genuine packets (4 per channel) starting at ``t``."""
        for k in range(4):
            for ch in ("EHZ", "ENN"):
                self.reader.handle(datacast_packet(ch, t + k / 4, [k] * 25), sender)


def test_every_bad_datagram_is_dropped_counted_and_the_input_goes_on() -> None:
    c = Collect(shake(udp_senders=["127.0.0.1", "10.1.2.0/24"]))
    c.second(NOW - 2)
    assert len(c.samples) == 100
    bad = [
        (b"{'EHZ', nan, 1, 2}", "127.0.0.1", "time"),
        (datacast_packet("EHZ", NOW + MAX_AHEAD_S + 1, [1, 2]), "127.0.0.1", "ahead"),
        (datacast_packet("EHZ", NOW + 1e6, [1] * 50), "127.0.0.1", "ahead"),
        (datacast_packet("XYZ", NOW - 1, [1, 2]), "127.0.0.1", "channel"),
        (b"{'EHZ', 1800000000, " + b", ".join([b"1"] * 20000) + b"}", "127.0.0.1", "size"),
        (b"{'EHZ', 1800000000, " + b", ".join([b"1"] * 201) + b"}", "127.0.0.1", "samples"),
        (b"{'EHZ', 1800000000, 0x10}", "127.0.0.1", "value"),
        (datacast_packet("EHZ", NOW - 1, [1, 2]), "127.0.0.2", "sender"),
        (datacast_packet("EHZ", NOW - 1, [1, 2]), "10.1.3.1", "sender"),
        (datacast_packet("EHZ", NOW - 1, [1, 2]), "not an address", "sender"),
        (b"garbage", "127.0.0.1", "format"),
    ]
    for packet, sender, _ in bad:
        c.reader.handle(packet, sender)
    assert dict(c.reader.dropped) == {
        "time": 1,
        "ahead": 2,
        "channel": 1,
        "size": 1,
        "samples": 1,
        "value": 1,
        "sender": 3,
        "format": 1,
    }
    assert c.reader.errors == len(bad)
    c.second(NOW - 1, "::ffff:10.1.2.7")  # an allowed sender over IPv6, mapped
    assert len(c.samples) == 200 and c.gaps == []


def test_a_datagram_with_nan_counts_keeps_its_instants_as_invalid() -> None:
    """A datacast packet whose counts include nan, inf and one beyond ±2^31: nothing is
    dropped, no gap; those instants come out with None on that channel, counted."""
    c = Collect(shake())
    c.second(NOW - 2)
    t = NOW - 1
    c.reader.handle(b"{'EHZ', %.3f, 1, nan, 3, inf, 2147483649, 6}" % t, "127.0.0.1")
    c.reader.handle(datacast_packet("ENN", t, [7, 8, 9, 10, 11, 12]), "127.0.0.1")
    got = c.samples[100:]
    assert [s[1] for s in got] == [
        [1.0, 7.0],
        [None, 8.0],
        [3.0, 9.0],
        [None, 10.0],
        [None, 11.0],
        [6.0, 12.0],
    ]
    assert c.reader.invalid == 3 and c.reader.errors == 0 and c.gaps == []


def test_a_fault_while_handling_a_datagram_is_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c = Collect(shake())

    def broken(*args: Any) -> list[Any]:
        raise ValueError("cannot convert float NaN to integer")

    c.reader.aligner.feed = broken  # type: ignore[method-assign]
    for _ in range(100):
        c.reader.handle(datacast_packet("EHZ", NOW - 1, [1]), "127.0.0.1")
    assert c.reader.dropped["internal"] == 100
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, "one traceback, not one per datagram"
    assert sum("dropped bad input" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("yaml", "problem"),
    [
        ("udp_host: 0.0.0.0\n", "name the sensors that may send with udp_senders"),
        ("udp_host: 192.168.1.10\n", "name the sensors that may send with udp_senders"),
        ("udp_host: sensor.local\n", "is not an IP address of this gateway"),
        ("udp_host: 0.0.0.0\n    udp_senders: [192.168.1.300]\n", "is not an IP address"),
        ("udp_host: 0.0.0.0\n    udp_senders: [192.168.1.50, 10.0.0.0/8]\n", None),
        ("udp_senders: [127.0.0.1]\n", None),
        ("", None),
    ],
)
def test_listening_beyond_loopback_needs_udp_senders(
    tmp_path: Path, yaml: str, problem: str | None
) -> None:
    from agent.config.loader import ConfigError, load_config

    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "version: 1\ngateway_id: gw\n"
        f"state_dir: {tmp_path}\nmqtt: {{host: 127.0.0.1}}\ndevices:\n"
        "  - id: shake\n    driver: seismic\n    format: datacast\n    udp_port: 8888\n"
        f"    sample_rate: 100\n    channels: [{{name: EHZ}}]\n    {yaml}"
    )
    if problem is None:
        dev = load_config(cfg).devices[0]
        assert isinstance(dev, SeismicDevice)
        assert dev.udp_host in ("127.0.0.1", "0.0.0.0")
        return
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    text = "\n".join(str(i) for i in err.value.issues)
    assert problem in text, text
    assert re.match(rf"{cfg}:1[23]:\d+: devices\[0\]\.udp_(host|senders)", text), text


# -- the sample clock (serial counters) ----------------------------------------------------------


def test_a_counter_jump_the_time_cannot_explain_is_dropped() -> None:
    clock = SampleClock(rate=100)
    assert clock.feed(10, 0.0) == ("first", 0)
    assert clock.feed(11, 0.01) == ("ok", 0)
    assert clock.feed(2**31 - 5, 0.02) == ("jump", 2**31 - 17)  # 248 days ahead
    assert clock.feed(12, 0.02) == ("ok", 0)
    assert clock.feed(112, 1.02) == ("gap", 99)  # a second lost on the line
    assert clock.feed(2**32 - 1, 1.03)[0] == "overlap"  # from the past
    assert clock.feed(113, 1.03) == ("ok", 0)


def test_a_sensor_whose_counter_starts_again_is_followed() -> None:
    clock = SampleClock(rate=100)
    for i in range(500):
        clock.feed(1_000_000 + i, i / 100)
    got = [clock.feed(i, 10.0 + i / 100) for i in range(150)]  # restarted 5 s later
    assert got[:99] == [("overlap", 1_000_499 - i) for i in range(99)]
    kind, missing = got[99]
    assert kind == "gap" and missing == round((10.99 - 4.99) * 100) - 1
    assert got[100:] == [("ok", 0)] * 50


@FUZZ
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(1, 400),
    st.integers(0, 2**32 - 1),
)
def test_one_bad_counter_costs_at_most_a_second_of_samples(
    start: int, bad: int, where: int, length_seed: int
) -> None:
    clock = SampleClock(rate=100)
    n = 600
    taken = 0
    for i in range(n):
        if i == where:
            clock.feed(bad, i / 100)
        kind, _ = clock.feed((start + i) % 2**32, i / 100)
        taken += kind in ("first", "ok", "gap")
    assert taken >= n - clock.rebase_after - 1
    assert clock.last == (start + n - 1) % 2**32


# -- the channel aligner -------------------------------------------------------------------------


def check_events(events: list[Any], start: int) -> int:
    """The events continue the instants from ``start`` without a hole or a step back;
    return the next instant."""
    expected = start
    for kind, a, b in events:
        if kind == "sample":
            assert a == expected, events
            expected += 1
        elif kind == "gap":
            assert a > 0 and b == expected + a, events
            expected = b
    return expected


def test_an_hour_long_gap_is_skipped_in_one_step() -> None:
    al = ChannelAligner(["a", "b", "c"], 2000.0)
    for k in range(4):
        for ch in "abc":
            al.feed(ch, NOW + k / 4, [1] * 500)
    assert al.next == 2000
    t = time.perf_counter()
    events = []
    for ch in "abc":
        events += al.feed(ch, NOW + 3600, [2] * 500)
    took = time.perf_counter() - t
    gaps = [e for e in events if e[0] == "gap"]
    assert sum(e[1] for e in gaps) == 3600 * 2000 - 2000 and len(gaps) <= 2
    assert sum(e[0] == "sample" for e in events) == 500
    assert took < 0.2, f"{took:.3f} s for a gap of an hour"
    check_events(events, 2000)


def test_a_dead_channel_costs_the_others_no_memory_or_time() -> None:
    al = ChannelAligner(["a", "b", "c"], 100.0)
    events = []
    for k in range(2400):  # 10 minutes of a and b, none of c
        for ch in "ab":
            events += al.feed(ch, NOW + k / 4, [k] * 25)
        pending = [sum(len(v) for _, v in al.pending[ch].runs) for ch in "abc"]
        assert max(pending) <= al.max_wait + 1
    assert not any(e[0] == "sample" for e in events)
    assert check_events(events, 0) == al.next > 600 * 100 - 2 * al.max_wait


def test_a_packet_from_the_future_or_a_clock_step_back_does_not_end_the_input() -> None:
    al = ChannelAligner(["a", "b"], 100.0)
    events: list[Any] = []

    def second(t: float) -> None:
        for k in range(4):
            for ch in "ab":
                events.extend(al.feed(ch, t + k / 4, [1] * 25))

    for s in range(5):
        second(NOW + s)
    events.extend(al.feed("a", NOW + 9.0, [9] * 25))  # 4 s ahead of the stream
    for s in range(5, 15):
        second(NOW + s)
    assert all(e[0] == "sample" for e in events[-100:]), "whole seconds again"
    assert sum(e[0] == "sample" for e in events) >= 1500 - 400, "at most 4 s lost"
    n = check_events(events, 0)
    events.clear()
    for s in range(15):  # the sender's clock went back a day
        second(NOW - 86400 + s)
    assert al.resyncs == 1
    assert events[-1][0] == "sample" and sum(e[0] == "sample" for e in events) >= 900
    check_events(events, n)


class Stream:
    """Two channels of a 100 Hz sensor into an aligner, packets of 0.25 s arriving on a
    monotonic clock that follows the sensor's time (``mono = sensor time - offset``);
    the events are kept."""

    def __init__(self, **kw: Any) -> None:
        self.al = ChannelAligner(["a", "b"], 100.0, **kw)
        self.events: list[Any] = []
        self.offset = NOW
        self.wall: float | None = None

    def second(self, t: float, mono: float | None = None) -> None:
        """One second of packets stamped from ``t``, arriving from ``mono`` on."""
        start = t - self.offset if mono is None else mono
        for k in range(4):
            for ch in "ab":
                self.packet(ch, t + k / 4, start + k / 4 + 0.01)

    def packet(self, ch: str, t: float, mono: float, n: int = 25) -> None:
        self.events.extend(self.al.feed(ch, t, [1] * n, mono, self.wall))

    def count(self, kind: str) -> int:
        return sum(e[1] if e[0] != "sample" else 1 for e in self.events if e[0] == kind)


def test_a_forged_far_ahead_packet_costs_no_genuine_sample() -> None:
    s = Stream()
    for sec in range(3):
        s.second(NOW + sec)
    for ahead in (3600.0, 30.0, 3.0):  # each between genuine packets, from 1 h to 3 s ahead
        s.packet("a", NOW + 3 + ahead, 3.0)
        s.packet("b", NOW + 3 + ahead, 3.0)
        s.second(NOW + 3)
        s.offset -= 1  # (the sensor's next second is the same again, a second later)
    for sec in range(4, 10):
        s.second(NOW + sec, sec + 3.0)
    assert s.count("time_jump") == 6 * 25
    assert s.count("sample") == 3 * 100 + 3 * 100 + 6 * 100 - 200, "all but 2 s repeated"
    assert s.count("gap") == 0 and s.al.resyncs == 0
    assert check_events(s.events, 0) == s.al.next


def test_a_gap_the_elapsed_time_explains_is_skipped_in_one_step() -> None:
    s = Stream()
    s.second(NOW)
    s.second(NOW + 3600)  # the sensor was away for an hour
    gaps = [e for e in s.events if e[0] == "gap"]
    assert s.count("gap") == 3599 * 100 and len(gaps) <= 2 and s.count("time_jump") == 0
    assert s.count("sample") == 200


def test_a_burst_of_held_back_packets_is_taken() -> None:
    s = Stream()
    s.second(NOW)
    for sec in range(1, 6):  # the network held 5 s of packets back: they come at once
        s.second(NOW + sec, 6.0)
    assert s.count("sample") == 600 and s.count("time_jump") == 0


@pytest.mark.parametrize("wall", [None, NOW + 10])
def test_a_sender_clock_step_the_gateway_clock_agrees_with_is_followed(
    wall: float | None,
) -> None:
    s = Stream()
    s.offset = NOW - 600
    for sec in range(5):  # the sensor's clock is 10 min behind
        s.second(NOW - 600 + sec)
    s.wall = wall
    s.offset = NOW
    for sec in range(5, 15):  # ... and steps to the true time
        s.second(NOW + sec)
    assert s.al.resyncs == 1 and s.count("time_base") == 0
    jumped = s.count("time_jump")  # 5 s of samples of one channel, less a packet, each
    assert jumped == 2 * (500 - 25), jumped
    assert s.count("sample") == 1500 - jumped // 2
    assert s.events[-1][0] == "sample"
    n = check_events(s.events, 0)
    s.events.clear()
    for sec in range(15, 25):  # a step back of 20 s
        s.second(NOW - 20 + sec, sec)
    assert s.al.resyncs == 2 and s.count("time_base") == 0 and s.events[-1][0] == "sample"
    check_events(s.events, n)


def test_a_time_base_far_from_the_synchronised_gateway_clock_is_refused() -> None:
    s = Stream()
    for sec in range(5):
        s.second(NOW + sec)
    s.wall = NOW + 5
    for sec in range(5, 15):  # a day back: refused once the run is long enough
        s.second(NOW - 86400 + sec, sec)
    assert s.al.resyncs == 0
    assert s.count("overlap") >= 475 and s.count("time_base") >= 1500 - 500
    assert s.count("sample") == 500
    for sec in range(15, 20):  # the stream stays on its time base: the true time goes on
        s.second(NOW + sec)
    assert s.count("sample") == 1000 and s.count("gap") == 1000  # (the refused seconds)
    check_events(s.events, 0)
    s.wall = None  # an unsynchronised gateway clock cannot judge: followed as before
    for sec in range(20, 30):
        s.second(NOW - 86400 + sec, sec)
    assert s.al.resyncs == 1 and s.events[-1][0] == "sample"


def test_forged_datagrams_are_counted_by_reason_and_cost_no_genuine_sample() -> None:
    c = Collect(shake())
    c.synced = True
    sensor = NOW - 600  # the sensor's clock is 10 min behind the gateway's

    def second() -> None:
        c.second(sensor)
        c.mono += 1
        c.now += 1

    second()
    c.reader.handle(datacast_packet("EHZ", c.now - 1, [5] * 25), "127.0.0.1")  # plausible
    c.reader.handle(datacast_packet("ENN", c.now + 3, [5] * 25), "127.0.0.1")
    for _ in range(9):
        sensor += 1
        second()
    assert len(c.samples) == 1000 and c.gaps == []
    assert dict(c.reader.dropped) == {"time_jump": 2}
    for k in range(28):  # 7 s of one channel a day back, continuous: not followed
        c.reader.handle(datacast_packet("EHZ", NOW - 86400 + k / 4, [5] * 25), "127.0.0.1")
    assert c.reader.dropped["time_base"] == 28 - 19 and c.reader.aligner.resyncs == 0
    sensor += 1
    second()
    assert len(c.samples) == 1100 and c.gaps == [
        ("overlap", 25, -(86400 - 600) * 100 + k * 25) for k in range(19)
    ]


packets = st.lists(
    st.tuples(st.sampled_from("abc"), st.integers(-400, 1200), st.integers(1, 60)),
    max_size=80,
)


@FUZZ
@given(packets)
def test_aligner_events_are_in_order_and_its_memory_bounded(
    feed: list[tuple[str, int, int]],
) -> None:
    al = ChannelAligner(["a", "b", "c"], 100.0, max_wait=0.5)
    al.feed("a", NOW, [0])
    start = al.next
    for ch, offset, n in feed:
        events = al.feed(ch, NOW + offset / 100, list(range(n)))
        start = check_events(events, start)
        for r in al.pending.values():
            held = sum(len(v) for _, v in r.runs)
            assert held <= al.max_wait + 1 + 60
            assert all(s >= al.next for s, _ in r.runs)


def test_skipping_costs_the_same_for_any_gap() -> None:
    from agent.seismic import SeismicProcessor

    dev = SeismicDevice.model_validate(
        {
            "driver": "seismic",
            "id": "q",
            "serial_port": "/dev/null",
            "sample_rate": 100,
            "channels": [{"name": "z"}],
            "stalta_band": [1.0, 10.0],
        }
    )
    proc = SeismicProcessor(dev)
    for i in range(150):
        proc.feed([float(i % 7)], 10 * i)
    t = time.perf_counter()
    assert proc.skip(10**12) == [] and proc.skip(0) == [] and proc.skip(-5) == []
    assert time.perf_counter() - t < 0.2
    outs = [o for i in range(100) for o in proc.feed([1.0], 0)]
    summaries = [o for o in outs if o.kind == "summary"]
    assert len(summaries) == 1, "no summary for the skipped seconds"
    gap = next(r for r in summaries[0].results or [] if r.point == "gap_samples")
    assert gap.value == 10**12
    assert proc.feed([math.nan], 0) == [] and proc.i == 150 + 10**12 + 99, "waits, unprocessed"
    assert proc.skip(10**12) == [] and proc.i == 150 + 2 * 10**12 + 100, "skipped with the gap"


# -- Modbus peers that flood ------------------------------------------------------------------


def flood(chunk: bytes, seconds: float = 3.0) -> Any:
    def script(conn: socket.socket) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(chunk)

    return script


@pytest.fixture
def peers() -> Iterator[list[TcpPeer]]:
    made: list[TcpPeer] = []
    yield made
    for p in made:
        p.close()


def test_modbus_tcp_flood_drops_the_connection(peers: list[TcpPeer]) -> None:
    peer = TcpPeer(flood(os.urandom(65536)))
    peers.append(peer)

    async def run() -> None:
        client = MbapClient("127.0.0.1", peer.port)
        for _ in range(3):
            await client.connect()
            t = time.monotonic()
            with pytest.raises(FrameError):
                await client.transact(b"\x01\x03\x00\x00\x00\x01", 1.0)
            assert time.monotonic() - t < 1.0
            assert not client.connected
        assert peer.connections == 3

    asyncio.run(run())


def test_modbus_tcp_stream_of_wrong_transactions_drops_the_connection(peers: list[TcpPeer]) -> None:
    """Well-formed replies to transactions never asked, one every 5 ms (never enough
    bytes at once to be a flood): after MAX_STALE of them the request fails and the
    connection is dropped, long before the request's timeout."""

    def script(conn: socket.socket) -> None:
        for i in range(400):
            conn.sendall(struct.pack(">HHHBBBH", 0xBE00 + i, 0, 5, 1, 3, 2, 7))
            time.sleep(0.005)

    peer = TcpPeer(script)
    peers.append(peer)

    async def run() -> MbapClient:
        client = MbapClient("127.0.0.1", peer.port)
        await client.connect()
        t = time.monotonic()
        with pytest.raises(FrameError, match="other transaction ids"):
            await client.transact(b"\x01\x03\x00\x00\x00\x01", 3.0)
        assert time.monotonic() - t < 1.5
        assert not client.connected
        return client

    client = asyncio.run(run())
    assert client.stale == MAX_STALE + 1 and client.floods == 0


def test_modbus_tcp_a_late_reply_is_still_skipped(peers: list[TcpPeer]) -> None:
    """The bounds leave the normal case alone: a late reply, then the right one."""

    def script(conn: socket.socket) -> None:
        req = conn.recv(64)
        tid = struct.unpack(">H", req[:2])[0]
        late = struct.pack(">HHHBBBH", (tid - 1) & 0xFFFF, 0, 5, 1, 3, 2, 1)
        conn.sendall(late + struct.pack(">HHHBBBH", tid, 0, 5, 1, 3, 2, 42))
        time.sleep(1)

    peer = TcpPeer(script)
    peers.append(peer)

    async def run() -> bytes:
        client = MbapClient("127.0.0.1", peer.port)
        await client.connect()
        return await client.transact(b"\x01\x03\x00\x00\x00\x01", 1.0)

    assert asyncio.run(run()) == b"\x00\x2a"


def test_rtu_over_tcp_flood_fails_fast_and_reconnects(peers: list[TcpPeer]) -> None:
    peer = TcpPeer(flood(b"\x55" * 65536))
    peers.append(peer)

    async def run() -> SerialLine:
        line = SerialLine(f"127.0.0.1:{peer.port}", tcp=True)
        for _ in range(3):
            assert await line.connect()
            t = time.monotonic()
            with pytest.raises(FrameError, match="flood"):
                await line.transact(b"\x01\x03\x00\x00\x00\x01", 1.0)
            assert time.monotonic() - t < 1.5
            assert not line.connected
        return line

    asyncio.run(run())
    assert peer.connections == 3


def test_rtu_over_tcp_that_never_falls_silent_costs_one_timeout(peers: list[TcpPeer]) -> None:
    """A slow babbler (under the flood limit): no request is sent into it, and the
    poll fails after its timeout."""

    def script(conn: socket.socket) -> None:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            conn.sendall(b"\x07")
            time.sleep(0.005)

    peer = TcpPeer(script)
    peers.append(peer)

    async def run() -> SerialLine:
        line = SerialLine(f"127.0.0.1:{peer.port}", tcp=True, frame_gap=0.1)
        assert await line.connect()
        await asyncio.sleep(0.05)
        t = time.monotonic()
        with pytest.raises(FrameError, match="never silent"):
            await line.transact(b"\x01\x03\x00\x00\x00\x01", 0.3)
        assert 0.25 < time.monotonic() - t < 1.0
        assert line.requests == 0 and line.noisy == 1
        line.close()
        return line

    asyncio.run(run())


def test_babbling_serial_line_is_bounded(line: tuple[str, str]) -> None:
    """An RS-485 device that never stops sending: each request fails within its timeout,
    the line holds at most RX_LIMIT bytes, and a reply after the babbling is read."""
    far, agent_end = line
    stop = threading.Event()

    def babble() -> None:
        fd = os.open(far, os.O_RDWR | os.O_NOCTTY)
        os.set_blocking(fd, False)
        try:
            while not stop.is_set():
                try:
                    os.write(fd, b"\xaa" * 4096)
                except BlockingIOError:
                    time.sleep(0.001)
            time.sleep(0.2)
            # then a device that answers unit 1 with one register
            reply = b"\x01\x03\x02\x00\x2a"
            end = time.monotonic() + 5
            while time.monotonic() < end:
                try:
                    if os.read(fd, 256):
                        os.write(fd, reply + crc16(reply))
                except BlockingIOError:
                    time.sleep(0.002)
        finally:
            os.close(fd)

    async def run() -> None:
        sl = SerialLine(agent_end, baudrate=115200)
        assert await sl.connect()
        threading.Thread(target=babble, daemon=True).start()
        for _ in range(3):
            t = time.monotonic()
            with pytest.raises(FrameError):
                await sl.transact(b"\x01\x03\x00\x00\x00\x01", 0.3)
            assert time.monotonic() - t < 1.0
            assert sl._proto is not None and len(sl._proto.buf) <= LINE_LIMIT
        stop.set()
        await asyncio.sleep(0.5)
        assert await sl.transact(b"\x01\x03\x00\x00\x00\x01", 1.0) == b"\x00\x2a"
        sl.close()

    asyncio.run(run())


def test_limits_are_small() -> None:
    assert MBAP_LIMIT <= 2048 and LINE_LIMIT <= 4096
    assert ascii_frame(1, [1.0]).endswith(b"\r\n")
