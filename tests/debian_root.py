"""A throwaway Debian root for the install tests, made with ``debootstrap``.

The base root (Debian ``minbase`` plus python3, python3-venv, passwd and systemd, as on a
Raspberry Pi OS image: systemd installed but not running in a chroot) is built once and
cached outside the repository, under ``/var/cache/edge-agent-test/`` keyed by release,
architecture and package list, so later runs reuse it. Each test gets its own writable copy
as an overlay mount over the cached root, with /proc, /dev, the host's resolver and the
host's pip configuration (index URLs, find-links, constraints, CA file) made visible inside,
so that pip in the chroot installs from the same package index as the host.

``python -m tests.debian_root`` builds (or finds) the cached root and prints its path and
the time taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RELEASE = "bookworm"
PACKAGES = ("python3", "python3-venv", "passwd", "systemd")
CACHE = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/cache/edge-agent-test"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def debian_arch() -> str:
    """The host's Debian architecture name (``dpkg --print-architecture``)."""
    out = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or {"x86_64": "amd64", "aarch64": "arm64"}.get(
        platform.machine(), platform.machine()
    )


def apt_mirror() -> str:
    """The Debian mirror apt uses on this host (deb822 ``URIs:`` or a one-line ``deb`` entry
    for the main archive, not the security one); deb.debian.org when none is found."""
    found: list[str] = []
    files = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    if sources_d.is_dir():
        files += sorted(sources_d.glob("*.sources")) + sorted(sources_d.glob("*.list"))
    for f in files:
        with contextlib.suppress(OSError):
            text = f.read_text()
            found += re.findall(r"^URIs:\s*(\S+)", text, re.M)
            found += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M)
    for uri in found:
        if re.search(r"/debian/?$", uri):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def cached_root(release: str = RELEASE) -> tuple[Path, float]:
    """The cached base root for ``release``, built with debootstrap when missing.

    Returns the root's path and the seconds spent building it (0.0 when it was cached).
    Raises ``subprocess.CalledProcessError`` when debootstrap fails (its output is shown).
    """
    arch = debian_arch()
    key = hashlib.sha256(" ".join(PACKAGES).encode()).hexdigest()[:8]
    base = CACHE / f"debian-{release}-{arch}-{key}"
    root = base / "root"
    if (base / "ready").exists():
        return root, 0.0
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run waits for the same build
        if (base / "ready").exists():
            return root, 0.0
        if shutil.which("debootstrap") is None:
            subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], check=True)
        building = base / "building"
        if building.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(building)], check=True)
        started = time.monotonic()
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                f"--arch={arch}",
                release,
                str(building),
                apt_mirror(),
            ],
            check=True,
        )
        # what apt downloaded is not part of the root
        for deb in (building / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        building.rename(root)
        (base / "ready").write_text(f"{time.monotonic() - started:.1f}\n")
        return root, time.monotonic() - started


def host_pip_env() -> dict[str, str]:
    """The host's pip settings (environment and config files) as ``PIP_*`` variables.

    Read with ``pip config list``, the configuration pip itself resolves; a later scope
    (environment) wins over an earlier one (files)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    )
    env: dict[str, str] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^[^.]*\.([a-z0-9-]+)='(.*)'$", line)
        if m:
            env["PIP_" + m.group(1).upper().replace("-", "_")] = m.group(2)
    for name, value in os.environ.items():
        if name.startswith("PIP_"):
            env[name] = value
    return env


def host_paths(pip_env: dict[str, str]) -> list[Path]:
    """The host files and directories ``pip_env`` names (file:// indexes, find-links,
    constraint and CA files), which the chroot needs at the same paths."""
    paths: list[Path] = []
    for value in pip_env.values():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.name == "simple":  # a PEP 503 index: its pages link to files beside it
                path = path.parent
            if path.is_absolute() and path.exists() and path not in paths:
                paths.append(path)
    return paths


@dataclass
class Chroot:
    """A writable Debian root: ``path`` on the host; :meth:`run` runs bash inside it."""

    path: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, script: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with bash as root inside the chroot; stdout and stderr captured."""
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            **self.env,
        }
        proc = subprocess.run(
            ["chroot", str(self.path), "/bin/bash", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in the chroot: {script!r} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def file(self, inside: str) -> Path:
        """The host path of ``inside`` (an absolute path in the chroot)."""
        return self.path / inside.lstrip("/")


@contextlib.contextmanager
def throwaway_root(work: Path, release: str = RELEASE) -> Iterator[Chroot]:
    """A writable overlay over the cached root of ``release``, in ``work`` (on the host),
    with /proc, /dev and the host's pip configuration; everything is unmounted after."""
    base, _ = cached_root(release)
    upper, workdir, merged = work / "upper", work / "work", work / "root"
    for d in (upper, workdir, merged):
        d.mkdir(parents=True)
    mounts: list[Path] = []

    def mount(*args: str, target: Path) -> None:
        subprocess.run(["mount", *args, str(target)], check=True)
        mounts.append(target)

    try:
        mount(
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={base},upperdir={upper},workdir={workdir}",
            target=merged,
        )
        mount("-t", "proc", "proc", target=merged / "proc")
        mount("--rbind", "/dev", target=merged / "dev")
        subprocess.run(["mount", "--make-rslave", str(merged / "dev")], check=True)
        shutil.copyfile("/etc/resolv.conf", merged / "etc/resolv.conf")
        # packages installed in the chroot are not started (as in any chroot: the
        # invoke-rc.d policy, /usr/share/doc/init-system-helpers/README.policy-rc.d)
        policy = merged / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        pip_env = host_pip_env()
        for path in host_paths(pip_env):
            inside = merged / str(path).lstrip("/")
            if path.is_dir():
                inside.mkdir(parents=True, exist_ok=True)
                mount("--bind", "-o", "ro", str(path), target=inside)
            else:
                inside.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, inside)
        yield Chroot(merged, pip_env)
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", "-l", str(target)], check=False)


if __name__ == "__main__":
    path, took = cached_root(sys.argv[1] if len(sys.argv) > 1 else RELEASE)
    print(f"{path} (built in {took:.0f} s)" if took else f"{path} (cached)")
