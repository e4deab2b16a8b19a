"""systemd's side of the notification protocol, for the tests: a datagram socket that the
agent finds in ``$NOTIFY_SOCKET`` and that records every message it sends."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import wait_until


@dataclass
class Notification:
    """One datagram: its ``KEY=VALUE`` lines, and when it arrived (monotonic and wall
    seconds)."""

    fields: dict[str, str]
    t: float
    wall: float
    raw: bytes
    seen: dict[str, object] = field(default_factory=dict)
    """What :attr:`NotifySocket.on_ready` returned when this was ``READY=1``."""


class NotifySocket:
    """A bound ``AF_UNIX`` datagram socket, abstract (``@name``: the address is NUL +
    name, unix(7)) or a socket file in ``directory``, read by a thread.

    Args:
        directory: where a path socket is made; None: an abstract one.
        on_ready: called on the receiving thread as ``READY=1`` arrives, before anything
            else is read (what the test checks at that instant); its result is kept.
    """

    def __init__(
        self,
        directory: Path | None = None,
        on_ready: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if directory is None:
            name = f"edge-notify-test-{os.getpid()}-{id(self)}"
            self.sock.bind(b"\0" + name.encode())
            self.env = f"@{name}"
        else:
            path = directory / "notify"
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.settimeout(0.1)
        self.on_ready = on_ready
        self._stop = threading.Event()
        self.messages: list[Notification] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            t, wall = time.monotonic(), time.time()
            lines = data.decode("utf-8", "replace").split("\n")
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            n = Notification(fields, t, wall, data)
            if "READY" in fields and self.on_ready is not None:
                n.seen = self.on_ready()
            with self._lock:
                self.messages.append(n)

    def all(self) -> list[Notification]:
        with self._lock:
            return list(self.messages)

    def having(self, key: str, value: str | None = None) -> list[Notification]:
        """The messages that assign ``key`` (``value``, when given)."""
        return [
            n for n in self.all() if key in n.fields and (value is None or n.fields[key] == value)
        ]

    def pings(self) -> list[Notification]:
        return self.having("WATCHDOG", "1")

    def wait_for(self, key: str, value: str | None = None, timeout: float = 15) -> Notification:
        found = wait_until(lambda: self.having(key, value), timeout, f"{key}={value or '*'}")
        return found[0]  # type: ignore[no-any-return]

    def statuses(self) -> list[str]:
        return [n.fields["STATUS"] for n in self.having("STATUS")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def gaps(times: list[float]) -> list[float]:
    """Seconds between consecutive times."""
    return [b - a for a, b in itertools.pairwise(times)]
