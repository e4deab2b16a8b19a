"""Log lines: UTC time stamps (ISO 8601 with ``Z``) outside journald, none under it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import REPO, AgentProcess, Mosquitto, one_point_device, wait_until, write_config

STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) ")
LOCAL = "XYZ-7"
"""A POSIX TZ seven hours ahead of UTC (no time-zone database needed): a local time
stamp would be 7 h off."""

SNIPPET = (
    "import logging; from agent.cli import setup_logging; setup_logging('info'); "
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
        assert line == "INFO agent.x: hello\n"


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
