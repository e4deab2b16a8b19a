"""The shipped systemd unit, checked by systemd's own tools: ``systemd-analyze verify``
(syntax, known settings, executables) and ``systemd-analyze security --offline=yes``
(the exposure score), plus the start semantics a bad config relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

UNIT = REPO / "systemd" / "edge-agent.service"
SCORE_MAX = 3.0


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        raise RuntimeError("these tests need systemd-analyze: apt-get install -y systemd")
    return found


def settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` → every value it is given, in order (systemd.syntax(7))."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def make_root(tmp_path: Path, unit_text: str) -> Path:
    """A file-system root holding the unit, stand-ins for the agent's executable and for
    /bin/kill (ExecReload=; every Debian has it), and this machine's system units (the
    targets the unit orders itself after)."""
    root = tmp_path / "root"
    for exe in (root / "opt" / "edge-agent" / "venv" / "bin" / "edge-agent", root / "bin" / "kill"):
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / "edge-agent.service").write_text(unit_text)
    system = next(
        p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()
    )
    shutil.copytree(system, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    return root


def verify(tmp_path: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    root = make_root(tmp_path, unit_text)
    return subprocess.run(
        [analyze(), "verify", f"--root={root}", "/etc/systemd/system/edge-agent.service"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_systemd_analyze_verify_passes_without_a_warning(tmp_path: Path) -> None:
    done = verify(tmp_path, UNIT.read_text())
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == "", done.stdout + done.stderr


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("WatchdogSec=20s", "WatchdogSec=twenty"), "Failed to parse sec value"),
        (("UMask=0027", "UMask=0027\nProtectSystm=strict"), "Unknown key"),
        (("RestartPreventExitStatus=78", "RestartPreventExitStatus=EX_CONFIGURE"), "EX_CONFIGURE"),
    ],
)
def test_verify_notices_a_broken_unit(
    tmp_path: Path, change: tuple[str, str], complaint: str
) -> None:
    """The check above can fail: systemd-analyze says what is wrong with a changed unit."""
    text = UNIT.read_text()
    assert change[0] in text
    done = verify(tmp_path, text.replace(change[0], change[1]))
    assert complaint in done.stderr, done.stderr


def exposure() -> float:
    done = subprocess.run(
        [analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d)", done.stdout)
    assert m, done.stdout + done.stderr
    return float(m.group(1))


def test_exposure_score_is_ok_and_the_docs_say_it() -> None:
    score = exposure()
    assert score <= SCORE_MAX, f"systemd-analyze security rates the unit {score}"
    doc = (REPO / "docs" / "systemd.md").read_text()
    assert f"**{score:.1f} OK**" in doc, f"docs/systemd.md should state the score {score:.1f}"
    assert f"rates it {score:.1f} OK" in UNIT.read_text()


def test_a_bad_config_ends_the_unit_instead_of_restarting_it() -> None:
    """systemd.service(5): ``RestartPreventExitStatus=`` applies to the main process, and
    a failing ``ExecStartPre=`` is restarted like any failure. So the config is checked by
    the main process itself (exit 78, EX_CONFIG, before READY=1: test_systemd.py case
    052 F), and no ``ExecStartPre=`` may exit non-zero."""
    s = settings(UNIT)
    assert "Service.ExecStartPre" not in s
    assert s["Service.Type"] == ["notify"] and s["Service.NotifyAccess"] == ["main"]
    assert s["Service.Restart"] == ["on-failure"]
    assert "78" in " ".join(s["Service.RestartPreventExitStatus"]).split()
    assert s["Service.WatchdogSec"] == ["20s"]
    assert any("--config" in v for v in s["Service.ExecStart"])


def test_hardening_settings_the_issue_asks_for() -> None:
    s = settings(UNIT)
    for key, value in {
        "User": "edge-agent",
        "StateDirectory": "edge-agent",
        "ConfigurationDirectory": "edge-agent",
        "RuntimeDirectory": "edge-agent",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
    }.items():
        assert s.get(f"Service.{key}") == [value], key
    assert "@system-service" in s["Service.SystemCallFilter"]
    assert s["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    allowed = " ".join(s["Service.DeviceAllow"])
    for dev in ("char-ttyUSB", "char-ttyACM", "char-ttyAMA", "char-gpiochip"):
        assert dev in allowed
    creds = [v.split(":")[0] for v in s["Service.LoadCredential"]]
    assert creds == ["mqtt-password", "mqtt-key"]
