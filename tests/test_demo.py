"""The README's first command runs the demo; this runs the same demo for a few seconds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def test_demo_shows_what_the_platform_receives(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--duration", "4", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any("lifeline/demo-gw-01/status  online" in line for line in lines)
    assert any("lifeline/demo-gw-01/status  offline" in line for line in lines)
    for device in ("underpass-radar", "culvert-level", "gas-main-p1"):
        assert any(device in line and "seq" in line for line in lines), device
    level = [float(m.group(1)) for m in re.finditer(r"water_level=([\d.]+) m", out.stdout)]
    assert len(level) >= 3 and level[-1] > level[0], "the flood level rises"
    assert re.search(
        r"platform received \d+ telemetry messages, seq 1\.\.\d+, gaps: none", out.stdout
    )
