from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free loopback port, stopped at the end of the test."""
    b = Mosquitto(tmp_path / "broker")
    b.start()
    yield b
    b.stop()
