"""``edge-agent status`` against a real agent process (real mosquitto, a pymodbus server),
the state file it reads, the health message's metrics and the Prometheus text."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.clock import boot_id, mono_ms
from agent.metrics import (
    PollStats,
    RateMeter,
    parse_throttled,
    prometheus_text,
    throttle_conditions,
)
from agent.simulator import ModbusSimulator
from agent.status import (
    FORMAT,
    flock_holders,
    not_running_reason,
    proc_start_ticks,
    read_state_file,
    render_text,
    runtime_name,
    view,
)
from drivers.base import PointResult
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    REPO,
    AgentProcess,
    Mosquitto,
    Subscriber,
    wait_until,
    write_config,
)

SYNCED = "clock: {sync: assume}\n"


@pytest.fixture
def sim() -> Iterator[ModbusSimulator]:
    s = ModbusSimulator()
    s.add_device(1, [ModbusPoint(name="v", table="holding", address=0, unit="m")])
    s.set_raw(1, "holding", 0, [1234])
    s.start_thread()
    yield s
    s.stop_thread()


def _config(tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator, extra: str = "") -> Path:
    devices = (
        f"  - id: d1\n    host: 127.0.0.1\n    port: {sim.port}\n    poll_interval: 200ms\n"
        "    timeout: 300ms\n    points: [{name: v, address: 0, unit: m}]\n"
    )
    return write_config(tmp_path / "agent.yaml", broker.port, devices, tail=SYNCED + extra)


def status(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """``edge-agent status -c CONFIG ARGS`` as a technician runs it (no terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "status", "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=dict(env or os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
        timeout=60,
        check=False,
    )


def _start(tmp_path: Path, config: Path) -> AgentProcess:
    agent = AgentProcess(config, tmp_path / "agent.log")
    agent.start()
    return agent


def _until_code(config: Path, code: int, timeout: float = 30) -> Any:
    last: list[Any] = []

    def check() -> bool:
        last[:] = [status(config)]
        return bool(last[0].returncode == code)

    try:
        wait_until(check, timeout, f"edge-agent status to exit {code}", step=0.5)
    except AssertionError:
        raise AssertionError(
            f"last: {last[0].returncode}\n{last[0].stdout}{last[0].stderr}"
        ) from None
    return last[0]


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_status_of_a_running_agent_shows_devices_buffer_and_uplink(
    tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator
) -> None:
    config = _config(tmp_path, broker, sim)
    sub = Subscriber(broker.port)
    agent = _start(tmp_path, config)
    wait_until(lambda: len(sub.telemetry()) >= 5, 20, "telemetry")
    done = _until_code(config, 0)
    out = done.stdout
    assert "healthy" in out
    assert "connected since" in out and f"127.0.0.1:{broker.port}" in out and "plain MQTT" in out
    assert "buffer   disk" in out and "pending" in out and "free" in out
    assert "d1  modbus_tcp" in out and "online" in out and "v=1234 m" in out
    assert "alarms   none active" in out
    assert "\x1b[" not in out  # no colour without a terminal

    # the file: in the runtime directory, readable by the group, not by others
    state = tmp_path / "run" / runtime_name(tmp_path / "state")
    assert state.is_file()
    assert stat.S_IMODE(state.stat().st_mode) == 0o640

    doc = json.loads(status(config, "--json").stdout)
    assert doc["status"] == {"code": 0, "state": "healthy", "reasons": []}
    assert doc["gateway"] == "test-gw" and doc["pid"] == agent.proc.pid  # type: ignore[union-attr]
    assert doc["uplink"]["connected"] is True
    assert doc["uplink"]["broker"] == f"127.0.0.1:{broker.port}"
    assert doc["uplink"]["tls"] is False and doc["uplink"]["reconnects"] == 0
    assert doc["buffer"]["medium"] == "disk" and doc["buffer"]["pending"] >= 0
    assert doc["buffer"]["disk_free_bytes"] > 0 and doc["buffer"]["bytes"] > 0
    assert doc["clock"]["synced"] is True
    (d1,) = doc["devices"]
    assert d1["state"] == "online" and d1["driver"] == "modbus_tcp"
    assert d1["points"]["v"] == {"value": 1234, "unit": "m", "quality": "good"}
    assert 0 <= d1["last_good_age_s"] < 3 and d1["errors_last_hour"] == 0
    assert doc["age_s"] < 3

    prom = status(config, "--prometheus")
    assert prom.returncode == 0
    m = _metrics(prom.stdout)
    assert m[("edge_agent_up", ())] == 1
    assert m[("edge_agent_uplink_connected", ())] == 1
    assert m[("edge_agent_point_value", (("device", "d1"), ("point", "v"), ("unit", "m")))] == 1234
    assert m[("edge_agent_device_online", (("device", "d1"),))] == 1
    assert m[("edge_agent_device_poll_errors_total", (("device", "d1"),))] == 0
    assert m[("edge_agent_resident_memory_bytes", ())] > 1_000_000
    assert "# TYPE edge_agent_messages_published_total counter" in prom.stdout
    assert agent.stop() == 0
    sub.close()


def test_status_with_the_broker_down_exits_1_and_says_why(
    tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator
) -> None:
    config = _config(tmp_path, broker, sim)
    agent = _start(tmp_path, config)
    _until_code(config, 0)
    broker.stop()
    done = _until_code(config, 1)
    assert "degraded" in done.stdout
    assert "uplink down since" in done.stdout and f"127.0.0.1:{broker.port}" in done.stdout
    doc = json.loads(status(config, "--json").stdout)
    (reason,) = doc["status"]["reasons"]
    assert reason.startswith("uplink down")
    assert "lost the connection" in reason or "Connection refused" in reason
    assert doc["uplink"]["connected"] is False

    # the broker back: healthy again, and the health counts the reconnect
    broker.start()
    sub = Subscriber(broker.port, "lifeline/test-gw/health")
    _until_code(config, 0)
    health = wait_until(
        lambda: [m.json() for m in sub.on("/health") if m.json()["reconnects"] == 1],
        20,
        "health counting the reconnect",
    )[-1]
    assert health["devices"]["d1"]["poll_errors"] == 0
    assert 0 <= health["devices"]["d1"]["last_good_age_s"] < 5
    assert health["poll_overruns"] == 0 and health["devices"]["d1"]["overruns"] == 0
    assert health["rss_bytes"] > 1_000_000 and health["disk_free_bytes"] > 0
    assert health["publish_rate"] >= 0
    assert agent.stop() == 0
    sub.close()


def test_status_shows_an_offline_device_and_its_errors(
    tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator
) -> None:
    config = _config(tmp_path, broker, sim)
    sub = Subscriber(broker.port, "lifeline/test-gw/health")
    agent = _start(tmp_path, config)
    _until_code(config, 0)
    sim.stop_thread()
    done = _until_code(config, 1)
    assert "device d1 offline since" in done.stdout
    doc = json.loads(status(config, "--json").stdout)
    (d1,) = doc["devices"]
    assert d1["state"] == "offline" and d1["errors_last_hour"] >= 1
    assert d1["points"]["v"]["quality"] in ("timeout", "no_connection")
    assert d1["last_good_age_s"] >= 0
    prom = _metrics(status(config, "--prometheus").stdout)
    assert prom[("edge_agent_device_online", (("device", "d1"),))] == 0
    assert prom[("edge_agent_status", ())] == 1
    assert ("edge_agent_point_value", (("device", "d1"), ("point", "v"), ("unit", "m"))) not in prom
    # the health sent when the device went offline carries its poll errors
    health = wait_until(
        lambda: [
            m.json() for m in sub.on("/health") if m.json()["devices"]["d1"]["poll_errors"] > 0
        ],
        20,
        "health with poll errors",
    )[-1]
    assert health["devices_offline"] == 1
    sim.start_thread()
    agent.stop()
    sub.close()


def test_status_of_a_stopped_agent_exits_2(
    tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator
) -> None:
    config = _config(tmp_path, broker, sim)
    never = status(config)
    assert never.returncode == 2 and "not running" in never.stdout
    assert "no state file" in never.stdout

    agent = _start(tmp_path, config)
    _until_code(config, 0)
    assert agent.stop() == 0
    done = status(config)
    assert done.returncode == 2, done.stdout
    assert "not running" in done.stdout and "stopped" in done.stdout
    prom = _metrics(status(config, "--prometheus").stdout)
    assert prom[("edge_agent_up", ())] == 0

    # killed: the file stays, the process is gone
    agent = _start(tmp_path, config)
    _until_code(config, 0)
    assert agent.proc is not None
    agent.proc.kill()
    agent.proc.wait(10)
    done = status(config)
    assert done.returncode == 2
    assert f"process {agent.proc.pid} is gone" in done.stdout
    doc = json.loads(status(config, "--json").stdout)
    assert doc["status"]["code"] == 2 and doc["gateway"] == "test-gw"


def test_status_of_a_hung_agent_exits_2(
    tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator
) -> None:
    config = _config(tmp_path, broker, sim)
    agent = _start(tmp_path, config)
    _until_code(config, 0)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        done = _until_code(config, 2, timeout=20)
        assert "last written" in done.stdout and "hung" in done.stdout
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    _until_code(config, 0)
    assert agent.stop() == 0


def test_without_a_runtime_directory_the_state_file_is_in_the_state_dir(
    tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "no-such-dir"))
    config = _config(tmp_path, broker, sim)
    agent = _start(tmp_path, config)
    done = _until_code(config, 0)
    state = tmp_path / "state" / "status.json"
    assert f"state file {state}" in done.stdout
    assert stat.S_IMODE(state.stat().st_mode) == 0o640
    # on the SD card: written on a change at most every 5 s, not every second
    mtimes = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 7:
        mtimes.add(state.stat().st_mtime_ns)
        time.sleep(0.1)
    assert 1 <= len(mtimes) <= 3, len(mtimes)
    assert "written on a change" in agent.log()
    by_path = status(config, "--state-file", str(state), "--json")
    assert json.loads(by_path.stdout)["stale_after_s"] > 60
    assert agent.stop() == 0
    assert not state.exists()


# -- the pure parts ------------------------------------------------------------------------


def _snapshot(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "gateway": "gw-1",
        "version": "0.1.0",
        "pid": os.getpid(),
        "proc_start": proc_start_ticks(os.getpid()),
        "boot_id": boot_id(),
        "started": 1_800_000_000_000,
        "ts": 1_800_000_060_000,
        "mono_ms": mono_ms(),
        "every_s": 1.0,
        "stale_after_s": 5.0,
        "state_dir": "/nonexistent",
        "locked": False,
        "uplink": {"connected": True, "since": 1_800_000_000_000, "broker": "b:1883"},
        "buffer": {"medium": "disk", "pending": 0, "oldest": None, "dropped": 0},
        "clock": {"synced": True, "source": "auto"},
        "system": {"rss_bytes": 1, "soc_temp_c": 48.3, "throttled": 0x50005},
        "devices": [
            {
                "id": "d1",
                "driver": "modbus_tcp",
                "bus": "tcp://h:502",
                "state": "online",
                "last_good_age_s": 1.0,
                "points": {"v": {"value": 2.5, "unit": 'm"3\\\n', "quality": "good"}},
            }
        ],
        "alarms": [],
        "outputs": {"available": True, "error": None, "states": {"siren": False}},
    }
    doc.update(over)
    return doc


def test_prometheus_text_escapes_label_values_and_parses() -> None:
    v = view(_snapshot(), None)
    assert v["status"]["code"] == 0, v["status"]
    text = prometheus_text(v).decode()
    assert 'unit="m\\"3\\\\\\n"' in text  # " \ and newline escaped (exposition format)
    m = _metrics(text)
    assert (
        m[("edge_agent_point_value", (("device", "d1"), ("point", "v"), ("unit", 'm"3\\\n')))]
        == 2.5
    )
    assert m[("edge_agent_soc_temperature_celsius", ())] == 48.3
    cond = ("edge_agent_throttle_condition", (("condition", "under_voltage"), ("when", "now")))
    assert m[cond] == 1
    assert m[("edge_agent_output_on", (("output", "siren"),))] == 0
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("edge_agent_")
        assert fam.documentation


def test_throttled_bits() -> None:
    assert parse_throttled("throttled=0x50005\n") == 0x50005
    assert parse_throttled("error=1 error_msg=...") is None
    assert throttle_conditions(0x50005) == {
        "now": ["under_voltage", "throttled"],
        "since_boot": ["under_voltage", "throttled"],
    }
    assert throttle_conditions(0) == {"now": [], "since_boot": []}


def test_degraded_and_not_running_verdicts() -> None:
    now = mono_ms()
    down = view(
        _snapshot(
            uplink={"connected": False, "since": None, "broker": "b:1", "problem": "refused"}
        ),
        None,
    )
    assert down["status"]["code"] == 1
    assert down["status"]["reasons"] == ["uplink down (never connected) (broker b:1): refused"]
    unsynced = view(_snapshot(clock={"synced": False}), None)
    assert unsynced["status"]["reasons"] == [
        "clock not synchronised: time stamps are flagged unsynced"
    ]
    memory = view(_snapshot(buffer={"medium": "memory", "error": "disk full"}), None)
    assert "buffer in memory only: disk full" in memory["status"]["reasons"][0]
    stale = _snapshot(mono_ms=now - 6000)
    reason = not_running_reason(stale, now, boot_id())
    assert reason is not None and "6 s ago" in reason
    assert "earlier boot" in str(not_running_reason(_snapshot(boot_id="x"), now, boot_id()))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    gone = not_running_reason(_snapshot(pid=int(dead.stdout)), now, boot_id())
    assert gone is not None and "is gone" in gone
    reused = _snapshot(proc_start=(proc_start_ticks(os.getpid()) or 0) + 1)
    assert "another program" in str(not_running_reason(reused, now, boot_id()))
    assert "not running" in render_text(view(None, None, "no state file"), color=False)
    coloured = render_text(view(_snapshot(), None), color=True)
    assert "\x1b[32m" in coloured and "d1" in coloured


def test_the_agent_lock_is_seen_held_or_not(tmp_path: Path) -> None:
    lock = tmp_path / "agent.lock"
    lock.write_text("1\n")
    assert flock_holders(lock) == set()
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert flock_holders(lock) == {os.getpid()}
        snap = _snapshot(state_dir=str(tmp_path), locked=True)
        assert not_running_reason(snap, mono_ms(), boot_id()) is None
    reason = not_running_reason(
        _snapshot(state_dir=str(tmp_path), locked=True), mono_ms(), boot_id()
    )
    assert reason is not None and "does not hold the agent's lock" in reason


def test_a_hostile_state_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_state_file(fifo)  # never blocks on a FIFO
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "real.json")
    (tmp_path / "real.json").write_text(json.dumps(_snapshot()))
    with pytest.raises(ValueError, match="symbolic link"):
        read_state_file(link)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (4 * 1024 * 1024 + 1))
    with pytest.raises(ValueError, match="larger"):
        read_state_file(big)
    other = tmp_path / "other.json"
    other.write_text('{"format": 99}')
    with pytest.raises(ValueError, match="format"):
        read_state_file(other)
    v = view(None, other, "cannot read")
    assert v["status"]["code"] == 2


def test_poll_stats_count_errors_in_the_last_hour() -> None:
    stats = PollStats(["d1"])
    good = [PointResult("v", 1.0, "good")]
    bad = [PointResult("v", None, "timeout", "no reply")]
    stats.on_poll("d1", 1000, good, 0.0)
    for i in range(3):
        stats.on_poll("d1", 2000 + i, bad, 10.0 + i)
    stats.on_poll("d1", 9000, bad, 3000.0)
    stats.on_poll("other", 9000, bad, 3000.0)  # not a device of the config: ignored
    d = stats.devices["d1"]
    assert d.poll_errors == 4 and d.last_good_ms == 1000
    assert d.errors_last_hour(3000.0) == 4
    assert d.errors_last_hour(3700.0) == 1  # the first three are more than an hour old
    assert stats.last_good_age("d1", 3000.0) == 3000.0
    unsupported = [PointResult("v", None, "unsupported", "exception 2")]
    stats.on_poll("d1", 9100, unsupported, 3001.0)
    assert d.poll_errors == 4  # a point the device does not have is not a poll error

    rate = RateMeter(window=60)
    for t in range(0, 120):
        rate.sample(float(t), t * 10)
    assert rate.rate(120.0, 1200) == pytest.approx(10.0, rel=0.05)
