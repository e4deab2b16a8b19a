"""systemd supervision: the notification protocol (sd_notify(3)) and a watchdog fed only
while the agent makes progress, against a real agent process and a test notify socket."""

from __future__ import annotations

import fcntl
import os
import re
import select
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from agent.sdnotify import STATUS_MAX, Notifier, socket_address, watchdog_usec
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    REPO,
    AgentProcess,
    Mosquitto,
    Subscriber,
    free_port,
    one_point_device,
    wait_until,
    write_config,
)
from tests.notify_peer import NotifySocket, gaps

WD_USEC = 6_000_000
"""The watchdog interval the agent tests give (WatchdogSec=6)."""
WD_S = WD_USEC / 1e6


@pytest.fixture
def sim() -> Iterator[ModbusSimulator]:
    s = ModbusSimulator()
    s.add_device(1, [ModbusPoint(name="v", address=0)])
    s.set_raw(1, "holding", 0, [7])
    s.start_thread()
    yield s
    s.stop_thread()


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A port whose listener never accepts: connections open (the kernel's backlog), and
    no request is ever answered (an RS-485 converter with its meters unplugged)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield int(s.getsockname()[1])
    s.close()


def supervised_env(
    monkeypatch: pytest.MonkeyPatch,
    notify: NotifySocket | str,
    usec: int | None = WD_USEC,
    pid: str | None = None,
) -> None:
    """The environment systemd gives a ``Type=notify`` service with ``WatchdogSec=``."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify if isinstance(notify, str) else notify.env)
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


def buffer_table_exists(state: Path) -> dict[str, object]:
    """What the harness sees in the state directory at the instant READY=1 arrives."""
    db = state / "buffer.db"
    if not db.exists():
        return {"table": False}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT 1 FROM sqlite_master WHERE name='outbox'").fetchone()
    finally:
        con.close()
    return {"table": row is not None}


def last_gap(notify: NotifySocket) -> float:
    """Seconds since the last WATCHDOG=1 (or since forever)."""
    pings = notify.pings()
    return time.monotonic() - pings[-1].t if pings else float("inf")


# ---------------------------------------------------------------- the protocol, in process


def test_case_045_abstract_address_is_nul_and_name_without_trailing_nul() -> None:
    assert socket_address("@edge-notify-test-1") == b"\0edge-notify-test-1"
    assert socket_address("/run/edge-test/notify") == b"/run/edge-test/notify"
    for odd in ("", "@", "notify", "0edge", "vsock:2:1234"):
        assert socket_address(odd) is None, odd


def test_case_045_abstract_socket_receives_and_literal_names_do_not(tmp_path: Path) -> None:
    """The datagram goes to NUL + name; the literal "@name" or "0name" would not arrive
    (sending there fails with ENOENT, the faults of case 045)."""
    peer = NotifySocket()
    try:
        name = peer.env[1:]
        for wrong in (f"@{name}".encode(), f"0{name}".encode()):
            with (
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s,
                pytest.raises(FileNotFoundError),
            ):
                s.sendto(b"READY=1\n", wrong)
        n = Notifier({"NOTIFY_SOCKET": peer.env})
        n.ready("started")
        got = peer.wait_for("READY", "1", 5)
        assert got.raw == b"READY=1\nSTATUS=started\n"
        n.close()
    finally:
        peer.close()


def test_case_045_without_notify_socket_every_call_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_usec is None
    n.ready("x")
    n.status("y")
    n.watchdog()
    n.reloading()
    n.stopping()
    assert n.send("READY=1") is False


def test_case_045_nobody_listening_one_warning_and_no_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = Notifier({"NOTIFY_SOCKET": f"@nobody-listens-{os.getpid()}", "WATCHDOG_USEC": "100"})
    with caplog.at_level("WARNING", logger="agent.sdnotify"):
        n.ready("started")
        for _ in range(50):
            n.watchdog()
        n.stopping()
    warnings = [r for r in caplog.records if r.name == "agent.sdnotify"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cannot notify systemd" in warnings[0].getMessage()
    n.close()


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 42, 20_000_000),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "42"}, 42, 20_000_000),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "43"}, 42, None),  # case 052 D
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "x"}, 42, None),
        ({"WATCHDOG_USEC": "0"}, 42, None),
        ({"WATCHDOG_USEC": "-5"}, 42, None),
        ({"WATCHDOG_USEC": "2e7"}, 42, None),
        ({}, 42, None),
    ],
)
def test_watchdog_settings_as_sd_watchdog_enabled(
    env: dict[str, str], pid: int, expected: int | None
) -> None:
    assert watchdog_usec(env, pid) == expected


def test_reload_api_reloading_then_ready_once_more(tmp_path: Path) -> None:
    """What the reload code calls: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC µs, as
    Type=notify-reload wants), then READY=1; READY=1 is otherwise sent once only."""
    peer = NotifySocket(tmp_path)
    try:
        n = Notifier({"NOTIFY_SOCKET": peer.env})
        n.ready("up")
        n.ready("up again")  # not a second READY=1
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert not n.is_ready
        n.ready("reloaded")
        assert n.is_ready
        n.stopping()
        wait_until(lambda: peer.having("STOPPING"), 5, "STOPPING=1")
        kinds = [
            next(k for k in ("READY", "RELOADING", "STOPPING", "STATUS") if k in m.fields)
            for m in peer.all()
        ]
        assert kinds == ["READY", "STATUS", "RELOADING", "READY", "STOPPING"], kinds
        reload = peer.having("RELOADING", "1")[0]
        assert before <= int(reload.fields["MONOTONIC_USEC"]) <= after
        assert peer.having("READY")[1].fields["STATUS"] == "reloaded"
        n.close()
    finally:
        peer.close()


def test_status_is_one_bounded_line(tmp_path: Path) -> None:
    """A newline would start another assignment (sd_notify(3)): the text is one line."""
    peer = NotifySocket(tmp_path)
    try:
        n = Notifier({"NOTIFY_SOCKET": peer.env})
        n.status("device x\nREADY=1\n" + "y" * 5000)
        got = peer.wait_for("STATUS", timeout=5)
        assert "READY" not in got.fields and got.raw.count(b"\n") == 1
        assert len(got.fields["STATUS"]) == STATUS_MAX
        n.close()
    finally:
        peer.close()


# ---------------------------------------------------------------- the agent process


@pytest.mark.parametrize("kind", ["abstract", "path"])
def test_case_045_052_ready_before_broker_pings_and_stopping(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    silent_peer: int,
    kind: str,
) -> None:
    """The agent under Type=notify with WatchdogSec=6, its broker unreachable and its only
    device never answering (each request ends in a 1 s timeout): STATUS= lines before
    READY=1; READY=1 once, within 10 s, with the buffer's file and table there; pings at
    most WatchdogSec/2 apart all along (dead devices and a missing broker are no hang);
    STOPPING=1 on SIGTERM (cases 045 1-2, 052 B and E)."""
    state = tmp_path / "state"
    notify = NotifySocket(
        None if kind == "abstract" else tmp_path, lambda: buffer_table_exists(state)
    )
    supervised_env(monkeypatch, notify)
    cfg = write_config(
        tmp_path / "agent.yaml", free_port(), one_point_device(silent_peer, "200ms", timeout="1s")
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    started = time.monotonic()
    agent.start()
    try:
        ready = notify.wait_for("READY", "1", 10)
        assert ready.t - started < 10
        assert ready.seen == {"table": True}, "READY=1 before the buffer was open"
        first_ready = notify.all().index(ready)
        assert any("STATUS" in m.fields for m in notify.all()[:first_ready]), "no STATUS first"
        watched_s = 7.5  # about 7 device timeouts and 5 pings
        time.sleep(watched_s)
        assert agent.proc is not None and agent.proc.poll() is None
        pings = [p.t for p in notify.pings()]
        assert len(pings) >= watched_s / (WD_S / 2), pings
        assert max(gaps([ready.t, *pings])) <= WD_S / 2, gaps(pings)
        statuses = notify.statuses()
        assert any(
            re.search(r"uplink mqtt://127\.0\.0\.1:\d+ not reached yet \(\d+ failed", s)
            for s in statuses
        ), statuses
        assert any("polling 1 device" in s and "pending in buffer" in s for s in statuses)
        assert len(notify.having("READY")) == 1
        assert agent.stop() == 0
        stopping = notify.wait_for("STOPPING", "1", 5)
        assert stopping.t >= ready.t
    finally:
        agent.kill()
        notify.close()
    assert "cannot notify systemd" not in agent.log()


def test_case_045_nobody_listening_the_agent_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: Mosquitto, sim: ModbusSimulator
) -> None:
    """NOTIFY_SOCKET names an abstract socket nobody has bound: one warning, and the agent
    polls and publishes as ever."""
    supervised_env(monkeypatch, f"@nobody-listens-{os.getpid()}", usec=500_000)
    sub = Subscriber(broker.port, "lifeline/#")
    cfg = write_config(tmp_path / "agent.yaml", broker.port, one_point_device(sim.port, "100ms"))
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: len(sub.telemetry()) >= 20, 20, "telemetry")
        time.sleep(2)  # a few more watchdog periods
    finally:
        code = agent.stop()
        sub.close()
    assert code == 0, agent.log()
    assert agent.log().count("cannot notify systemd") == 1, agent.log()


def test_case_052_a_loop_blocked_in_a_log_write_stops_the_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent_peer: int
) -> None:
    """Debug log into a 4096-byte pipe that the harness stops reading: the loop (or a thread
    holding the log handler while the loop waits on it) blocks in write(), and no
    WATCHDOG=1 arrives more than WatchdogSec after the write that blocked. Read again, the
    agent goes on and pings again."""
    notify = NotifySocket()
    supervised_env(monkeypatch, notify)
    cfg = write_config(
        tmp_path / "agent.yaml", free_port(), one_point_device(silent_peer, "100ms", timeout="1s")
    )
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    reading = threading.Event()
    reading.set()
    done = threading.Event()
    seen = bytearray()

    def reader() -> None:
        while not done.is_set():
            if not reading.is_set():
                time.sleep(0.05)
                continue
            if select.select([r], [], [], 0.1)[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    return
                seen.extend(chunk)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    agent = AgentProcess(cfg, tmp_path / "agent.log", args=("--log-level", "debug"), output=w)
    agent.start()
    os.close(w)
    try:
        notify.wait_for("READY", "1", 10)
        wait_until(lambda: len(notify.pings()) >= 3, 10, "pings")
        reading.clear()
        time.sleep(0.2)  # the reader is out of read()
        wait_until(lambda: last_gap(notify) > WD_S, 30, "the pings to stop")
        left = os.read(r, 65536)  # what the pipe held when the loop blocked
        assert len(left) >= 3000, left
        # the records whose write() blocked (the loop's, and any of other threads that
        # waited for the handler after it) come out first once the pipe is read again, each
        # stamped when it was made; the loop blocked at or before the latest of them (the
        # last line in the pipe may be seconds older when nothing was logged for a while)
        mark = len(seen)
        n = len(notify.pings())
        last_ping = notify.pings()[-1].wall
        resumed = time.time()
        reading.set()

        def stamps() -> list[float]:
            out = []
            for ln in bytes(seen[mark:]).decode(errors="replace").splitlines():
                m = re.match(r"^(\S+Z) ", ln)
                if m:
                    out.append(datetime.fromisoformat(m[1].replace("Z", "+00:00")).timestamp())
            return out

        wait_until(lambda: any(t >= resumed for t in stamps()), 10, "a line made after resuming")
        held = [t for t in stamps() if t < resumed]
        assert held, "a write was blocked"
        blocked_at = max(held)
        # the loop's own write blocks it: no ping after it (they come every WatchdogSec/4);
        # a write of another thread (the buffer's commit, holding the handler's lock) stops
        # them by the supervisor's rule for a commit under way WatchdogSec/2: either way
        # within one WatchdogSec, so systemd's watchdog fires while the agent is stuck
        assert last_ping - blocked_at <= WD_S, (last_ping - blocked_at, len(held))
        wait_until(lambda: len(notify.pings()) > n + 2, 20, "pings again once the log is read")
        assert agent.stop() == 0
        notify.wait_for("STOPPING", "1", 5)
    finally:
        done.set()
        agent.kill()
        notify.close()
        thread.join(2)
        os.close(r)


def test_case_052_c_half_second_watchdog_gaps_at_most_250ms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ModbusSimulator
) -> None:
    """WATCHDOG_USEC=500000: over 20 s, no two pings more than 250 ms apart."""
    notify = NotifySocket()
    supervised_env(monkeypatch, notify, usec=500_000)
    cfg = write_config(tmp_path / "agent.yaml", free_port(), one_point_device(sim.port, "100ms"))
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        notify.wait_for("READY", "1", 10)
        wait_until(notify.pings, 5, "the first ping")
        t0 = notify.pings()[0].t
        time.sleep(20)
        pings = [p.t for p in notify.pings() if p.t >= t0]
        assert agent.stop() == 0
    finally:
        agent.kill()
        notify.close()
    assert pings[-1] - t0 >= 19.5
    assert max(gaps(pings)) <= 0.25, sorted(gaps(pings))[-5:]
    print(
        f"\nWATCHDOG_USEC=500000: {len(pings)} pings in 20 s, largest gap "
        f"{max(gaps(pings)) * 1000:.0f} ms"
    )


def test_case_052_d_watchdog_pid_of_another_process_no_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ModbusSimulator
) -> None:
    """WATCHDOG_PID names another process: READY=1 and status, never WATCHDOG=1."""
    notify = NotifySocket()
    supervised_env(monkeypatch, notify, usec=500_000, pid="1")
    cfg = write_config(tmp_path / "agent.yaml", free_port(), one_point_device(sim.port, "100ms"))
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        notify.wait_for("READY", "1", 10)
        time.sleep(3)  # 12 watchdog periods
        assert agent.stop() == 0
        notify.wait_for("STOPPING", "1", 5)
    finally:
        agent.kill()
        notify.close()
    assert notify.pings() == []


@pytest.mark.parametrize("fault", ["invalid config", "state_dir not usable"])
def test_case_052_f_no_ready_and_exit_78(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """A config that cannot run: no READY=1, exit 78 (EX_CONFIG, which the unit does not
    restart) within 10 s. (As root a directory's mode bits stop nothing, so the unusable
    state_dir is a path through a regular file.)"""
    notify = NotifySocket()
    supervised_env(monkeypatch, notify)
    cfg = write_config(tmp_path / "agent.yaml", free_port(), one_point_device(1, "1s"))
    text = cfg.read_text()
    if fault == "invalid config":
        cfg.write_text(text.replace("poll_interval: 1s", "poll_interval: soon"))
    else:
        (tmp_path / "file").write_text("")
        cfg.write_text(
            text.replace(
                f"state_dir: {tmp_path / 'state'}", f"state_dir: {tmp_path / 'file' / 'state'}"
            )
        )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    started = time.monotonic()
    agent.start()
    assert agent.proc is not None
    try:
        code = agent.proc.wait(10)
    finally:
        agent.kill()
    took = time.monotonic() - started
    time.sleep(0.2)  # anything in flight
    notify.close()
    assert code == 78, agent.log()
    assert took < 10
    assert notify.having("READY") == [], "READY=1 from an agent that cannot run"


# ---------------------------------------------------------------- hangs stop the pings


def test_watchdog_stops_when_a_read_hangs_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ModbusSimulator
) -> None:
    """A Modbus read that never returns nor times out (tests/hang.py), the loop still
    running: the pings stop within WatchdogSec of the hang, the log and the status line
    name the bus and device; SIGTERM still stops the agent cleanly with STOPPING=1."""
    notify = NotifySocket(tmp_path)
    supervised_env(monkeypatch, notify)
    cfg = write_config(
        tmp_path / "agent.yaml", free_port(), one_point_device(sim.port, "200ms", timeout="500ms")
    )
    flag = tmp_path / "hang"
    agent = AgentProcess(
        cfg, tmp_path / "agent.log", wrap=(str(REPO / "tests" / "hang.py"), str(flag))
    )
    agent.start()
    try:
        notify.wait_for("READY", "1", 10)
        wait_until(lambda: len(notify.pings()) >= 3, 10, "pings")
        before = [p.t for p in notify.pings()]
        assert max(gaps(before)) <= WD_S / 2
        flag.write_text("")
        hung_at = time.monotonic()
        wait_until(lambda: last_gap(notify) > WD_S, 30, "the pings to stop")
        last = notify.pings()[-1].t
        assert last - hung_at <= WD_S, f"pinged {last - hung_at:.1f} s into the hang"
        print(f"\nread hang: last ping {last - hung_at:.1f} s into it (WatchdogSec={WD_S:g})")
        assert "makes no progress: bus tcp://127.0.0.1:" in agent.log()
        assert "the poll of d1 has had no request end" in agent.log()
        assert any(s.startswith("NO PROGRESS: bus") for s in notify.statuses())
        assert agent.stop() == 0, agent.log()
        notify.wait_for("STOPPING", "1", 5)
    finally:
        agent.kill()
        notify.close()


def test_watchdog_stops_while_a_buffer_commit_does_not_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim: ModbusSimulator
) -> None:
    """A commit that does not return (tests/hang.py holds the buffer's thread inside it, as
    a disk that stops answering would): the pings stop within WatchdogSec of it, the log
    and the status line name the buffer, and they come back once the commit returns."""
    notify = NotifySocket()
    supervised_env(monkeypatch, notify)
    cfg = write_config(tmp_path / "agent.yaml", free_port(), one_point_device(sim.port, "100ms"))
    flag = tmp_path / "hang"
    agent = AgentProcess(
        cfg, tmp_path / "agent.log", wrap=(str(REPO / "tests" / "hang.py"), str(flag))
    )
    agent.start()
    try:
        notify.wait_for("READY", "1", 10)
        wait_until(lambda: len(notify.pings()) >= 3, 10, "pings")
        commit_flag = tmp_path / "hang.commit"
        commit_flag.write_text("")
        blocked_at = time.monotonic()
        try:
            wait_until(lambda: last_gap(notify) > WD_S, 30, "the pings to stop")
            last = notify.pings()[-1].t
            assert last - blocked_at <= WD_S, f"pinged {last - blocked_at:.1f} s into the block"
            print(f"\ncommit block: last ping {last - blocked_at:.1f} s into it")
            assert "a commit has not returned for" in agent.log()
            assert any("NO PROGRESS: buffer" in s for s in notify.statuses())
        finally:
            commit_flag.unlink()
        n = len(notify.pings())
        wait_until(lambda: len(notify.pings()) > n + 2, 30, "pings once commits succeed")
        assert "makes progress again" in agent.log()
        assert agent.stop() == 0
        notify.wait_for("STOPPING", "1", 5)
    finally:
        agent.kill()
        notify.close()
