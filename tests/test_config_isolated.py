"""The config as the running agent gets it: loaded and checked in a child process
(agent.config.isolated), handed over without the YAML loader or the validators."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config.isolated import load_isolated
from agent.config.issues import ConfigError
from agent.config.loader import load_config
from agent.contract.info import config_hash
from drivers.plain import plain_data, to_plain
from tests.helpers import REPO, write_config

DEVICES = (
    "  - id: d1\n    host: 127.0.0.1\n    port: 1502\n    points:\n"
    "      - {name: level, address: 0, type: int16, scale: 0.1, unit: m}\n"
    "      - {name: temp, address: 1, type: int16, scale: 0.1, unit: degC}\n"
    "      - {name: total, address: 2, type: uint32, counter: true}\n"
    "  - id: d2\n    host: 127.0.0.1\n    port: 1502\n    unit_id: 2\n    points:\n"
    "      - {name: level, address: 0, type: int16, scale: 0.1, unit: m}\n"
)


def test_child_hands_over_the_config_the_loader_makes(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent.yaml", 1883, DEVICES)
    here = load_config(path, True)
    there = load_isolated(path, True)
    assert there == to_plain(here)
    assert plain_data(there) == plain_data(to_plain(here))
    assert config_hash(there) == config_hash(here)
    assert [p.name for d in there.devices for p in d.points] == [
        "level",
        "temp",
        "total",
        "level",
    ]
    # equal values of the points are one object in the agent
    assert there.devices[0].points[0].unit is there.devices[1].points[0].unit
    assert there.devices[0].points[0].scale is there.devices[0].points[1].scale


def test_child_reports_the_loaders_problems_at_file_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = DEVICES.replace("type: uint32, counter: true", "type: uint33")
    text = write_config(tmp_path / "agent.yaml", 1883, bad).read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if "uint33" in t)
    with pytest.raises(ConfigError) as here:
        load_config("agent.yaml", True)
    with pytest.raises(ConfigError) as there:
        load_isolated("agent.yaml", True)
    assert there.value.issues == here.value.issues
    assert str(there.value.issues[0]).startswith(f"agent.yaml:{line}:")
    assert "uint33" in str(there.value)


def test_child_problem_with_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as there:
        load_isolated(tmp_path / "missing.yaml")
    (issue,) = there.value.issues
    assert issue.line == 1
    assert "missing.yaml" in issue.file


def test_running_agent_holds_neither_loader_nor_validators(tmp_path: Path) -> None:
    """The agent imports no YAML loader and no pydantic: its config arrives as plain
    twins (drivers.plain), which is what keeps its memory small (issue 14)."""
    path = write_config(tmp_path / "agent.yaml", 1883, DEVICES)
    probe = (
        "import json, sys\n"
        "import agent.cli, agent.app\n"
        "from agent.config.isolated import load_isolated\n"
        "from agent.contract.info import gateway_info\n"
        f"cfg = load_isolated({str(path)!r}, True)\n"
        "gateway_info(cfg, 0)\n"
        "print(json.dumps({'modules': sorted(m for m in sys.modules if m.startswith("
        "('ruamel', 'yaml', 'pydantic', 'agent.config.loader', 'agent.config.model', "
        "'drivers.modbus.config', 'drivers.common', 'agent.cli_modbus', 'agent.seismic'))),"
        " 'types': sorted({type(o).__module__ for o in (cfg, cfg.mqtt, cfg.devices[0], "
        "cfg.devices[0].points[0])})}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen == {"modules": [], "types": ["drivers.plain"]}


@pytest.mark.parametrize(
    ("signal_name", "said"),
    [("XCPU", "more than 30 s of CPU"), ("KILL", "was killed"), ("SEGV", "signal SIGSEGV")],
)
def test_checking_process_cut_off_is_one_line_at_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_name: str, said: str
) -> None:
    # fault injected: the interpreter started for the check ends on a signal, as the
    # kernel ends it at RLIMIT_CPU, the OOM killer, or a crash
    dying = tmp_path / "python"
    dying.write_text(f"#!/bin/sh\nkill -{signal_name} $$\n")
    dying.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(dying))
    path = write_config(tmp_path / "agent.yaml", 1883, DEVICES)
    with pytest.raises(ConfigError) as cut:
        load_isolated(path, True)
    (issue,) = cut.value.issues
    assert (issue.file, issue.line) == (str(path), 1)
    assert said in issue.message


def test_config_loads_where_setrlimit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fault injected: setrlimit(2) fails with EPERM in the checking process, as under the
    # unit's SystemCallFilter=~@resources with SystemCallErrorNumber=EPERM
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import resource\n"
        "def refused(*args):\n"
        "    raise PermissionError(1, 'Operation not permitted')\n"
        "resource.setrlimit = refused\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(inject))
    path = write_config(tmp_path / "agent.yaml", 1883, DEVICES)
    assert load_isolated(path, True) == to_plain(load_config(path, True))
