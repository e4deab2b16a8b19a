"""Project structure rules that keep the tree honest."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_drivers_never_import_agent() -> None:
    offenders = []
    for path in (REPO / "drivers").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n == "agent" or n.startswith("agent.")]
    assert not offenders


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "```sh\nscripts/test\n```" in readme
    assert "\nscripts/test\n" in ci


def test_python_m_agent_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "edge-agent" in out.stdout


def test_ruff_and_mypy_strict_are_clean() -> None:
    ruff = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert ruff.returncode == 0, ruff.stdout
    mypy = subprocess.run(
        [sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert mypy.returncode == 0, mypy.stdout


def test_every_test_named_in_the_reliability_guarantees_exists() -> None:
    """docs/reliability.md backs each claim with a test name: each must be a real test."""
    import re

    doc = (REPO / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", doc))
    defined = {
        m
        for f in (REPO / "tests").glob("test_*.py")
        for m in re.findall(r"^def (test_[a-z0-9_]+)\(", f.read_text(), re.MULTILINE)
    }
    assert len(named) >= 20
    assert named <= defined, sorted(named - defined)
