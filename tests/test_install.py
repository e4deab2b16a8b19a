"""``scripts/install`` in a throwaway Debian 12 root made with debootstrap (tests/debian_root.py).

systemd is installed in the root but not running (a chroot), as on an image being prepared:
``systemctl enable`` makes its symlinks offline. pip in the root uses the host's package
index. These tests need root (chroot, mount), as in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.debian_root import Chroot, throwaway_root
from tests.helpers import REPO

INSTALL = "/root/edge-agent/scripts/install"
VENV_BIN = "/opt/edge-agent/venv/bin"
BOOT = "/boot/firmware/edge-agent"
WATCHED = "/opt/edge-agent /etc/edge-agent /var/lib/edge-agent /etc/systemd/system"
ACCOUNTS = "/etc/passwd /etc/group /etc/shadow /etc/gshadow"

BOOT_CONFIG = """\
version: 1
gateway_id: site-42-gw
state_dir: /var/lib/edge-agent
mqtt:
  host: 127.0.0.1
  username: site-42
  password_file: secrets/mqtt.password
devices:
  - id: tank-level
    host: 192.0.2.10
    unit_id: 1
    profile: submersible-water-level
    poll_interval: 5s
"""


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Chroot]:
    """A fresh Debian root with a copy of this repository in /root/edge-agent (what a
    technician copies to a gateway: no .git, no .venv) and a ``gpio`` group, as Raspberry
    Pi OS has."""
    assert os.geteuid() == 0, "the install tests need root (chroot and mount), as in CI"
    with throwaway_root(tmp_path / "debian") as chroot:
        target = chroot.file("/root/edge-agent")
        target.mkdir(parents=True)
        pack = subprocess.Popen(
            [
                "tar",
                "-C",
                str(REPO),
                "--exclude=.git",
                "--exclude=.venv",
                "--exclude=__pycache__",
                "--exclude=*_cache",
                "--exclude=*.egg-info",
                "-cf",
                "-",
                ".",
            ],
            stdout=subprocess.PIPE,
        )
        subprocess.run(["tar", "-C", str(target), "-xf", "-"], stdin=pack.stdout, check=True)
        assert pack.wait() == 0
        chroot.run("groupadd --system gpio")
        yield chroot


def manifest(root: Chroot) -> str:
    """Every installed path's type, owner, mode, size, times and content hash, and the
    account files: equal before and after a run means the run changed nothing."""
    return root.run(
        f"find {WATCHED} -printf '%p %y %u:%g %m %s %T@ %C@ %l\\n' | sort; "
        f"find {WATCHED} -type f -print0 | sort -z | xargs -0 sha256sum; "
        f"sha256sum {ACCOUNTS}"
    ).stdout


def stat(root: Chroot, path: str) -> str:
    """``owner:group mode`` of ``path`` in the root."""
    return root.run(f"stat -c '%U:%G %a' {path}").stdout.strip()


def test_install_sets_up_a_gateway_and_a_second_run_changes_nothing(root: Chroot) -> None:
    first = root.run(INSTALL)
    assert "created user edge-agent" in first.stdout
    assert "no change" not in first.stdout

    # the user: a system account without a login, in dialout and gpio
    _, _, uid, gid, _, home, shell = root.run("getent passwd edge-agent").stdout.strip().split(":")
    assert int(uid) < 1000 and (home, shell) == ("/var/lib/edge-agent", "/usr/sbin/nologin")
    assert root.run("getent group edge-agent").stdout.split(":")[2] == gid
    assert set(root.run("id -nG edge-agent").stdout.split()) == {"edge-agent", "dialout", "gpio"}

    # directories and files: the config and secrets readable by root and the agent only
    assert stat(root, "/etc/edge-agent") == "root:edge-agent 750"
    for d in ("profiles", "devices", "secrets"):
        assert stat(root, f"/etc/edge-agent/{d}") == "root:edge-agent 750"
    assert stat(root, "/var/lib/edge-agent") == "edge-agent:edge-agent 750"
    assert stat(root, "/etc/edge-agent/agent.yaml") == "root:edge-agent 640"
    example = (REPO / "config/agent.example.yaml").read_text()
    assert root.file("/etc/edge-agent/agent.yaml").read_text() == example
    shipped = sorted(p.name for p in (REPO / "config/profiles").glob("*.yaml"))
    assert sorted(p.name for p in root.file("/etc/edge-agent/profiles").iterdir()) == shipped
    listing = root.run("find /etc/edge-agent -type f -printf '%u:%g %m %p\\n'").stdout
    assert listing.count("root:edge-agent 640 ") == len(listing.splitlines()) > len(shipped)
    assert root.run("find /etc/edge-agent -perm /o=rwx").stdout == ""

    # the unit files as shipped, enabled without a running systemd
    for unit in sorted((REPO / "systemd").glob("*.service")):
        installed = root.file(f"/etc/systemd/system/{unit.name}")
        assert installed.read_bytes() == unit.read_bytes()
        assert stat(root, installed.as_posix()[len(str(root.path)) :]) == "root:root 644"
        assert root.run(f"systemctl is-enabled {unit.name}").stdout.strip() == "enabled"
    wants = root.file("/etc/systemd/system/multi-user.target.wants/edge-agent.service")
    assert os.readlink(wants) == "/etc/systemd/system/edge-agent.service"

    # the venv runs, and the agent, as its own user, accepts the example config
    version = root.run(f"{VENV_BIN}/edge-agent --version").stdout
    assert version.startswith("edge-agent, version ")
    ok = root.run(
        f"runuser -u edge-agent -- {VENV_BIN}/edge-agent validate /etc/edge-agent/agent.yaml"
    )
    assert ok.returncode == 0

    before = manifest(root)
    second = root.run(INSTALL)
    assert second.stdout.strip().splitlines() == ["edge-agent install: no change"]
    assert manifest(root) == before


def test_uninstall_keeps_config_and_buffer_unless_purge(root: Chroot) -> None:
    root.run(INSTALL)
    uid = root.run("id -u edge-agent").stdout.strip()
    root.run("runuser -u edge-agent -- touch /var/lib/edge-agent/buffer.db")
    root.file("/etc/edge-agent/agent.yaml").write_text("# edited for this site\n")

    out = root.run(f"{INSTALL} --uninstall").stdout
    assert "kept /etc/edge-agent (config) and /var/lib/edge-agent (buffer)" in out
    for gone in (
        "/opt/edge-agent",
        "/etc/systemd/system/edge-agent.service",
        "/etc/systemd/system/edge-agent-boot-config.service",
        "/etc/systemd/system/multi-user.target.wants/edge-agent.service",
    ):
        assert not root.file(gone).exists() and not root.file(gone).is_symlink(), gone
    assert root.run("getent passwd edge-agent", check=False).returncode == 2
    assert root.run("getent group edge-agent", check=False).returncode == 2
    assert root.file("/var/lib/edge-agent/buffer.db").exists()
    assert root.file("/etc/edge-agent/agent.yaml").read_text() == "# edited for this site\n"

    # installed again: the same user id owns the kept buffer, the edited config stays
    root.run(INSTALL)
    assert root.run("id -u edge-agent").stdout.strip() == uid
    assert stat(root, "/var/lib/edge-agent/buffer.db").startswith("edge-agent:edge-agent ")
    assert root.file("/etc/edge-agent/agent.yaml").read_text() == "# edited for this site\n"

    root.run(f"{INSTALL} --uninstall --purge")
    for gone in ("/opt/edge-agent", "/etc/edge-agent", "/var/lib/edge-agent"):
        assert not root.file(gone).exists(), gone


def test_boot_partition_drop_in_is_validated_installed_and_removed(root: Chroot) -> None:
    root.run(INSTALL)
    example = root.file("/etc/edge-agent/agent.yaml").read_text()
    boot = root.file(BOOT)
    (boot / "secrets").mkdir(parents=True)

    # an invalid set: left on the boot partition, nothing installed, the error at its line
    (boot / "agent.yaml").write_text(BOOT_CONFIG.replace("    unit_id: 1\n", "   unit_id: 1\n"))
    (boot / "secrets/mqtt.password").write_text("s3cret\n")
    bad = root.run("/opt/edge-agent/install --take-boot-config", check=False)
    assert bad.returncode == 1
    assert f"{BOOT}/agent.yaml:11:" in bad.stderr
    assert "nothing was installed and they were left in place" in bad.stderr
    assert (boot / "agent.yaml").exists() and (boot / "secrets/mqtt.password").exists()
    assert root.file("/etc/edge-agent/agent.yaml").read_text() == example
    assert not root.file("/etc/edge-agent/secrets/mqtt.password").exists()

    # fixed: installed 0640 root:edge-agent, and gone from the boot partition
    (boot / "agent.yaml").write_text(BOOT_CONFIG)
    good = root.run("/opt/edge-agent/install --take-boot-config")
    assert "installed /etc/edge-agent/agent.yaml (0640 root:edge-agent)" in good.stdout
    assert root.file("/etc/edge-agent/agent.yaml").read_text() == BOOT_CONFIG
    assert root.file("/etc/edge-agent/secrets/mqtt.password").read_text() == "s3cret\n"
    assert stat(root, "/etc/edge-agent/agent.yaml") == "root:edge-agent 640"
    assert stat(root, "/etc/edge-agent/secrets/mqtt.password") == "root:edge-agent 640"
    assert list(boot.iterdir()) == []
    assert (
        root.run(
            f"runuser -u edge-agent -- {VENV_BIN}/edge-agent validate /etc/edge-agent/agent.yaml"
        ).returncode
        == 0
    )
    # nothing left to take: a boot with an empty directory changes nothing
    assert root.run("/opt/edge-agent/install --take-boot-config").stdout.strip() == (
        "edge-agent install: no change"
    )


def test_an_old_python_is_refused_with_what_to_do(root: Chroot) -> None:
    # Debian 11's python3 (3.9), as far as the installer asks it, ahead in PATH
    fake = root.file("/usr/local/bin/python3")
    fake.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.9 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    out = root.run(INSTALL, check=False)
    assert out.returncode == 1
    assert "needs Python 3.11 or newer; Debian GNU/Linux 12 (bookworm) has Python 3.9" in out.stderr
    assert "Raspberry Pi OS image" in out.stderr and "Nothing was changed." in out.stderr
    assert not root.file("/opt/edge-agent").exists()
    assert root.run("getent passwd edge-agent", check=False).returncode == 2


# ---------------------------------------------------------------------------------------
# first contact: scripts/demo and scripts/test on a fresh Debian


def test_demo_as_root_installs_mosquitto_and_says_each_step(root: Chroot) -> None:
    """The README's first command on a fresh Debian, as root: mosquitto comes from apt,
    the agent into .venv, and every step is announced before it runs."""
    assert root.run("command -v mosquitto", check=False).returncode == 1
    out = root.run("cd /root/edge-agent && scripts/demo --duration 4", timeout=300)
    steps = [line for line in out.stdout.splitlines() if line.startswith("[demo] ")]
    expected = [
        r"creating \.venv \(Python 3\.\d+\.\d+\)",
        r"installing mosquitto \(apt-get update, apt-get install\)",
        r"installed mosquitto",
        r"installing the agent and dependencies into \.venv \(pip; under a minute .*\)",
        r"installed into \.venv in \d+ s",
        r"starting the demo",
    ]
    assert len(steps) == len(expected), steps
    for step, pattern in zip(steps, expected, strict=True):
        assert re.fullmatch(r"\[demo\] " + pattern, step), (step, pattern)
    assert "broker: mosquitto on 127.0.0.1:" in out.stdout
    assert re.search(r"platform received \d+ telemetry messages", out.stdout)


def test_test_script_without_root_says_the_one_command(root: Chroot) -> None:
    """Neither root nor password-less sudo: nothing is installed, and the one command that
    installs what is missing is printed."""
    root.run(
        "useradd --create-home tech && cp -r /root/edge-agent /home/tech/ && "
        "chown -R tech: /home/tech/edge-agent"
    )
    out = root.run("cd /home/tech/edge-agent && runuser -u tech -- scripts/test -q", check=False)
    assert out.returncode == 1
    missing = " ".join(
        p
        for p in ("mosquitto", "openssl", "socat")
        if root.run(f"command -v {p}", check=False).returncode
    )
    assert "mosquitto" in missing and "socat" in missing
    assert out.stdout.splitlines() == [
        f"[test] needs {missing}; install with: sudo apt-get install -y {missing}"
    ]
    assert not root.file("/home/tech/edge-agent/.venv").exists()
