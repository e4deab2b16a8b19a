"""Hostile configs: ids that would break topics, config bombs, files outside the config's
directory, unsafe state directories, and the files a running agent creates.

Every refusal is checked where it is said (FILE:LINE:COL) and, for at least one case of
each kind, through a real ``python -m agent validate`` (exit code 78, EX_CONFIG). The bombs
run in a child process whose own CPU time and peak memory are read with wait4(2).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli import EX_CONFIG
from agent.config.loader import (
    MAX_FILE_BYTES,
    ConfigError,
    ConfigIssue,
    _prescan,
    _read_text,
    load_config,
)
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    REPO,
    AgentProcess,
    Mosquitto,
    Subscriber,
    one_point_device,
    wait_until,
    write_config,
)

ONE_DEVICE = "devices:\n  - {id: d1, host: 192.0.2.1, points: [{name: v, address: 0}]}\n"
HEAD = "gateway_id: gw\nstate_dir: state\n"

CPU_BOUND_S = 5.0
"""What a hostile file at the caps may cost the checking process in CPU. Measured 0.7 to
2.6 s on the 2-core test machines (the most on a slower guest), against 15 to 18 s when
the file was read again with ruamel's round-trip loader and the 30 s RLIMIT_CPU of the
checking process: a bound on the work done per input, not a performance figure (those
are measured in bench/)."""


def issues_of(path: Path) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return exc.value.issues


def where(issue: ConfigIssue) -> tuple[int, int, str]:
    return issue.line, issue.col, issue.path


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    """``python -m agent validate PATH`` as a child process, from the file's directory."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "validate", path.name],
        capture_output=True,
        text=True,
        cwd=path.parent,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


# ---------------------------------------------------------------------------------------
# ids


CASE_051 = ["T2 candle 5W RGB+CW", "HM-1500 #1", "Pump 3/North", "Pump 3 North", "Pumpe Süd"]
CASE_051_FIX = ["T2-candle-5W-RGB-CW", "HM-1500-1", "Pump-3-North", "Pump-3-North", "Pumpe-Sud"]


def _case_051_config(ids: list[str], names: list[str] | None = None) -> str:
    text = "gateway_id: gw-017\nstate_dir: state\nmqtt: {topic_prefix: city/gw/gw-017}\ndevices:\n"
    for i, dev in enumerate(ids):
        text += f'  - id: "{dev}"\n'
        if names is not None:
            text += f'    name: "{names[i]}"\n'
        text += "    host: 192.0.2.7\n    points: [{name: level_cm, address: 0}]\n"
    return text


def test_case_051_topic_injection_device_names(tmp_path: Path) -> None:
    """The device names of case 051 used as ids ('+', '#', '/', spaces, a non-ASCII
    letter) are refused at their lines, each with an id to use instead and the advice to
    keep the text in ``name``; the same texts as ``name`` beside safe ids load unchanged;
    the suggestions that coincide ('Pump 3/North', 'Pump 3 North') cannot both be used,
    the duplicate id names both devices; a '+' in topic_prefix names the key."""
    path = tmp_path / "agent.yaml"
    path.write_text(_case_051_config(CASE_051), encoding="utf-8")
    issues = issues_of(path)
    assert [where(i) for i in issues] == [
        (5 + 3 * k, 9, f"devices[{k}].id") for k in range(len(CASE_051))
    ]
    for issue, text, fix in zip(issues, CASE_051, CASE_051_FIX, strict=True):
        assert issue.message.startswith(f"{text!r} is not allowed as an id: "), issue.message
        assert "letters, digits, '_', '.' or '-'" in issue.message
        assert issue.message.endswith(f'; try {fix!r}, and put the text in name: "{text}"')

    ids = [f"dev-{k}" for k in range(len(CASE_051))]
    path.write_text(_case_051_config(ids, CASE_051), encoding="utf-8")
    cfg = load_config(path)
    assert [(d.id, d.name) for d in cfg.devices] == list(zip(ids, CASE_051, strict=True))

    path.write_text(_case_051_config(CASE_051_FIX, CASE_051), encoding="utf-8")
    (dup,) = issues_of(path)
    assert where(dup) == (17, 9, "devices[3].id")
    assert dup.message.startswith("duplicate device id 'Pump-3-North' (also devices[2])")

    path.write_text(_case_051_config(ids).replace("city/gw/gw-017", "city/gw/+"))
    (prefix,) = issues_of(path)
    assert where(prefix) == (3, 22, "mqtt.topic_prefix")
    assert "'+' and '#' are MQTT wildcards" in prefix.message
    assert prefix.message.endswith("; try 'city/gw'")


BAD_IDS = {  # YAML text -> what the message shows
    '"a/b"': "'a/b'",
    '"a+b"': "'a+b'",
    '"a#b"': "'a#b'",
    '"a b"': "'a b'",
    '"a\\0b"': "'a\\x00b'",  # the YAML escape \0 reaches the model as U+0000
    '""': "''",
}


def _assert_refused_at(out: subprocess.CompletedProcess[str], expected: list[str]) -> None:
    assert out.returncode == EX_CONFIG == 78, out.stderr
    assert "\x00" not in out.stderr
    lines = out.stderr.splitlines()
    assert lines[-1] == f"agent.yaml: {len(expected)} problem{'s' * (len(expected) > 1)} found"
    assert len(lines) == len(expected) + 1, lines
    for line, start in zip(lines[:-1], expected, strict=True):
        assert line.startswith(start), (line, start)
        assert "is not allowed as an id: use 1 to 64 letters, digits" in line


@pytest.mark.parametrize("text", list(BAD_IDS))
def test_bad_gateway_id_refused_by_validate(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"state_dir: state\ngateway_id: {text}\n" + ONE_DEVICE)
    out = validate(path)
    _assert_refused_at(out, [f"agent.yaml:2:13: gateway_id: {BAD_IDS[text]} is not allowed"])


def test_bad_device_ids_refused_by_validate(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        HEAD
        + "devices:\n"
        + "".join(
            f"  - id: {text}\n    host: 192.0.2.1\n    points: [{{name: v, address: 0}}]\n"
            for text in BAD_IDS
        )
    )
    expected = [
        f"agent.yaml:{4 + 3 * k}:9: devices[{k}].id: {shown} is not allowed"
        for k, shown in enumerate(BAD_IDS.values())
    ]
    _assert_refused_at(validate(path), expected)


def test_bad_point_names_refused_by_validate(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        HEAD
        + "devices:\n  - id: d1\n    host: 192.0.2.1\n    points:\n"
        + "".join(f"      - {{name: {text}, address: {k}}}\n" for k, text in enumerate(BAD_IDS))
    )
    expected = [
        f"agent.yaml:{7 + k}:16: devices[0].points[{k}].name: {shown} is not allowed"
        for k, shown in enumerate(BAD_IDS.values())
    ]
    _assert_refused_at(validate(path), expected)


def test_bad_rule_ids_refused_by_validate(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        HEAD
        + ONE_DEVICE
        + "alarms:\n"
        + "".join(
            f"  - {{id: {text}, device: d1, point: v, kind: high, setpoint: 1}}\n"
            for text in BAD_IDS
        )
    )
    expected = [
        f"agent.yaml:{6 + k}:10: alarms[{k}].id: {shown} is not allowed"
        for k, shown in enumerate(BAD_IDS.values())
    ]
    _assert_refused_at(validate(path), expected)


def test_output_and_channel_names_follow_the_id_rule(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        HEAD
        + "devices:\n"
        + "  - {id: quake, driver: seismic, serial_port: /dev/null, sample_rate: 100,\n"
        + '     channels: [{name: "H N"}]}\n'
        + "outputs:\n"
        + '  - {name: "horn #1", kind: buzzer, pin: GPIO17, severities: [critical]}\n'
    )
    messages = {i.path: i.message for i in issues_of(path)}
    assert messages["devices[0].channels[0].name"].startswith("'H N' is not allowed as an id")
    assert messages["outputs[0].name"].startswith("'horn #1' is not allowed as an id")
    assert messages["outputs[0].name"].endswith("; try 'horn-1'")


def test_raw_control_characters_are_refused_by_the_yaml_reader_at_their_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.yaml"
    for raw in (b"\x00", b"\x01", b"\x1b"):
        path.write_bytes(b"state_dir: state\ngateway_id: gw" + raw + b"1\n" + ONE_DEVICE.encode())
        (issue,) = issues_of(path)
        assert (issue.line, issue.col) == (2, 15)
        assert issue.message.startswith("not YAML text: ")


DEVICE_KINDS = [
    "{id: a, host: 192.0.2.1, points: [{name: v, address: 0}]",
    "{id: a, driver: modbus_rtu, serial_port: /dev/ttyUSB0, points: [{name: v, address: 0}]",
    "{id: a, driver: modbus_rtu_over_tcp, host: 192.0.2.1, port: 4001, "
    "points: [{name: v, address: 0}]",
    "{id: a, driver: serial_line, serial_port: /dev/ttyUSB1, parser: {kind: kv}, "
    "points: [{name: v}]",
    "{id: a, driver: seismic, serial_port: /dev/ttyUSB2, sample_rate: 100, channels: [{name: z}]",
]


@pytest.mark.parametrize("device", DEVICE_KINDS)
def test_every_device_kind_takes_a_display_name(tmp_path: Path, device: str) -> None:
    """``name`` takes any printable Unicode up to 200 characters; control characters
    (also as YAML escapes), bidirectional overrides and longer text are refused at it."""
    path = tmp_path / "agent.yaml"
    text = "Pumpe Süd #2 / 北 (RGB+CW) 🌊"
    path.write_text(HEAD + f'devices:\n  - {device}, name: "{text}"}}\n', encoding="utf-8")
    assert load_config(path).devices[0].name == text
    for bad, why in [
        ("a\\0b", "control character U+0000"),
        ("a\\tb", "control character U+0009"),
        ("\\u202eevil", "control character U+202E"),
        ("x" * 201, "at most 200"),
        ("  ", "name is empty"),
    ]:
        path.write_text(HEAD + f'devices:\n  - {device}, name: "{bad}"}}\n', encoding="utf-8")
        (issue,) = issues_of(path)
        assert issue.path.endswith(".name") and issue.line == 4, issue
        assert why in issue.message, issue.message
        assert len(issue.message) < 250


# ---------------------------------------------------------------------------------------
# topic prefix

HOSTILE_PREFIXES = {
    '"\\x01"': "it holds the control character U+0001",
    "x" * 70_000: "it is 70000 characters long",
    '"$SYS/x"': "topics starting with '$' belong to the broker",
    "a//b": "it has an empty level",
    "a/+/b": "'+' and '#' are MQTT wildcards",
}


@pytest.mark.parametrize("text", list(HOSTILE_PREFIXES), ids=lambda t: t[:12])
def test_hostile_topic_prefix_refused_by_validate(tmp_path: Path, text: str) -> None:
    """A control character (the broker refuses every connect), 70,000 characters (the
    MQTT task crashed), a leading '$' (the broker's own topics: acknowledged, never
    delivered), an empty level or a wildcard: each a config error at its line."""
    path = tmp_path / "agent.yaml"
    path.write_text(HEAD + f"mqtt:\n  topic_prefix: {text}\n" + ONE_DEVICE)
    out = validate(path)
    assert out.returncode == EX_CONFIG, out.stderr
    first, summary = out.stderr.splitlines()
    assert first.startswith("agent.yaml:4:17: mqtt.topic_prefix: "), first
    assert HOSTILE_PREFIXES[text] in first
    assert "topic levels separated by single '/'" in first
    assert len(first) < 500
    assert summary == "agent.yaml: 1 problem found"


# ---------------------------------------------------------------------------------------
# client id

HOSTILE_CLIENT_IDS = {
    '""': ("it is empty", None),
    '"gw 017"': ("' ' is not allowed", "gw-017"),
    '"city/gw-017"': ("'/' is not allowed", "city-gw-017"),
    '"gw+1"': ("'+' is not allowed", "gw-1"),
    '"gw#1"': ("'#' is not allowed", "gw-1"),
    '"gw\\0x"': ("it holds the control character U+0000", "gw-x"),
    '"gw\\x1b[2J"': ("it holds the control character U+001B", "gw-2J"),
    '"Pumpe-Süd"': ("'ü' is not allowed", "Pumpe-S-d"),
    "c" * 129: ("it is 129 characters long", "c" * 128),
}


@pytest.mark.parametrize("text", list(HOSTILE_CLIENT_IDS), ids=lambda t: t[:12])
def test_hostile_client_id_refused_by_validate(tmp_path: Path, text: str) -> None:
    """An empty client id, white space, '/', '+', '#', NUL and other control characters,
    letters outside ASCII and more than 128 characters: each a config error at its line,
    with an id to use instead."""
    why, fix = HOSTILE_CLIENT_IDS[text]
    path = tmp_path / "agent.yaml"
    path.write_text(HEAD + f"mqtt:\n  client_id: {text}\n" + ONE_DEVICE)
    out = validate(path)
    assert out.returncode == EX_CONFIG, out.stderr
    first, summary = out.stderr.splitlines()
    assert first.startswith("agent.yaml:4:14: mqtt.client_id: "), first
    assert why in first, first
    assert "1 to 128 letters, digits, '-', '_', '.' or ':'" in first
    assert (f"; try '{fix}'" in first) == (fix is not None), first
    assert "\x00" not in first and "\x1b" not in first and len(first) < 500
    assert summary == "agent.yaml: 1 problem found"


def test_client_id_longer_than_mqtt_3_1_1_promises_is_noted(tmp_path: Path) -> None:
    """More than 23 characters loads (common brokers take up to 65535), with a note from
    validate under MQTT 3.1.1 (section 3.1.3.1) and none under MQTT 5 or at 23."""
    path = tmp_path / "agent.yaml"
    for protocol, cid, noted in (
        ("3.1.1", "gw-017:north." + "x" * 11, True),
        ("3.1.1", "gw-017:north." + "x" * 10, False),
        ("5", "gw-017:north." + "x" * 11, False),
    ):
        path.write_text(
            HEAD + f'mqtt: {{protocol: "{protocol}", client_id: "{cid}"}}\n' + ONE_DEVICE
        )
        assert load_config(path).mqtt.client_id == cid
        out = validate(path)
        assert out.returncode == 0, out.stderr
        note = "agent.yaml:3:38: mqtt.client_id: note: the client id is 24 characters long"
        assert (note in out.stderr) == noted, out.stderr


def test_longest_prefix_and_ids_pass_through_a_real_broker(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """The limits are usable: a 100-character prefix, a 128-character client id of every
    kind of character allowed, and a 64-character gateway id, device
    id and point name publish through mosquitto on one CONNECT, while a display name with
    '+', '#', '/' and spaces (case 051) stays out of every topic."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="p" * 64, address=0)])
    sim.set_raw(1, "holding", 0, [42])
    sim.start_thread()
    prefix = "/".join(["c" * 49, "l" * 50])
    assert len(prefix) == 100
    gw, dev = "g" * 64, "Pump-3.North_" + "d" * 51
    cid = ("hostile-ids:" + "Aa0_.-:" * 20)[:128]
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"gateway_id: {gw}\nstate_dir: state\n"
        f"mqtt: {{port: {broker.port}, topic_prefix: {prefix}, client_id: '{cid}',\n"
        "       reconnect_min: 100ms, reconnect_max: 500ms}\n"
        f'devices:\n  - {{id: {dev}, name: "Pump 3/North #1 + RGB", host: 127.0.0.1,\n'
        f"     port: {sim.port}, poll_interval: 100ms, points: [{{name: {'p' * 64}, "
        "address: 0}]}\n"
    )
    sub = Subscriber(broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        agent.start()
        topic = f"{prefix}/{gw}/telemetry/{dev}"
        wait_until(lambda: len(sub.on(topic)) >= 10, 20, "10 readings")
        assert sub.on(topic)[-1].json()["points"]["p" * 64]["value"] == 42
        time.sleep(1)
        assert agent.stop() == 0, agent.log()
    finally:
        sub.close()
        sim.stop_thread()
    assert not [m.topic for m in sub.messages if "Pump 3" in m.topic or "+" in m.topic]
    connects = broker.log.read_text().count(f"as {cid}")
    assert connects == 1, "the agent reconnected: the broker refused something it sent"


# ---------------------------------------------------------------------------------------
# bombs

SECRET = "hunter2-do-not-print"


def _bombs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each bomb in a directory of its own: name -> (file, the first line expected).
    Columns counted by hand: the root map is level 1, so the 64th opening bracket is the
    65th level."""
    n = 30_000
    out: dict[str, tuple[Path, str]] = {}

    def bomb(name: str, text: str, expected: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "agent.yaml").write_text(text)
        out[name] = (d / "agent.yaml", expected)
        return d

    deep = "nested more than 64 levels deep"
    # "devices: " is 9 characters: the 64th '[' at 10 + 63; '{a: ' takes 4: 10 + 63 * 4
    bomb("flow", HEAD + "devices: " + "[" * n + "]" * n + "\n", f"agent.yaml:3:73: {deep}")
    bomb("map", HEAD + "devices: " + "{a: " * n + "1" + "}" * n + "\n", f"agent.yaml:3:262: {deep}")
    bomb("block", HEAD + "devices:\n" + "- " * n + "x\n", f"agent.yaml:4:127: {deep}")
    bomb("unclosed", "[" * 60_000, f"agent.yaml:1:65: {deep}")
    # a0 holds 11 values, a1 111, ... a4 111,111: the second *a4 of a5 (line 6, column
    # 14) passes 250,000
    laughs = "a0: &a0 [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
    )
    many = "more than 250000 values once aliases are expanded"
    bomb("aliases", laughs + HEAD + ONE_DEVICE, f"agent.yaml:6:14: {many}")
    # 2.8 MB of one list: 6 values before it (the root map, its 3 keys, 2 scalars), the
    # list, then item i (column 5 + 2i) is value 8 + i: value 250,001 is item 249,993
    bomb("values", HEAD + "x: [" + "1," * 1_400_000 + "1]\n", f"agent.yaml:3:499991: {many}")
    bomb(
        "huge",
        HEAD + ONE_DEVICE + "# padding\n" * 420_000,
        "agent.yaml:1:1: the file is 4.2 MB: a config file may have at most 3 MB",
    )
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.yaml").write_text(f"id: x\nhost: {SECRET}\npoints: {SECRET}\n")
    (outside / "p.yaml").write_text(f"name: p\ndescription: {SECRET}\npoints: {SECRET}\n")
    bomb(
        "include",
        HEAD + "include: ../outside/secret.yaml\n" + ONE_DEVICE,
        "agent.yaml:3:10: include: include '../outside/secret.yaml' reaches outside",
    )
    d = bomb(
        "linked",
        HEAD + "include: [devices/*.yaml]\n" + ONE_DEVICE,
        "agent.yaml:3:11: include[0]: include 'devices/*.yaml' matches devices/a.yaml, a link "
        "to a file outside",
    )
    (d / "devices").mkdir()
    (d / "devices" / "a.yaml").symlink_to(outside / "secret.yaml")
    bomb(
        "profiles",
        HEAD + "profiles_dir: ../outside\n" + ONE_DEVICE,
        "agent.yaml:3:15: profiles_dir: profiles_dir '../outside' leads to",
    )
    d = bomb("profile-link", HEAD + ONE_DEVICE, "profiles/p.yaml:1:1: a link to a file outside")
    (d / "profiles").mkdir()
    (d / "profiles" / "p.yaml").symlink_to(outside / "p.yaml")
    return out


BOMBS = [
    "flow",
    "map",
    "block",
    "unclosed",
    "aliases",
    "values",
    "huge",
    "include",
    "linked",
    "profiles",
    "profile-link",
]


PEAK_PROBE = """
import atexit, runpy, sys
target, config = sys.argv[1], sys.argv[2]
def peak():
    with open("/proc/self/status") as f:
        hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
    with open(target, "w") as out:
        out.write(hwm)
atexit.register(peak)
sys.argv = ["edge-agent", "validate", config]
runpy.run_module("agent", run_name="__main__")
"""
"""Runs ``python -m agent validate FILE`` and, at its exit, writes the process's own peak
resident set (``VmHWM``, kB, proc(5)) to a file: exec gives the child a new address space
whose high-water mark starts from nothing, unlike wait4's ``ru_maxrss``, which keeps the
pages the forked child shared with the (large) test process before exec."""


def run_measured(path: Path) -> tuple[int, str, float, float, int]:
    """Run ``edge-agent validate`` on ``path`` in a child; return (exit code, stderr, wall
    seconds, CPU seconds, peak RSS bytes). CPU time is the child's own, read by wait4(2);
    the peak is the child's ``VmHWM`` after exec (:data:`PEAK_PROBE`)."""
    err = path.parent / "stderr.txt"
    peak = path.parent / "peak.txt"
    with err.open("w") as f:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", PEAK_PROBE, str(peak), path.name],
            stdout=subprocess.DEVNULL,
            stderr=f,
            cwd=path.parent,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    rss = int(peak.read_text()) * 1024 if peak.exists() else 1 << 40
    return code, err.read_text(), wall, usage.ru_utime + usage.ru_stime, rss


@pytest.mark.parametrize("name", BOMBS)
def test_config_bombs_refused_fast_in_little_memory(tmp_path: Path, name: str) -> None:
    """Deep nesting (flow, block and map forms; today 30,000 levels are a SIGSEGV), an
    alias bomb, a million values, a 4 MB file, an include or profiles_dir outside the
    config's directory and links leading out of it: each refused at a line with a clear
    message, exit code 78, in a few seconds of CPU (CPU_BOUND_S) and 100 MB, never showing
    a word of a file outside the config's directory."""
    path, expected = _bombs(tmp_path)[name]
    code, err, wall, cpu, rss = run_measured(path)
    figures = f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU, {rss / 1e6:.0f} MB"
    assert code == EX_CONFIG, (
        f"{figures}; exit {code} ({signal.Signals(-code).name if code < 0 else ''}): {err}"
    )
    assert err.startswith(expected), err
    assert SECRET not in err
    assert cpu < CPU_BOUND_S, figures
    assert wall < 5.0, figures  # a loaded machine's wall clock; CPU time is the cost
    assert rss < 100_000_000, figures
    print(figures)


def _many_files_bombs(tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """Configs whose files are each within the per-file caps but not together, includes
    that loop or repeat, wildcards outside the file name, maps of many keys and lists of
    many empty lists: name -> (file, the start of the first line, a part of it)."""
    out: dict[str, tuple[Path, str, str]] = {}

    def config(name: str, text: str, start: str, part: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "agent.yaml").write_text(text)
        out[name] = (d / "agent.yaml", start, part)
        return d

    device = "id: d{k}\nhost: 192.0.2.1\npoints: [{{name: v, address: 0}}]\n"
    d = config(
        "65-files",
        HEAD + "include: inc/*.yaml\n" + ONE_DEVICE,
        "agent.yaml:3:10: include: include 'inc/*.yaml' matches more than 64 files",
        "a config may be made of at most 64 files",
    )
    (d / "inc").mkdir()
    for k in range(1000):
        (d / "inc" / f"{k:04d}.yaml").write_text(device.format(k=k))
    # two files of 1.6 MB each: each within 3 MB, not both
    pad = "# padding\n" * 160_000
    d = config("bytes", HEAD + "include: [a.yaml, b.yaml]\n" + ONE_DEVICE, "b.yaml:1:1: ", "")
    out["bytes"] = (
        d / "agent.yaml",
        "b.yaml:1:1: with this file, the 3 files of",
        "hold 3.2 MB: at most 3 MB in all",
    )
    (d / "a.yaml").write_text(device.format(k=1) + pad)
    (d / "b.yaml").write_text(device.format(k=2) + pad)
    # two files of 150,000 values each: each within 250,000, not both
    values = "x: [" + "1," * 150_000 + "1]\n"
    d = config("values-in-all", HEAD + "include: [a.yaml, b.yaml]\n" + ONE_DEVICE, "b.yaml:1:", "")
    out["values-in-all"] = (
        d / "agent.yaml",
        "b.yaml:1:",
        "more than 250000 values in all the files of agent.yaml",
    )
    (d / "a.yaml").write_text(device.format(k=7) + values)
    (d / "b.yaml").write_text(values)
    config(
        "self",
        HEAD + "include: '*.yaml'\n" + ONE_DEVICE,
        "agent.yaml:3:10: include: include '*.yaml' matches agent.yaml, the config file itself: "
        "an include cycle (agent.yaml -> agent.yaml -> agent.yaml)",
        "",
    )
    d = config(
        "twice",
        HEAD + "include: [a.yaml, same.yaml]\n" + ONE_DEVICE,
        "agent.yaml:3:19: include[1]: include 'same.yaml' matches same.yaml, the same file as "
        "a.yaml (a link): a file is included once",
        "",
    )
    (d / "a.yaml").write_text(device.format(k=7))
    (d / "same.yaml").symlink_to("a.yaml")
    for name, pattern in (("star-star", "**/*.yaml"), ("star-dir", "*/a.yaml")):
        d = config(
            name,
            HEAD + f"include: '{pattern}'\n" + ONE_DEVICE,
            f"agent.yaml:3:10: include: include '{pattern}': wildcards (*, ?, [...]) may stand "
            "in the file name only",
            "",
        )
        (d / "sub").mkdir()
        (d / "sub" / "a.yaml").write_text(device.format(k=1))
    many = "more than 250000 values once aliases are expanded"
    keys = ", ".join(f"k{i}" for i in range(250_000))
    config("keys", HEAD + "x: {" + keys + "}\n", "agent.yaml:3:", many)
    config("empty-lists", HEAD + "x: [" + "[]," * 250_000 + "[]]\n", "agent.yaml:3:", many)
    return out


MANY_FILES = [
    "65-files",
    "bytes",
    "values-in-all",
    "self",
    "twice",
    "star-star",
    "star-dir",
    "keys",
    "empty-lists",
]


@pytest.mark.parametrize("name", MANY_FILES)
def test_include_trees_and_counts_refused_fast_in_little_memory(tmp_path: Path, name: str) -> None:
    """The caps hold for a config's files together (64 files, 3 MB, 250,000 values),
    includes neither loop nor repeat a file (also through a link), wildcards stand in the
    file name only, and keys and empty lists count as values: each refused by validate
    with exit code 78 at its place, in a few seconds of CPU (CPU_BOUND_S) and 100 MB."""
    path, start, part = _many_files_bombs(tmp_path)[name]
    code, err, wall, cpu, rss = run_measured(path)
    figures = f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU, {rss / 1e6:.0f} MB"
    assert code == EX_CONFIG, f"{figures}; exit {code}: {err}"
    first = err.splitlines()[0]
    assert first.startswith(start), err
    assert part in first, err
    assert cpu < CPU_BOUND_S, figures
    assert rss < 100_000_000, figures
    print(figures)


def test_ten_thousand_points_fit_the_caps(tmp_path: Path) -> None:
    """The caps leave room for a big gateway: 10 devices × 1000 points, one key per line
    and a description for each point (2.5 MB, 110,000 values), passes the size cap and the
    walk over its events; one of its devices loads (the whole file loads in about 6 s on
    a 2-core machine, see README)."""
    lines = ["gateway_id: gw-big", "state_dir: state", "devices:"]
    for d in range(10):
        lines += [f"  - id: dev-{d:02d}", f"    host: 192.0.2.{d + 1}", "    points:"]
        for p in range(1000):
            lines += [
                f"      - name: point-{p:04d}",
                "        table: holding",
                f"        address: {p * 2}",
                "        type: float32",
                "        byte_order: CDAB",
                "        scale: 0.01",
                "        offset: 0",
                "        decimals: 2",
                "        unit: m",
                f"        description: water level at gauge {p}, upstream side",
            ]
    text = "\n".join(lines) + "\n"
    assert 2_400_000 < len(text) < MAX_FILE_BYTES
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    _prescan(_read_text(path, "agent.yaml"), "agent.yaml")  # raises when refused
    path.write_text("\n".join(lines[: 3 + 3 + 10_000]) + "\n")
    assert [len(d.points) for d in load_config(path).devices] == [1000]


def test_yaml_1_2_that_libyaml_refuses_is_still_depth_checked(tmp_path: Path) -> None:
    """An IPv6 address in a flow map is YAML 1.2 that libyaml refuses; the ruamel parser
    then reads the file, and the nesting that follows is refused as fast."""
    path = tmp_path / "agent.yaml"
    path.write_text(HEAD + "mqtt: {host: fe80::1}\n" + ONE_DEVICE)
    assert load_config(path).mqtt.host == "fe80::1"
    path.write_text(HEAD + "mqtt: {host: fe80::1}\nx: " + "[" * 30_000 + "\n")
    code, err, _, cpu, rss = run_measured(path)
    assert code == EX_CONFIG
    assert err.startswith("agent.yaml:4:67: nested more than 64 levels deep"), err
    assert cpu < CPU_BOUND_S and rss < 100_000_000, (cpu, rss)


def _at_the_caps() -> dict[str, tuple[str, str]]:
    """Files within every cap (3 MB, 250,000 values, 64 deep), each with one mistake at a
    known line: name -> (text, the start of the first line validate prints). The config
    and its device take 21 values with the key 'x' and its list or map."""
    numbers = range(249_970)  # 21 + 249,970 values
    keys = range(124_985)  # 21 + 2 x 124,985
    unknown = "agent.yaml:5:1: x: unknown key 'x'; allowed keys: version, gateway_id"
    last = 6 + len(numbers)  # the line after the list
    return {
        "list": (HEAD + ONE_DEVICE + f"x: [{', '.join(map(str, numbers))}]\n", unknown),
        "list-block": (
            HEAD + ONE_DEVICE + "x:\n" + "".join(f"  - {i}\n" for i in numbers),
            unknown,
        ),
        "map": (HEAD + ONE_DEVICE + f"x: {{{', '.join(f'k{i}: {i}' for i in keys)}}}\n", unknown),
        "map-block": (
            HEAD + ONE_DEVICE + "x:\n" + "".join(f"  k{i}: {i}\n" for i in keys),
            unknown,
        ),
        # YAML 1.2 that libyaml refuses (':' in a flow map), 249,960 values after it
        "flow-colon": (
            HEAD
            + "mqtt: {host: fe80::1, tls: false}\n"
            + ONE_DEVICE
            + f"x: [{', '.join(map(str, numbers[:249_960]))}]\n",
            unknown.replace(":5:1:", ":6:1:"),
        ),
        # a key indented 1 space at the end of 2.4 MB: libyaml finds it, in its words,
        # which are said as ruamel's parser would have them said
        "syntax": (
            HEAD + ONE_DEVICE + "x:\n" + "".join(f"  - {i}\n" for i in numbers) + " y: 1\n",
            f"agent.yaml:{last}:2: YAML syntax error: line {last} (y) is indented 1 space, "
            "which lines up with nothing above it",
        ),
    }


@pytest.mark.parametrize("name", ["list", "list-block", "map", "map-block", "flow-colon", "syntax"])
def test_files_at_the_caps_are_explained_fast_in_little_memory(tmp_path: Path, name: str) -> None:
    """A 250,000-number list, a 125,000-key map (flow and block), the same behind YAML 1.2
    that libyaml refuses, a syntax error at the end of 2.4 MB: each said at its line by
    validate with exit code 78, in a few seconds of CPU (CPU_BOUND_S) and 100 MB (reading
    such a file again with ruamel's round-trip loader for the positions took 15-18 s and
    300-390 MB)."""
    text, expected = _at_the_caps()[name]
    assert len(text) <= MAX_FILE_BYTES
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    code, err, wall, cpu, rss = run_measured(path)
    figures = f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU, {rss / 1e6:.0f} MB"
    assert code == EX_CONFIG, f"{figures}; exit {code}: {err[:2000]}"
    assert err.startswith(expected), err[:2000]
    assert len(err.splitlines()) == 2, err[:2000]
    assert cpu < CPU_BOUND_S, figures
    assert rss < 100_000_000, figures
    print(figures)


# ---------------------------------------------------------------------------------------
# state_dir


@pytest.mark.parametrize(
    ("state_dir", "why"),
    [
        ("/", "/ is a system directory"),
        ("/etc", "/etc is a system directory"),
        ("/var/lib", "/var/lib is a system directory"),
        ("/sys/kernel/x", "/sys/kernel/x is a system directory"),
        ("/etc/edge-agent", "/etc/edge-agent is a system directory (everything below /etc"),
        ("/usr/local/lib/edge-agent", "is a system directory (everything below /usr is)"),
        ("/bin/edge-agent", "is a system directory"),
        ("/sbin/edge-agent", "is a system directory"),
        ("/lib/edge-agent", "is a system directory"),
        ("/lib64/edge-agent", "is a system directory"),
        ("/proc/1", "is a system directory"),
        ("/dev/shm/edge-agent", "/dev/shm/edge-agent is a system directory (everything below"),
        ("/boot/firmware/x", "is a system directory (everything below /boot is)"),
        ("to-etc/edge-agent", "leads through a link to /etc/edge-agent, and /etc/edge-agent is"),
        ("to-root", "leads through a link to /, and / is a system directory"),
        ("open", "is writable by every user: another user could replace the buffer"),
        ("open/state", "above {base}/open/state, is writable by every user"),
        ("sticky/state", None),
        ("grp", "is writable by group"),
    ],
)
def test_unsafe_state_dir_refused_at_its_line(
    tmp_path: Path, state_dir: str, why: str | None
) -> None:
    """System directories, anything below /etc, /usr, /bin, /sbin, /lib*, /boot, /proc,
    /sys or /dev (also through a link), and directories others can write, or that let
    others put a link in place of the state directory, are refused; below a world-writable directory
    with the sticky bit (like /tmp) a directory of this user's is fine."""
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "sticky").mkdir()
    (tmp_path / "sticky").chmod(0o1777)
    (tmp_path / "grp").mkdir()
    foreign_group = next(g for g in range(1, 65534) if g != os.getegid())
    try:
        os.chown(tmp_path / "grp", -1, foreign_group)
    except PermissionError:
        done = subprocess.run(
            ["sudo", "-n", "chgrp", str(foreign_group), str(tmp_path / "grp")],
            capture_output=True,
            check=False,
        )
        if done.returncode:
            pytest.fail("giving a directory to another group needs root or password-less sudo")
    (tmp_path / "grp").chmod(0o770)
    (tmp_path / "to-etc").symlink_to("/etc")
    (tmp_path / "to-root").symlink_to("/")
    path = tmp_path / "agent.yaml"
    path.write_text(f"gateway_id: gw\nstate_dir: {state_dir}\n" + ONE_DEVICE)
    if why is None:
        assert load_config(path).state_dir == str(tmp_path / state_dir)
        return
    (issue,) = issues_of(path)
    assert where(issue) == (2, 12, "state_dir")
    assert why.format(base=tmp_path) in issue.message, issue.message


def test_state_dir_etc_refused_by_validate(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("gateway_id: gw\nstate_dir: /etc\n" + ONE_DEVICE)
    out = validate(path)
    assert out.returncode == EX_CONFIG
    assert out.stderr.startswith("agent.yaml:2:12: state_dir: /etc is a system directory: ")


# ---------------------------------------------------------------------------------------
# files of a running agent


def test_files_of_a_running_agent_are_private(tmp_path: Path, broker: Mosquitto) -> None:
    """Started with umask 000, the agent still creates its state directory, buffer (with
    its WAL and shared-memory files), lock and seq reservation unreadable by others."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="v", address=0)])
    sim.start_thread()
    cfg = write_config(tmp_path / "agent.yaml", broker.port, one_point_device(sim.port))
    sub = Subscriber(broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    old = os.umask(0)
    try:
        agent.start()
    finally:
        os.umask(old)
    try:
        wait_until(lambda: len(sub.telemetry()) >= 3, 20, "3 readings")
        state = tmp_path / "state"
        names = ["buffer.db", "buffer.db-wal", "buffer.db-shm", "agent.lock", "seq.reserved"]
        modes = {n: stat.S_IMODE((state / n).stat().st_mode) for n in names}
        modes["state/"] = stat.S_IMODE(state.stat().st_mode)
        assert {n: m & 0o007 for n, m in modes.items()} == dict.fromkeys(modes, 0), modes
        assert modes["agent.lock"] == modes["seq.reserved"] == 0o600, modes
        assert agent.stop() == 0, agent.log()
    finally:
        sub.close()
        sim.stop_thread()


@pytest.mark.parametrize("name", ["agent.lock", "seq.reserved", "buffer.db"])
def test_a_planted_link_in_state_dir_is_not_followed(tmp_path: Path, name: str) -> None:
    """A symbolic link in place of a state file: the agent refuses to start (exit code
    78) saying which link to remove, and the file it points to is left untouched."""
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    before = target.stat()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / name).symlink_to(target)
    cfg = write_config(tmp_path / "agent.yaml", 1, one_point_device(1))
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == EX_CONFIG, out.stderr
    assert f"{state / name} is a symbolic link: the agent does not follow links" in out.stderr
    assert target.read_text() == "precious\n"
    after = target.stat()
    assert (after.st_mtime_ns, after.st_mode, after.st_size) == (
        before.st_mtime_ns,
        before.st_mode,
        before.st_size,
    )


def test_replacing_a_file_never_writes_through_a_link(tmp_path: Path) -> None:
    """The temporary file of an atomic replace is created anew: a link planted in its
    place (a shared directory such as /tmp, where the in-memory seq mark may live) is
    removed, not followed; the result is private."""
    from agent.buffer import write_replace

    target = tmp_path / "seq-x.memory"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "seq-x.memory.tmp").symlink_to(victim)
    write_replace(target, b"42\n", sync=False)
    assert victim.read_text() == "precious\n"
    assert target.read_text() == "42\n" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not (tmp_path / "seq-x.memory.tmp").exists()


# ---------------------------------------------------------------------------------------
# values validate refuses before the agent would trip on them, secrets never shown

MQTT_HEAD = (
    "gateway_id: gw\nstate_dir: state\nmqtt:\n  tls: false\n  allow_plaintext_credentials: true\n"
)
SERIAL = (
    "  - {{id: s1, driver: serial_line, serial_port: /dev/ttyUSB0, encoding: {enc}, "
    "request: {req}, parser: {{kind: kv}}, points: [{{name: v}}]}}\n"
)


def _checked(tmp_path: Path, text: str) -> tuple[str, str]:
    """validate on ``text`` as agent.yaml, measured: (first line, all of stderr), after
    asserting exit code 78, a few seconds of CPU (CPU_BOUND_S) and 100 MB, and that the
    secret is not shown."""
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    code, err, _, cpu, rss = run_measured(path)
    assert code == EX_CONFIG, err
    assert cpu < CPU_BOUND_S and rss < 100_000_000, (cpu, rss)
    assert SECRET not in err and "Traceback" not in err, err
    return err.splitlines()[0], err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *(
            (
                MQTT_HEAD + "devices:\n" + SERIAL.format(enc=enc, req="'?'"),
                f"agent.yaml:7:72: devices[0].encoding: '{enc}' is a codec that does not turn "
                "bytes into text",
            )
            for enc in ("rot13", "hex", "base64", "zlib_codec", "uu")
        ),
        (
            MQTT_HEAD + "devices:\n" + SERIAL.format(enc="nosuch", req="'?'"),
            "agent.yaml:7:72: devices[0].encoding: no text encoding 'nosuch'",
        ),
        (
            MQTT_HEAD + "devices:\n" + SERIAL.format(enc="ascii", req="'Grüße?'"),
            "agent.yaml:7:5: devices[0]: request 'Grüße?': character 3 (U+00FC) cannot be "
            "written in ascii",
        ),
        *(
            (
                MQTT_HEAD + f"  host: {host}\n" + ONE_DEVICE,
                f"agent.yaml:6:9: mqtt.host: {shown}",
            )
            for host, shown in (
                (
                    '"broker\\0.example"',
                    "the host 'broker\\x00.example' holds the control character U+0000",
                ),
                ('"my broker"', "the host 'my broker' holds a space"),
                ('"a\\tb"', "the host 'a\\tb' holds the control character U+0009"),
                (
                    "a" * 64 + ".example",
                    "the host 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'… "
                    "(72 characters) has a label of 64 characters",
                ),
                (
                    ".".join(["a" * 60] * 5),
                    "the host 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'… "
                    "(304 characters) is 304 characters long",
                ),
                ("-broker", "'-broker' is not a host name"),
                ("256.1.1.1", "'256.1.1.1' is not an IPv4 address"),
            )
        ),
        (
            "gateway_id: gw\nstate_dir: state\n"
            "devices:\n  - {id: d1, host: 'plc 1', points: [{name: v, address: 0}]}\n",
            "agent.yaml:4:20: devices[0].host: the host 'plc 1' holds a space",
        ),
        (
            MQTT_HEAD + '  username: "op\\0"\n  password_file: pw\n' + ONE_DEVICE,
            "agent.yaml:6:13: mqtt.username: it holds the character U+0000 (NUL)",
        ),
        (
            MQTT_HEAD + '  username: "op\\uD800"\n  password_file: pw\n' + ONE_DEVICE,
            "agent.yaml:6:13: mqtt.username: it holds a lone surrogate (U+D800)",
        ),
        (
            MQTT_HEAD + f'  username: op\n  password: "{SECRET}\\0"\n' + ONE_DEVICE,
            "agent.yaml:7:13: mqtt.password: the password holds the character U+0000 (NUL)",
        ),
        (
            MQTT_HEAD + f'  username: op\n  password: "{SECRET}\\uDC00"\n' + ONE_DEVICE,
            "agent.yaml:7:13: mqtt.password: the password holds a lone surrogate (U+DC00)",
        ),
    ],
)
def test_values_the_agent_would_trip_on_are_refused_by_validate(
    tmp_path: Path, text: str, expected: str
) -> None:
    """A serial encoding that is no text codec, a request the encoding cannot write, a
    host that is neither an RFC 1123 name nor an IP address, MQTT strings holding U+0000
    or a surrogate (MQTT 3.1.1 section 1.5.3): config errors at their line, the password
    never shown."""
    (tmp_path / "pw").write_text("pw\n")
    first, _ = _checked(tmp_path, text)
    assert first.startswith(expected), first


@pytest.mark.parametrize(
    "value",
    [
        f'"{SECRET}',  # unterminated
        f'"{SECRET}\\q"',  # an unknown escape: its character is not shown either
        "2023-02-30",  # a date that does not exist
        f"!!int {SECRET}",
        f"!!float {SECRET}",
        f"!!timestamp {SECRET}",
        f"!!binary {SECRET}",
        f"{SECRET}: x",
        f"'{SECRET}\x01'",  # a raw control character
        "\n    2023-02-31",  # on the line below the key
        '"a\n    ' + SECRET + '\\q"',  # a quoted value over two lines
    ],
)
def test_a_problem_inside_a_password_never_shows_it(tmp_path: Path, value: str) -> None:
    """YAML syntax errors, impossible dates, refused characters and tags inside the value
    of password are said at the password key with the fix, never with the value, a
    character of it or where in it."""
    text = MQTT_HEAD + f"  username: op\n  password: {value}\n" + ONE_DEVICE
    first, err = _checked(tmp_path, text)
    if value.startswith(("!!int", "!!float")):  # where the tag failed is not known
        assert first.startswith("agent.yaml:1:1: a value cannot be made what its YAML tag says")
    else:
        assert first.startswith("agent.yaml:7:3: the value of password "), err
        assert "(not repeated here, nor where in it: it is a secret); write it in single" in first
    assert "2023-02-3" not in err and "'q'" not in err and "\\x01" not in err


def test_unreadable_and_odd_files_are_one_line_config_errors(tmp_path: Path) -> None:
    """A binary config, a directory, a FIFO, a loop of symbolic links: exit 78 with a line
    naming the file and the kind of problem, never a traceback and never a hang."""
    (tmp_path / "bin.yaml").write_bytes(b"gateway_id: gw\n\x89PNG\x00\xff")
    (tmp_path / "fifo.yaml").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "loop1.yaml").symlink_to("loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to("loop1.yaml")
    expected = {
        "bin.yaml": "bin.yaml:2:1: not UTF-8 text (a binary file?)",
        "fifo.yaml": f"fifo.yaml:1:1: cannot read: {tmp_path / 'fifo.yaml'} is not a regular file",
        "dir.yaml": f"dir.yaml:1:1: cannot read: {tmp_path / 'dir.yaml'} is a directory",
        "loop1.yaml": "loop1.yaml:1:1: cannot load the config: its path goes through a loop of "
        "symbolic links",
    }
    for name, start in expected.items():
        code, err, _, cpu, rss = run_measured(tmp_path / name)
        assert code == EX_CONFIG, err
        assert err.startswith(start), err
        assert "Traceback" not in err and cpu < CPU_BOUND_S and rss < 100_000_000


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "loop", "big"])
@pytest.mark.parametrize("key", ["password_file", "key_file", "ca_file"])
def test_secret_files_must_be_small_regular_files(tmp_path: Path, kind: str, key: str) -> None:
    """A password, key or CA file that is a FIFO (reading it would wait for ever), a
    directory, a device, a loop of symbolic links or too big: a config error at its key,
    in under 2 s, without reading it."""
    target = tmp_path / "secret"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "device":
        target.symlink_to("/dev/zero")
    elif kind == "loop":
        target.symlink_to("secret2")
        (tmp_path / "secret2").symlink_to("secret")
    else:
        target.write_bytes(b"x" * 1_100_000)
    tls = (
        "  tls: {ca_file: secret}\n"
        if key == "ca_file"
        else ("  tls: {cert_file: secret, key_file: secret}\n" if key == "key_file" else "")
    )
    text = (
        "gateway_id: gw\nstate_dir: state\nmqtt:\n  host: broker.example\n"
        + tls
        + ("  username: op\n  password_file: secret\n" if key == "password_file" else "")
        + ONE_DEVICE
    )
    why = {
        "fifo": "is a FIFO: ",
        "directory": "is a directory: ",
        "device": "is a device: ",
        "loop": "it is a loop of symbolic links",
        "big": "is larger than ",
    }[kind]
    _, err = _checked(tmp_path, text)
    line = 5 if key != "password_file" else 6
    said = [x for x in err.splitlines() if f".{key}: " in x]
    assert len(said) == 1 and said[0].startswith(f"agent.yaml:{line}:"), err
    assert why in said[0], err
