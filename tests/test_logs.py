"""Log lines: UTC time stamps (ISO 8601 with ``Z``) outside journald; under it none, and a
``<N>`` priority prefix (sd-daemon(3)); repeats limited; SIGUSR1 switches debug on and off."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from agent.logs import REPEAT_KEYS_MAX, RepeatFilter
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    REPO,
    AgentProcess,
    Mosquitto,
    free_port,
    one_point_device,
    wait_until,
    write_config,
)

STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) ")
LOCAL = "XYZ-7"
"""A POSIX TZ seven hours ahead of UTC (no time-zone database needed): a local time
stamp would be 7 h off."""

SNIPPET = (
    "import logging; from agent.logs import setup_logging; setup_logging('info'); "
    "logging.getLogger('agent.x').info('hello')"
)


def log_line(stderr: Path, journal: str | None) -> str:
    """The line one logged event makes in a process whose stderr is the file ``stderr``,
    with ``JOURNAL_STREAM`` set to ``journal`` ("same": that file's device:inode)."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env.update(TZ=LOCAL, PYTHONPATH=str(REPO))
    with stderr.open("wb") as err:
        if journal == "same":
            st = os.fstat(err.fileno())
            journal = f"{st.st_dev}:{st.st_ino}"
        if journal is not None:
            env["JOURNAL_STREAM"] = journal
        subprocess.run([sys.executable, "-c", SNIPPET], stderr=err, env=env, check=True)
    return stderr.read_text()


def assert_utc_now(line: str) -> None:
    m = STAMP.match(line)
    assert m, f"no UTC ISO 8601 time stamp: {line!r}"
    at = datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
    skew = abs(at.timestamp() - time.time())
    assert skew < 60, f"{m.group(1)} is {skew:.0f} s from now (local time instead of UTC?)"


def test_outside_journald_each_line_starts_with_utc_time(tmp_path: Path) -> None:
    line = log_line(tmp_path / "err", None)
    assert line.endswith(" INFO agent.x: hello\n"), line
    assert_utc_now(line)


@pytest.mark.parametrize(
    ("journal", "stamped"),
    [
        ("same", False),  # stderr is the journal's stream: journald stamps the entry itself
        ("1:2", True),  # inherited from a service, but stderr was redirected elsewhere
        ("garbage", True),
    ],
)
def test_journald_is_recognised_by_its_stream(tmp_path: Path, journal: str, stamped: bool) -> None:
    line = log_line(tmp_path / "err", journal)
    if stamped:
        assert_utc_now(line)
    else:
        assert line == "<6>INFO agent.x: hello\n"


def test_the_agent_logs_in_utc(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent process, in a time zone 7 h ahead of UTC: every line it logs starts with
    the UTC time."""
    monkeypatch.setenv("TZ", LOCAL)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.start_thread()
    cfg = write_config(tmp_path / "agent.yaml", broker.port, one_point_device(sim.port))
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: "connected to" in agent.log(), 15, "the connect logged")
    assert agent.stop() == 0
    sim.stop_thread()
    lines = agent.log().splitlines()
    assert len(lines) >= 3, lines
    for line in lines:
        assert_utc_now(line)


LEVELS_SNIPPET = (
    "import logging; from agent.logs import setup_logging; setup_logging('debug'); "
    "g = logging.getLogger('agent.x'); g.debug('d'); g.info('i'); g.warning('w'); "
    "g.error('e'); g.critical('c'); g.warning('two\\n<0>lines')"
)


def test_under_journald_each_line_has_its_priority(tmp_path: Path) -> None:
    """sd-daemon(3) prefixes, on every line of a message: text with a newline cannot
    forge a line of another priority."""
    err = tmp_path / "err"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(REPO)
    with err.open("wb") as f:
        st = os.fstat(f.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", LEVELS_SNIPPET], stderr=f, env=env, check=True)
    assert err.read_text().splitlines() == [
        "<7>DEBUG agent.x: d",
        "<6>INFO agent.x: i",
        "<4>WARNING agent.x: w",
        "<3>ERROR agent.x: e",
        "<2>CRITICAL agent.x: c",
        "<4>WARNING agent.x: two",
        "<4><0>lines",
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def repeat_logger(clock: Clock) -> tuple[logging.Logger, list[str]]:
    out: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(f"{record.levelname} {record.getMessage()}")

    handler = ListHandler()
    repeats = RepeatFilter(burst=5, window=60.0, clock=clock)
    repeats.handler = handler
    handler.addFilter(repeats)
    logger = logging.getLogger(f"test.repeats.{id(out)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger, out


def test_repeated_errors_are_limited_and_the_rest_counted() -> None:
    clock = Clock()
    log, out = repeat_logger(clock)
    for i in range(100):
        clock.now += 0.1
        log.error("cannot read %s: %s", "/dev/ttyUSB0", "I/O error")
        log.error("device %s failed", i % 2)  # two other messages, 50 each
        log.info("poll %s", "done")  # below WARNING: never limited
    assert out.count("ERROR cannot read /dev/ttyUSB0: I/O error") == 5
    assert out.count("ERROR device 0 failed") == 5 and out.count("ERROR device 1 failed") == 5
    assert out.count("INFO poll done") == 100
    clock.now += 60
    log.warning("something else")
    assert (
        "ERROR cannot read /dev/ttyUSB0: I/O error [95 more like this in the last 70 s, not shown]"
        in out
    )
    assert "ERROR device 0 failed [45 more like this in the last 70 s, not shown]" in out
    # a new window: shown again
    log.error("cannot read %s: %s", "/dev/ttyUSB0", "I/O error")
    assert out[-1] == "ERROR cannot read /dev/ttyUSB0: I/O error"


def test_repeat_limit_memory_is_bounded() -> None:
    """Distinct messages without end (text from a hostile peer) are followed up to a
    bound and otherwise passed: nothing is lost, memory stays bounded."""
    clock = Clock()
    log, out = repeat_logger(clock)
    for i in range(REPEAT_KEYS_MAX * 3):
        log.warning("garbled line %d", i)
    assert len(out) == REPEAT_KEYS_MAX * 3
    repeats = log.handlers[0].filters[0]
    assert isinstance(repeats, RepeatFilter) and len(repeats._seen) == REPEAT_KEYS_MAX


def test_sigusr1_switches_debug_on_and_off(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running agent at INFO: SIGUSR1 turns debug lines on, SIGUSR1 again off."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    cfg = write_config(tmp_path / "agent.yaml", broker.port, one_point_device(free_port(), "100ms"))
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    assert agent.proc is not None
    try:
        wait_until(lambda: "connected to" in agent.log(), 15, "the connect logged")
        time.sleep(1)
        assert " DEBUG " not in agent.log()
        agent.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: "log level now DEBUG" in agent.log(), 5, "debug on")
        wait_until(lambda: " DEBUG " in agent.log(), 5, "debug lines")
        agent.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: "log level now INFO" in agent.log(), 5, "debug off")
        time.sleep(0.3)
        quiet_from = len(agent.log())
        time.sleep(1.5)  # 15 polls of a device that does not answer
        assert " DEBUG " not in agent.log()[quiet_from:]
    finally:
        code = agent.stop()
    assert code == 0, agent.log()


def test_the_agent_under_journald_prefixes_priorities_without_time_stamps(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent process with JOURNAL_STREAM naming its stderr: every line starts with
    ``<N>LEVEL``, none with a time stamp."""
    log = tmp_path / "agent.log"
    log.touch()
    st = log.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    cfg = write_config(tmp_path / "agent.yaml", broker.port, one_point_device(free_port(), "1s"))
    agent = AgentProcess(cfg, log)
    agent.start()
    wait_until(lambda: "connected to" in agent.log(), 15, "the connect logged")
    assert agent.stop() == 0
    lines = agent.log().splitlines()
    assert len(lines) >= 3, lines
    for line in lines:
        assert re.match(r"^<[2-7]>(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ", line), line
    assert any(line.startswith("<4>WARNING agent.poller: ") for line in lines), lines
