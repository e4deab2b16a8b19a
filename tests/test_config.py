"""Config loading and ``edge-agent validate``: every problem once, at the right FILE:LINE:COL.

Expected lines and columns are counted by hand in the YAML written by each test (1-based;
an unknown key is reported at the key, a bad value at the value).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from ruamel.yaml import YAML

from agent.cli import EX_CONFIG, main
from agent.config.loader import (
    MAX_PURE_CHARS,
    ConfigError,
    ConfigIssue,
    config_notes,
    load_config,
)
from agent.config.model import AgentConfig
from drivers.common import parse_duration
from drivers.modbus.config import ModbusPoint, ModbusProfile, ModbusTcpDevice

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "config"


@pytest.fixture
def cfgdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory; file names in messages are relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def with_profiles(cfgdir: Path) -> Path:
    """``cfgdir`` with a copy of the shipped profiles in ``profiles/``."""
    shutil.copytree(CONFIG_DIR / "profiles", cfgdir / "profiles")
    return cfgdir


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return name


def validate(*args: str) -> tuple[int, list[str]]:
    """Run ``edge-agent validate`` in-process; return exit code and all printed lines."""
    result = CliRunner().invoke(main, ["validate", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output.splitlines()


def issues_of(name: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as exc:
        load_config(name)
    return exc.value.issues


def where(issue: ConfigIssue) -> tuple[str, int, int, str]:
    return issue.file, issue.line, issue.col, issue.path


HEAD = "gateway_id: gw-test\nstate_dir: state\n"


# ---------------------------------------------------------------------------------------
# 1. acceptance

ACCEPTANCE = """\
gateway_id: gw-test
state_dir: state
devices:
  - id: pump-1
    host: 192.0.2.10
    unit_id: 300
    poll_interval: 5
    points:
      - name: level
        address: 0
        type: float32
        scael: 0.1
"""
# line 6 "    unit_id: 300": value starts after 4 spaces + "unit_id: " (9) -> col 14
# line 7 "    poll_interval: 5": 4 spaces + "poll_interval: " (15) -> col 20
# line 12 "        scael: 0.1": the key itself after 8 spaces -> col 9


def test_acceptance_validate_reports_each_problem_once(cfgdir: Path) -> None:
    name = write(cfgdir, "agent.yaml", ACCEPTANCE)
    code, lines = validate(name)
    assert code == EX_CONFIG == 78
    assert len(lines) == 4
    unit, poll, scael, summary = lines
    assert unit.startswith("agent.yaml:6:14: devices[0].unit_id: ")
    assert "300" in unit
    assert "247" in unit
    assert poll.startswith("agent.yaml:7:20: devices[0].poll_interval: ")
    assert "bare number 5" in poll
    assert "'5s'" in poll
    assert scael.startswith("agent.yaml:12:9: devices[0].points[0].scael: ")
    assert "unknown key 'scael'" in scael
    assert "did you mean 'scale'" in scael
    assert summary == "agent.yaml: 3 problems found"


def test_acceptance_issues_from_loader(cfgdir: Path) -> None:
    name = write(cfgdir, "agent.yaml", ACCEPTANCE)
    assert [where(i) for i in issues_of(name)] == [
        ("agent.yaml", 6, 14, "devices[0].unit_id"),
        ("agent.yaml", 7, 20, "devices[0].poll_interval"),
        ("agent.yaml", 12, 9, "devices[0].points[0].scael"),
    ]


# ---------------------------------------------------------------------------------------
# 2. shipped configs


def test_shipped_example_configs_validate() -> None:
    agent_configs = sorted(CONFIG_DIR.glob("*.yaml"))
    assert [p.name for p in agent_configs] == ["agent.example.yaml"]
    for path in agent_configs:
        code, lines = validate(str(path))
        assert code == 0, lines
        assert lines == [lines[0]]
        assert lines[0].startswith(f"{path}: OK (gateway zz-jinshui-gw017, 6 device(s), ")
        cfg = load_config(path)
        ids = [d.id for d in cfg.devices]
        assert ids == [
            "underpass-radar",
            "culvert-level",
            "valve-pit-ch4",
            "cabinet-rain",
            "riverside-level",
            "gas-station-07-p1",
        ]
        assert {d.driver for d in cfg.devices} == {
            "modbus_tcp",
            "modbus_rtu",
            "modbus_rtu_over_tcp",
        }
        included = cfg.devices[ids.index("gas-station-07-p1")]
        assert included.profile == "gas-pressure"
        assert included.points[-1].name == "cabinet_door_open"
        assert included.points[-1].table == "discrete_input"
        assert cfg.devices[0].poll_interval == 1.0
        assert cfg.devices[0].timeout == 0.5

    profiles = sorted((CONFIG_DIR / "profiles").glob("*.yaml"))
    assert len(profiles) >= 3
    for path in profiles:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        profile = ModbusProfile.model_validate(data)
        assert profile.name == path.stem
        assert len(profile.points) >= 1


# ---------------------------------------------------------------------------------------
# 3. case 033 (adapted: id / driver / poll_interval); devices first so that the line
# numbers are those of the case (first line = 1)

CASE_033 = """\
devices:
  - id: pump-7
    driver: modbus_tcp
    host: 192.0.2.10          # documentation address
    unit_id: 1
    points:
      - {name: level, table: holding, address: 0, type: flaot32}   # typo
      - {name: state, table: holding, address: 2, type: uint16}
  - id: pump-8
    driver: modbus_tcp
    host: 192.0.2.11
    unit_id: 1
    poll_interval: "often"                                      # not a duration
    points:
      - {name: level, table: holding, address: 0, type: float32}
  - id: pump-9
    driver: modbus_tcp      # valid; has no serial keys
    host: 192.0.2.12
    unit_id: 1
    points:
      - {name: level, table: holding, address: 0, type: float32}
gateway_id: gw-test
state_dir: state
"""
# line 7: 6 spaces, "- " (cols 7-8), "{" col 9, "name: level, " cols 10-22,
#   "table: holding, " cols 23-38, "address: 0, " cols 39-50, "type: " cols 51-56 -> col 57
# line 13: 4 spaces + 'poll_interval: ' (15) -> the quote at col 20


def test_case_033_config_errors(cfgdir: Path) -> None:
    name = write(cfgdir, "file.yaml", CASE_033)
    code, lines = validate(name)
    assert code == 78
    assert len(lines) == 3
    typo, often, summary = lines
    assert typo.startswith("file.yaml:7:57: devices[0].points[0].type: 'flaot32' is not one of ")
    assert "float32" in typo.split("is not one of", 1)[1]
    assert "did you mean 'float32'" in typo
    assert often.startswith("file.yaml:13:20: devices[1].poll_interval: 'often' is not a duration")
    assert summary == "file.yaml: 2 problems found"
    assert not any("devices[2]" in line or "pump-9" in line for line in lines)

    run = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", name],
        cwd=cfgdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 78
    assert run.stdout == ""
    assert run.stderr.splitlines() == lines
    assert not (cfgdir / "state").exists()


# ---------------------------------------------------------------------------------------
# 4. the loader's checks


def test_duplicate_yaml_keys_each_reported(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
mqtt:
  host: broker.local
  port: 1883
  host: other.local
devices:
  - id: pump-1
    host: 192.0.2.10
    points:
      - name: level
        address: 0
        address: 1
""",
    )
    issues = issues_of(name)
    assert [(i.line, i.col, i.path) for i in issues] == [
        (6, 3, "mqtt.host"),
        (13, 9, "devices[0].points[0].address"),
    ]
    assert "duplicate key 'host' (first defined at line 4)" in issues[0].message
    assert "duplicate key 'address' (first defined at line 12)" in issues[1].message
    code, lines = validate(name)
    assert code == 78
    assert lines[0].startswith("agent.yaml:6:3: ")
    assert lines[1].startswith("agent.yaml:13:9: ")
    assert lines[2] == "agent.yaml: 2 problems found"


def test_duplicate_device_ids(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: pump-1
    host: 192.0.2.10
    points: [{name: a, address: 0}]
  - id: pump-2
    host: 192.0.2.11
    points: [{name: a, address: 0}]
  - id: pump-1
    host: 192.0.2.12
    points: [{name: a, address: 0}]
""",
    )
    (issue,) = issues_of(name)
    # line 10 "  - id: pump-1": the value after "  - id: " -> col 9
    assert where(issue) == ("agent.yaml", 10, 9, "devices[2].id")
    assert "duplicate device id 'pump-1' (also devices[0])" in issue.message


def test_included_device_error_names_included_file(cfgdir: Path) -> None:
    write(
        cfgdir,
        "devices/ok.yaml",
        """\
id: inc-ok
host: 192.0.2.31
points:
  - {name: a, address: 0}
""",
    )
    write(
        cfgdir,
        "devices/zz-bad.yaml",
        """\
# a converter in the pump house
id: inc-bad
host: 192.0.2.30
unit_id: 0
points:
  - name: a
    address: 0
    typo: 1
""",
    )
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
include:
  - devices/*.yaml
devices:
  - id: pump-1
    host: 192.0.2.10
    points: [{name: a, address: 0}]
""",
    )
    issues = issues_of(name)
    # line 4 "unit_id: 0" -> value at col 10; line 8 "    typo: 1" -> key at col 5
    assert [where(i) for i in issues] == [
        ("devices/zz-bad.yaml", 4, 10, "devices[2].unit_id"),
        ("devices/zz-bad.yaml", 8, 5, "devices[2].points[0].typo"),
    ]
    code, lines = validate(name)
    assert code == 78
    assert lines[0].startswith("devices/zz-bad.yaml:4:10: devices[2].unit_id: 0 is out of range")
    assert lines[1].startswith("devices/zz-bad.yaml:8:5: devices[2].points[0].typo: unknown key")
    assert lines[2] == "agent.yaml: 2 problems found"


def test_included_devices_load(cfgdir: Path) -> None:
    write(
        cfgdir,
        "devices/two.yaml",
        """\
- {id: inc-a, host: 192.0.2.40, points: [{name: a, address: 0}]}
- {id: inc-b, host: 192.0.2.41, unit_id: 2, points: [{name: b, address: 1}]}
""",
    )
    name = write(cfgdir, "agent.yaml", HEAD + "include:\n  - devices/*.yaml\n")
    cfg = load_config(name)
    assert [(d.id, d.unit_id) for d in cfg.devices] == [("inc-a", 1), ("inc-b", 2)]


def test_unknown_profile_did_you_mean(with_profiles: Path) -> None:
    name = write(
        with_profiles,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: radar-1
    host: 192.0.2.10
    profile: radar-water-levl
""",
    )
    (issue,) = issues_of(name)
    # line 6 "    profile: radar-water-levl" -> 4 + len("profile: ") = 13 -> col 14
    assert where(issue) == ("agent.yaml", 6, 14, "devices[0].profile")
    assert "unknown profile 'radar-water-levl'" in issue.message
    assert "did you mean 'radar-water-level'" in issue.message


def test_unknown_profile_is_the_one_problem_not_its_rules(with_profiles: Path) -> None:
    """A misspelt profile is reported once: the alarm rules on that device's points are
    not each reported as naming a point the device lacks."""
    name = write(
        with_profiles,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: radar-1
    host: 192.0.2.10
    profile: radar-water-levl
alarms:
  - {id: h, device: radar-1, point: water_level, kind: high, setpoint: 1}
  - {id: hh, device: radar-1, point: water_level, kind: high, setpoint: 2}
""",
    )
    (issue,) = issues_of(name)
    assert issue.path == "devices[0].profile"


def test_yaml_syntax_error_position(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: pump-1
   host: 192.0.2.10
""",
    )
    (issue,) = issues_of(name)
    # line 5 "   host: ..." is indented 3, one less than the mapping it should belong to
    assert (issue.file, issue.line, issue.col) == ("agent.yaml", 5, 4)
    assert issue.message.startswith("YAML syntax error: ")
    code, lines = validate(name)
    assert code == 78
    assert lines[0].startswith("agent.yaml:5:4: YAML syntax error: ")
    assert lines[1] == "agent.yaml: 1 problem found"
    assert issue.message == (
        "YAML syntax error: line 5 (host) is indented 3 spaces, which lines up with nothing "
        "above it: the keys of one map, and the dashes of one list, start in the same column; "
        "here that is column 3 ('- ' on line 4) or column 5 (id on line 4)"
    )


# (the YAML after HEAD's two lines, line, column, words the message must hold); lines and
# columns counted by hand: where the structure went wrong, not where the parser stopped
SYNTAX_IN_WORDS = [
    pytest.param(  # the parser stops on line 5: "host:127.0.0.1" reads as text going on
        "mqtt:\n  host:127.0.0.1\n  port: 1883\n",
        4,
        3,
        "line 4 is not a 'key: value' (a key, a colon, then a space), so YAML reads it as "
        "text that goes on into line 5: add the space after the colon",
        id="no-space-after-colon",
    ),
    pytest.param(
        "mqtt:\n  host: x\n    port: 1883\n",
        5,
        5,
        "line 5 is indented more than line 4 (host), which already has a value: start port "
        "in column 3, as host, or, if it belongs below host, remove the value after 'host:'",
        id="indented-too-far",
    ),
    pytest.param(
        "devices:\n  - id: a\n    host: b\n  port: 502\n",
        6,
        3,
        "line 6 (port) starts in column 3, where the list items above start ('- '): start "
        "it with '- ' to make a new item, or indent it to column 5 (id on line 4) to belong "
        "to the item above",
        id="key-at-the-dashes",
    ),
    pytest.param(
        "mqtt:\n  host: x\n  - y\n",
        5,
        3,
        "a list item ('- ') on line 5 among the keys of a map",
        id="list-among-keys",
    ),
    pytest.param(
        "mqtt:\n  host: a: b\n",
        4,
        10,
        "the value of host on line 4 holds ': ' (a colon and a space): put the value in quotes",
        id="colon-in-value",
    ),
    pytest.param(  # the parser stops on line 5, at the next item
        "devices:\n  - {id: a, host: h\n  - {id: b, host: h}\n",
        4,
        5,
        "the '{' opened on line 4 is not closed with '}' where it should be (the parser met "
        "line 5 first): add '}' at its end",
        id="brace-left-open",
    ),
    pytest.param(  # the parser stops at the end of the file
        'mqtt:\n  host: "broker\n  port: 1883\n',
        4,
        9,
        "the quote opened on line 4 is never closed: add the closing quote at the end of the value",
        id="quote-left-open",
    ),
]


@pytest.mark.parametrize(("yaml", "line", "col", "words"), SYNTAX_IN_WORDS)
def test_yaml_syntax_errors_in_plain_words(
    cfgdir: Path, yaml: str, line: int, col: int, words: str
) -> None:
    (issue,) = issues_of(write(cfgdir, "agent.yaml", HEAD + yaml))
    assert (issue.line, issue.col) == (line, col)
    assert issue.message.startswith("YAML syntax error: ")
    assert words in issue.message
    code, lines = validate("agent.yaml")
    assert code == 78 and lines[0] == f"agent.yaml:{line}:{col}: {issue.message}"


@pytest.mark.parametrize(("yaml", "line", "col", "words"), SYNTAX_IN_WORDS)
def test_yaml_syntax_errors_in_a_big_file_read_the_same(
    cfgdir: Path, yaml: str, line: int, col: int, words: str
) -> None:
    """In a file too big for ruamel's parser (past MAX_PURE_CHARS), libyaml finds the
    syntax error: it is said at the same place in the same words."""
    (small,) = issues_of(write(cfgdir, "agent.yaml", HEAD + yaml))
    pad = "# " + "-" * 77 + "\n"
    big = HEAD + yaml + pad * (MAX_PURE_CHARS // len(pad) + 1)
    (issue,) = issues_of(write(cfgdir, "agent.yaml", big))
    assert (issue.line, issue.col) == (line, col)
    assert words in issue.message
    assert issue.message == small.message


def test_a_syntax_error_near_a_password_never_shows_it(cfgdir: Path) -> None:
    """The line that went wrong is named, never its text: a key glued to its value
    (no space) may be a password."""
    (issue,) = issues_of(
        write(cfgdir, "agent.yaml", HEAD + "mqtt:\n  password:hunter2\n  port: 1883\n")
    )
    assert issue.line == 4
    assert "hunter2" not in issue.message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5.0), ("1min", 60.0), ("1.5s", 1.5), ("2h", 7200.0)],
)
def test_duration_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (5, "bare number 5 has no unit"),
        (5.0, "bare number 5.0 has no unit"),
        (0, "bare number 0 has no unit"),
        (True, "True is not a duration"),
        (None, "None is not a duration"),
        ("5", "'5' is not a duration"),
        ("5sec", "'5sec' is not a duration"),
        ("5m", "'5m' is not a duration"),
        ("1 day", "'1 day' is not a duration"),
        ("-5s", "'-5s' is not a duration"),
        ("", "'' is not a duration"),
    ],
)
def test_duration_refuses_bare_numbers_and_unknown_units(bad: object, why: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_duration(bad)
    assert str(exc.value).startswith(why)


def test_durations_in_config(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
mqtt:
  keepalive: 1min
devices:
  - id: fast
    host: 192.0.2.10
    poll_interval: 500ms
    timeout: 5s
    points: [{name: a, address: 0}]
""",
    )
    cfg = load_config(name)
    assert cfg.mqtt.keepalive == 60.0
    assert (cfg.devices[0].poll_interval, cfg.devices[0].timeout) == (0.5, 5.0)

    name = write(
        cfgdir,
        "bad.yaml",
        HEAD
        + """\
devices:
  - id: slow
    host: 192.0.2.10
    poll_interval: 2
    timeout: 5 sec
    points: [{name: a, address: 0}]
""",
    )
    issues = issues_of(name)
    # line 6 "    poll_interval: 2" -> col 20; line 7 "    timeout: 5 sec" -> col 14
    assert [where(i) for i in issues] == [
        ("bad.yaml", 6, 20, "devices[0].poll_interval"),
        ("bad.yaml", 7, 14, "devices[0].timeout"),
    ]
    assert "bare number 2 has no unit" in issues[0].message
    assert "'5 sec' is not a duration" in issues[1].message


DEVICE = (
    HEAD
    + """\
devices:
  - id: dev-1
    host: 192.0.2.10
    unit_id: {unit_id}
    points:
      - name: a
        address: {address}
        type: {type}
"""
)


@pytest.mark.parametrize("unit_id", [1, 247])
def test_unit_id_accepted(cfgdir: Path, unit_id: int) -> None:
    name = write(cfgdir, "agent.yaml", DEVICE.format(unit_id=unit_id, address=0, type="uint16"))
    assert load_config(name).devices[0].unit_id == unit_id


@pytest.mark.parametrize(("unit_id", "bound"), [(0, "at least 1"), (248, "at most 247")])
def test_unit_id_refused(cfgdir: Path, unit_id: int, bound: str) -> None:
    name = write(cfgdir, "agent.yaml", DEVICE.format(unit_id=unit_id, address=0, type="uint16"))
    (issue,) = issues_of(name)
    # line 6 "    unit_id: N" -> col 14
    assert where(issue) == ("agent.yaml", 6, 14, "devices[0].unit_id")
    assert issue.message == f"{unit_id} is out of range: must be {bound}"


def test_register_address_range(cfgdir: Path) -> None:
    name = write(cfgdir, "agent.yaml", DEVICE.format(unit_id=1, address=65535, type="uint16"))
    assert load_config(name).devices[0].points[0].address == 65535

    name = write(cfgdir, "agent.yaml", DEVICE.format(unit_id=1, address=65536, type="uint16"))
    (issue,) = issues_of(name)
    # line 9 "        address: 65536" -> 8 + len("address: ") = 17 -> col 18
    assert where(issue) == ("agent.yaml", 9, 18, "devices[0].points[0].address")
    assert issue.message == "65536 is out of range: must be at most 65535"

    # a float32 at 65535 would need register 65536
    name = write(cfgdir, "agent.yaml", DEVICE.format(unit_id=1, address=65535, type="float32"))
    (issue,) = issues_of(name)
    assert (issue.line, issue.path) == (8, "devices[0].points[0]")
    assert "runs past 65535" in issue.message


def test_float32_count_mismatch_is_config_error(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: meter
    host: 192.0.2.10
    points:
      - name: grid_voltage
        address: 100
        type: float32
        count: 1
""",
    )
    (issue,) = issues_of(name)
    assert (issue.line, issue.path) == (7, "devices[0].points[0]")
    assert "count 1 does not match type float32" in issue.message


def test_unknown_top_level_key(cfgdir: Path) -> None:
    name = write(cfgdir, "agent.yaml", HEAD + "log_levle: debug\ndevices: []\n")
    issues = issues_of(name)
    assert ("agent.yaml", 3, 1, "log_levle") in [where(i) for i in issues]
    (typo,) = [i for i in issues if i.path == "log_levle"]
    assert typo.message == "unknown key 'log_levle' (did you mean 'log_level'?)"


# ---------------------------------------------------------------------------------------
# 5. valid files


def test_tcp_device_without_serial_keys_loads(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: pump-9
    driver: modbus_tcp      # valid; has no serial keys
    host: 192.0.2.12
    unit_id: 1
    points:
      - {name: level, table: holding, address: 0, type: float32}
""",
    )
    cfg = load_config(name)
    assert isinstance(cfg, AgentConfig)
    (dev,) = cfg.devices
    assert isinstance(dev, ModbusTcpDevice)
    assert (dev.id, dev.host, dev.port, dev.unit_id) == ("pump-9", "192.0.2.12", 502, 1)
    assert (dev.poll_interval, dev.timeout) == (1.0, 1.0)
    assert dev.bus == "tcp://192.0.2.12:502"
    assert [(p.name, p.type, p.register_count) for p in dev.points] == [("level", "float32", 2)]
    assert cfg.state_dir == str((cfgdir / "state").resolve())
    code, lines = validate(name)
    assert code == 0
    assert lines == ["agent.yaml: OK (gateway gw-test, 1 device(s), 1 point(s))"]


def test_profile_points_merged_before_device_points(cfgdir: Path) -> None:
    write(
        cfgdir,
        "profiles/test-meter.yaml",
        """\
name: test-meter
description: A test meter
points:
  - {name: voltage, address: 0, type: float32, byte_order: CDAB}
  - {name: current, address: 2, type: int16, scale: 0.01}
""",
    )
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: meter-1
    host: 192.0.2.10
    profile: test-meter
    points:
      - {name: door, table: coil, address: 5}
  - id: meter-2
    host: 192.0.2.10
    unit_id: 2
    profile: test-meter
""",
    )
    cfg = load_config(name)
    assert [p.name for p in cfg.devices[0].points] == ["voltage", "current", "door"]
    assert [p.name for p in cfg.devices[1].points] == ["voltage", "current"]
    voltage = cfg.devices[0].points[0]
    assert (voltage.type, voltage.byte_order, voltage.register_count) == ("float32", "CDAB", 2)
    assert cfg.devices[0].points[1].scale == 0.01
    assert cfg.devices[0].points[2].type == "bool"
    assert cfg.profiles_dir == str(cfgdir / "profiles")


def test_device_point_clashing_with_profile_point(cfgdir: Path) -> None:
    write(
        cfgdir,
        "profiles/test-meter.yaml",
        """\
name: test-meter
description: A test meter
points:
  - {name: voltage, address: 0, type: float32}
""",
    )
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: meter-1
    host: 192.0.2.10
    profile: test-meter
    points:
      - name: voltage
        address: 10
""",
    )
    (issue,) = issues_of(name)
    # line 8 "      - name: voltage" -> value at col 15
    assert where(issue) == ("agent.yaml", 8, 15, "devices[0].points[0].name")
    assert issue.message == (
        "point 'voltage' is already defined by profile 'test-meter'; to change it, use "
        "overrides: {voltage: {key: value}}"
    )


def test_device_overrides_only_what_differs(with_profiles: Path) -> None:
    """A device names a profile and changes only what differs from it: some keys of some
    points (overrides), points its model lacks (omit), plus points of its own."""
    name = write(
        with_profiles,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: gp-1
    host: 192.0.2.10
    profile: gas-pressure
    overrides:
      pressure_f: {byte_order: CDAB}
      temperature: {register: "40040", scale: 0.01, decimals: 2}
    omit: [range_zero, range_full]
    points:
      - {name: door, table: discrete_input, address: 0}
  - id: gp-2
    host: 192.0.2.10
    unit_id: 2
    profile: gas-pressure
""",
    )
    cfg = load_config(name)
    one, two = cfg.devices
    by_name = {p.name: p for p in one.points}
    assert list(by_name) == [
        "unit_code",
        "decimals",
        "pressure",
        "pressure_f",
        "temperature",
        "door",
    ]
    assert by_name["pressure_f"].byte_order == "CDAB"
    assert (by_name["pressure_f"].type, by_name["pressure_f"].unit) == ("float32", "kPa")
    temp = by_name["temperature"]
    assert (temp.table, temp.address, temp.scale, temp.decimals) == ("holding", 39, 0.01, 2)
    assert temp.unit == "degC" and temp.type == "int16"
    assert by_name["pressure"].decimal_point == "decimals"
    # the profile itself is untouched for the next device
    two_points = {p.name: p for p in two.points}
    assert two_points["pressure_f"].byte_order == "ABCD"
    assert two_points["temperature"].address == 0x26 and "range_zero" in two_points


def test_override_mistakes_are_located(with_profiles: Path) -> None:
    name = write(
        with_profiles,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: gp-1
    host: 192.0.2.10
    profile: gas-pressure
    overrides:
      presure: {decimals: 2}
      pressure_f: {byte_order: DCAB}
      temperature: {name: t2}
    omit: [temprature]
""",
    )
    issues = issues_of(name)
    got = {(i.line, i.path): i.message for i in issues}
    assert got[(8, "devices[0].overrides.presure")] == (
        "profile 'gas-pressure' has no point 'presure' (did you mean 'pressure'?)"
    )
    assert (
        got[(9, "devices[0].overrides.pressure_f.byte_order")].startswith("'DCAB'")
        or "DCBA" in got[(9, "devices[0].overrides.pressure_f.byte_order")]
    )
    assert got[(10, "devices[0].overrides.temperature.name")] == (
        "a point's name cannot be overridden"
    )
    assert got[(11, "devices[0].omit[0]")].startswith(
        "profile 'gas-pressure' has no point 'temprature' (did you mean 'temperature'?)"
    )
    assert len(issues) == 4, issues
    plain = write(
        with_profiles,
        "plain.yaml",
        HEAD + "devices:\n  - {id: p, host: h, points: [{name: v, address: 0}], omit: [v]}\n",
    )
    (issue,) = issues_of(plain)
    assert "'overrides', 'omit' and 'address_base' change a profile" in issue.message


def test_omitting_a_decimal_point_register_in_use_is_refused(with_profiles: Path) -> None:
    name = write(
        with_profiles,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: gp-1
    host: 192.0.2.10
    profile: gas-pressure
    omit: [decimals]
""",
    )
    (issue,) = issues_of(name)
    assert issue.path == "devices[0].omit"
    assert "decimal_point 'decimals' must name a uint16/int16 point" in issue.message


def test_shipped_profiles_used_by_devices(with_profiles: Path) -> None:
    name = write(
        with_profiles,
        "agent.yaml",
        HEAD
        + """\
devices:
  - id: radar
    host: 192.0.2.10
    profile: radar-water-level
    points:
      - {name: extra, address: 100}
""",
    )
    (dev,) = load_config(name).devices
    assert [p.name for p in dev.points] == ["air_gap", "water_level", "install_height", "extra"]
    assert [p.address for p in dev.points] == [1, 3, 5, 100]


def test_model_rejects_unknown_type_name() -> None:
    with pytest.raises(ValidationError):
        ModbusTcpDevice.model_validate(
            {"id": "d", "host": "h", "points": [{"name": "a", "address": 0, "type": "flaot32"}]}
        )


def test_empty_config_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here yet\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(err.value.issues) == 1
    assert "is empty" in err.value.issues[0].message


def test_include_accepts_a_single_string(tmp_path: Path) -> None:
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "d.yaml").write_text(
        "id: d1\nhost: 192.0.2.1\npoints: [{name: v, address: 0}]\n"
    )
    path = tmp_path / "a.yaml"
    path.write_text("gateway_id: gw\ninclude: devices/*.yaml\n")
    cfg = load_config(path)
    assert [d.id for d in cfg.devices] == ["d1"]


def test_broken_profile_is_not_called_unknown(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "m.yaml").write_text(
        "name: m\ndescription: x\npoints:\n  - {name: v, address: 0, type: flaot32}\n"
    )
    path = tmp_path / "a.yaml"
    path.write_text("gateway_id: gw\ndevices:\n  - {id: d1, host: 192.0.2.1, profile: m}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    messages = [str(i) for i in err.value.issues]
    assert len(messages) == 1, messages
    assert "m.yaml:4:" in messages[0] and "flaot32" in messages[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["scale", "offset"])
def test_non_finite_scale_or_offset_refused(bad: float, key: str) -> None:
    with pytest.raises(ValidationError):
        ModbusPoint.model_validate({"name": "v", "address": 0, key: bad})


ONE_DEVICE = "devices:\n  - {id: d1, host: 192.0.2.1, points: [{name: v, address: 0}]}\n"


def test_tls_files_are_checked_at_load(cfgdir: Path) -> None:
    write(cfgdir, "garbage.pem", "not a certificate\n")
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD + "mqtt:\n  tls:\n    ca_file: garbage.pem\n    cert_file: nope.pem\n"
        "    key_file: nope.key\n" + ONE_DEVICE,
    )
    got = [where(i) for i in issues_of(name)]
    assert got == [
        ("agent.yaml", 6, 16, "mqtt.tls.cert_file"),
        ("agent.yaml", 7, 15, "mqtt.tls.key_file"),
    ]
    name = write(cfgdir, "b.yaml", HEAD + "mqtt:\n  tls:\n    ca_file: garbage.pem\n" + ONE_DEVICE)
    issues = issues_of(name)
    assert [where(i) for i in issues] == [("b.yaml", 5, 14, "mqtt.tls.ca_file")]
    assert "cannot load CA certificates" in issues[0].message


def test_reconnect_min_zero_refused_at_its_key(cfgdir: Path) -> None:
    name = write(cfgdir, "agent.yaml", HEAD + "mqtt:\n  reconnect_min: 0s\n" + ONE_DEVICE)
    issues = issues_of(name)
    assert [where(i) for i in issues] == [("agent.yaml", 4, 18, "mqtt.reconnect_min")]
    assert issues[0].message == "must be at least 100ms"


def test_poll_interval_floor_points_at_the_key(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD + "devices:\n  - id: d1\n    host: 192.0.2.1\n    poll_interval: 10ms\n"
        "    points: [{name: v, address: 0}]\n",
    )
    issues = issues_of(name)
    assert [where(i) for i in issues] == [("agent.yaml", 6, 20, "devices[0].poll_interval")]
    assert issues[0].message == "must be at least 50ms"


def test_control_character_is_an_error_not_a_traceback(cfgdir: Path) -> None:
    (cfgdir / "agent.yaml").write_bytes(b"gateway_id: gw1\nstate_dir: s\x00\n")
    code, lines = validate("agent.yaml")
    assert code == EX_CONFIG
    assert lines[0].startswith("agent.yaml:2:") and "not YAML text" in lines[0]


def test_merge_keys_do_not_crash_positions(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD + "devices:\n"
        "  - &d {id: d0, host: h, port: 99999, points: [{name: v, address: 0}]}\n"
        "  - <<: *d\n    id: d1\n"
        "  - <<: *d\n",
    )
    issues = issues_of(name)
    paths = {i.path for i in issues}
    assert "devices[0].port" in paths and "devices[1].port" in paths
    assert any("duplicate device id 'd0'" in i.message for i in issues)


def test_include_patterns_reported_at_their_own_line(cfgdir: Path) -> None:
    name = write(
        cfgdir, "agent.yaml", HEAD + "include:\n  - inc/*.yaml\n  - missing/*.yaml\n  - ''\n"
    )
    got = [(i.line, i.message) for i in issues_of(name) if i.path.startswith("include")]
    assert got == [
        (4, "include 'inc/*.yaml' matches no file"),
        (5, "include 'missing/*.yaml' matches no file"),
        (6, "empty include pattern"),
    ]


def test_version_as_string_says_how_to_fix(cfgdir: Path) -> None:
    name = write(cfgdir, "agent.yaml", 'version: "1"\n' + HEAD + ONE_DEVICE)
    assert [i.message for i in issues_of(name)] == ["write 1 as a number, without quotes"]


def test_config_that_is_a_list_or_a_directory(cfgdir: Path) -> None:
    name = write(cfgdir, "agent.yaml", "- a\n- b\n")
    assert "holds a list" in issues_of(name)[0].message
    (cfgdir / "adir").mkdir()
    assert "is a directory" in issues_of("adir")[0].message


@pytest.mark.parametrize("prefix", ["lifeline/", "/lifeline", "a//b", "city/+", "a b"])
def test_topic_prefix_must_be_clean_levels(cfgdir: Path, prefix: str) -> None:
    name = write(cfgdir, "agent.yaml", HEAD + f"mqtt:\n  topic_prefix: '{prefix}'\n" + ONE_DEVICE)
    (issue,) = issues_of(name)
    assert issue.path == "mqtt.topic_prefix"
    assert "topic levels separated by single '/'" in issue.message


def test_duplicate_point_reported_at_the_second_one(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD + "devices:\n  - id: d1\n    host: h\n    points:\n"
        "      - {name: temp, address: 0}\n      - {name: temp, address: 1}\n",
    )
    (issue,) = issues_of(name)
    assert where(issue) == ("agent.yaml", 8, 16, "devices[0].points[1].name")
    assert issue.message == "point name 'temp' appears twice in device 'd1' (also points[0])"


def test_names_and_quoted_values_explained_in_words(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        "gateway_id: gw 17\nstate_dir: s\nmqtt: {username: 12345, password: 67890}\n" + ONE_DEVICE,
    )
    messages = {i.path: i.message for i in issues_of(name)}
    assert "letters, digits" in messages["gateway_id"] and "^" not in messages["gateway_id"]
    assert messages["mqtt.username"] == '12345 is not text: write it in quotes, e.g. "12345"'
    # a secret is never repeated, not even a mistyped one
    assert messages["mqtt.password"] == (
        "must be text: write it in quotes (the value is not repeated here)"
    )


def test_unusable_state_dir_is_a_config_error(cfgdir: Path) -> None:
    (cfgdir / "afile").write_text("x")
    name = write(cfgdir, "agent.yaml", "gateway_id: g\nstate_dir: afile/state\n" + ONE_DEVICE)
    (issue,) = issues_of(name)
    assert issue.path == "state_dir" and "is not a directory" in issue.message
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", name],
        capture_output=True,
        text=True,
        cwd=cfgdir,
        check=False,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == EX_CONFIG, out.stderr


def test_case_014_validate_says_where_modicon_numbers_point(cfgdir: Path) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD + "devices:\n  - id: d1\n    host: h\n    points:\n"
        '      - {name: a, register: "40110"}\n'
        "      - {name: f, table: holding, address: 40001}\n",
    )
    code, lines = validate(name)
    assert code == 0
    assert lines[0] == (
        "agent.yaml:7:29: devices[0].points[0].register: note: Modicon 40110 is holding "
        "address 109 (FC 03)"
    )
    assert lines[1].startswith("agent.yaml:8:44: devices[0].points[1].address: warning: ")
    assert "looks like a Modicon register number" in lines[1]
    cfg = load_config(name)
    assert [(p.table, p.address) for p in cfg.devices[0].points] == [
        ("holding", 109),
        ("holding", 40001),  # used as written, never "fixed"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gateway_id: g\n? [a, b]\n: c\n", "agent.yaml:2:3: a key that is a list or a map"),
        (
            "gateway_id: g\nmqtt: &m {host: a, x: *m}\n",
            "agent.yaml:2:23: the alias *m is inside the value &m it refers to",
        ),
        (
            "gateway_id: g\nmqtt: " + "[" * 3000 + "]" * 3000 + "\n",
            "agent.yaml:2:70: nested more than 64 levels deep",
        ),
        (
            "a0: &a0 [x,x,x,x,x,x,x,x,x,x]\n"
            + "".join(f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
            + "gateway_id: g\n",
            "agent.yaml:6:",
        ),
    ],
)
def test_hostile_yaml_is_a_config_error(cfgdir: Path, text: str, message: str) -> None:
    """Complex keys, recursive aliases, absurd nesting and alias bombs: a clear error at
    once, never a traceback or a hang."""
    name = write(cfgdir, "agent.yaml", text)
    code, lines = validate(name)
    assert code == EX_CONFIG
    assert lines[0].startswith(message), lines


def test_alarm_and_pin_values_are_checked(cfgdir: Path) -> None:
    base = HEAD + "devices: [{id: d, host: h, points: [{name: v, address: 0}]}]\n"
    for bad, message in (
        ("alarms: [{id: a, device: d, point: v, kind: high, setpoint: .nan}]\n", "finite"),
        ("outputs: [{name: o, kind: relay, pin: true, severities: [warning]}]\n", "not a pin"),
        ("outputs: [{name: o, kind: relay, pin: GPIO99, severities: [warning]}]\n", "pin name"),
        ("outputs: [{name: o, kind: relay, pin: 60, severities: [warning]}]\n", "does not exist"),
    ):
        name = write(cfgdir, "agent.yaml", base + bad)
        (issue,) = issues_of(name)
        assert message in issue.message, issue
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD + "devices: [{id: d, host: h, max_registers: 2, points: "
        "[{name: v, address: 0, type: float64}]}]\n",
    )
    (issue,) = issues_of(name)
    assert "needs 4 registers but max_registers is 2" in issue.message


def test_clock_and_buffer_settings_that_defeat_their_purpose_are_refused(cfgdir: Path) -> None:
    write(
        cfgdir,
        "a.yaml",
        HEAD + "clock: {sync: file, sync_file: ''}\n"
        "buffer: {max_bytes: 1KB, disk_retry: 1ms, commit_every: 1h}\n",
    )
    messages = [i.message for i in issues_of("a.yaml")]
    assert any("sync_file is empty" in m for m in messages), messages
    assert any("at least 1000000" in m for m in messages), messages
    assert any("at least 1s" in m for m in messages), messages
    assert any("at most 60" in m for m in messages), messages
    write(cfgdir, "b.yaml", HEAD + "clock:\n  not_before: 2999-01-01\n")
    (issue,) = issues_of("b.yaml")
    assert "in the future" in issue.message and issue.line == 4


def test_an_impossible_unquoted_date_is_a_config_error_at_its_line(cfgdir: Path) -> None:
    write(cfgdir, "a.yaml", HEAD + "clock:\n  not_before: 2026-13-01\n")
    (issue,) = issues_of("a.yaml")
    assert (issue.line, issue.col) == (4, 15)
    assert "2026-13-01 is not a valid date" in issue.message and "quote it" in issue.message


def test_relative_sync_file_is_relative_to_the_config_file(cfgdir: Path) -> None:
    write(cfgdir, "site/a.yaml", HEAD + "clock: {sync: file, sync_file: flag}\n" + ONE_DEVICE)
    cfg = load_config("site/a.yaml")
    assert cfg.clock.sync_file == str(cfgdir / "site" / "flag")


def test_a_section_written_as_a_value_says_how_to_write_it(cfgdir: Path) -> None:
    write(cfgdir, "a.yaml", HEAD + "clock: auto\n" + ONE_DEVICE)
    (issue,) = issues_of("a.yaml")
    assert "a section of keys, not 'auto'" in issue.message and issue.line == 3
    write(cfgdir, "b.yaml", HEAD + "clock: {not_before: 2026-11-15T10:00:00Z}\n" + ONE_DEVICE)
    (issue,) = issues_of("b.yaml")
    assert issue.message.startswith("2026-11-15T10:00:00+00:00 is not a date")


def test_an_id_with_text_in_it_says_which_id_to_use_and_where_the_text_goes(
    cfgdir: Path,
) -> None:
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD + 'devices:\n  - id: "pump #2"\n    host: h\n    points: [{name: v, address: 0}]\n',
    )
    (issue,) = issues_of(name)
    assert where(issue) == ("agent.yaml", 4, 9, "devices[0].id")
    assert issue.message == (
        "'pump #2' is not allowed as an id: use 1 to 64 letters, digits, '_', '.' or '-', "
        "starting with a letter or digit (no spaces, '/', '+', '#' or control characters: "
        "ids become MQTT topic levels); try 'pump-2', and put the text in name: \"pump #2\""
    )
    write(
        cfgdir,
        "agent.yaml",
        HEAD + 'devices:\n  - {id: pump-2, name: "pump #2", host: h, points: [{name: v, '
        "address: 0}]}\n",
    )
    assert load_config(name).devices[0].name == "pump #2"


def test_a_huge_id_is_shown_by_its_start_and_length(cfgdir: Path) -> None:
    huge = "x" * 70_000 + " y"
    device = f'  - {{id: "{huge}", host: h, points: [{{name: v, address: 0}}]}}\n'
    name = write(cfgdir, "agent.yaml", HEAD + "devices:\n" + device + device)
    issues = issues_of(name)
    assert [i.path for i in issues] == ["devices[0].id", "devices[1].id", "devices[1].id"]
    assert all(len(i.message) < 400 for i in issues), [len(i.message) for i in issues]
    assert "(70002 characters)" in issues[0].message


def test_small_mistakes_get_plain_words(cfgdir: Path) -> None:
    """A tab, a port that is no number: said in words a technician can act on."""
    (issue,) = issues_of(write(cfgdir, "tab.yaml", HEAD + "mqtt:\n\thost: x\n" + ONE_DEVICE))
    assert where(issue)[:3] == ("tab.yaml", 4, 1)
    assert "never with tabs" in issue.message
    (issue,) = issues_of(write(cfgdir, "port.yaml", HEAD + "mqtt:\n  port: 4l96\n" + ONE_DEVICE))
    assert issue.path == "mqtt.port" and issue.message == "'4l96' is not a whole number"


def test_a_comment_glued_to_an_id_is_warned(cfgdir: Path) -> None:
    """`id: culvert #2` is the id 'culvert' and a comment; validate says so (an id with a
    comment after a space, '# like this', is left alone)."""
    name = write(
        cfgdir,
        "agent.yaml",
        HEAD
        + "devices:\n"
        + "  - id: culvert #2\n    host: 192.0.2.1\n    points: [{name: v, address: 0}]\n"
        + "  - id: gate  # the north gate\n    host: 192.0.2.2\n"
        + "    points: [{name: v, address: 0}]\n",
    )
    cfg = load_config(name)
    assert [d.id for d in cfg.devices] == ["culvert", "gate"]
    (note,) = config_notes(name)
    assert (note.file, note.line, note.col, note.level) == ("agent.yaml", 4, 17, "warning")
    assert "'#2' after id 'culvert' is a YAML comment" in note.message
    assert "'culvert-2'" in note.message


def test_yaml_1_2_flow_colons_load_and_get_their_notes(cfgdir: Path) -> None:
    """An unquoted ``a:b`` inside a flow mapping is one text in YAML 1.2 (libyaml refuses
    it): the loader takes it, and validate reads the file the same way, so its notes are
    printed; an error in such a file is said at its line."""
    point = '{name: a, register: "40110", description: pump:north, unit: "m"}'
    text = HEAD + "mqtt: {host: fe80::1, tls: false}\ndevices:\n  - id: d1\n    host: h\n"
    bad = f"    points: [{point}, {{name: b:c, address: 1}}]\n"
    (issue,) = issues_of(write(cfgdir, "agent.yaml", text + bad))
    assert where(issue) == ("agent.yaml", 7, 87, "devices[0].points[1].name")
    assert issue.message.startswith("'b:c' is not allowed as an id: ")
    name = write(cfgdir, "agent.yaml", text + f"    points: [{point}]\n")
    cfg = load_config(name)
    assert cfg.mqtt.host == "fe80::1"
    assert cfg.devices[0].points[0].description == "pump:north"
    code, lines = validate(name)
    assert code == 0
    assert lines[0] == (
        "agent.yaml:7:34: devices[0].points[0].register: note: Modicon 40110 is holding "
        "address 109 (FC 03)"
    )
    assert any(line.startswith("agent.yaml:3:") and "TLS is off" in line for line in lines)
