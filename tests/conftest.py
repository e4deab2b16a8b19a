from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import IN_PROCESS, RUNNING, SUBSCRIBERS, Mosquitto, start_line


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, stopped at the end of the test."""
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def _own_runtime_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's agents note in-memory seqs in a directory of their own (as systemd's
    RuntimeDirectory= gives each service), never in the machine's /run."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))


@pytest.fixture(autouse=True)
def _no_agent_left_behind() -> Iterator[None]:
    """A failing test must not leave its agent process running."""
    yield
    while RUNNING:
        RUNNING.pop().kill()
    while IN_PROCESS:
        IN_PROCESS.pop().stop()


@pytest.fixture(autouse=True)
def _every_message_follows_the_contract() -> Iterator[None]:
    """Every message a test's platform subscriber received validates against its JSON
    Schema in docs/schemas (tests/contract_check.py)."""
    yield
    invalid = [msg for sub in SUBSCRIBERS for msg in sub.check()]
    SUBSCRIBERS.clear()
    assert not invalid, f"{len(invalid)} message(s) break the contract:\n" + "\n".join(invalid[:10])


@pytest.fixture
def line(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A serial line: two linked pseudo-terminals made by socat, (far end, agent end)."""
    a, b = str(tmp_path / "ttyA"), str(tmp_path / "ttyB")
    proc = start_line(a, b)
    yield a, b
    proc.terminate()
    proc.wait(5)
