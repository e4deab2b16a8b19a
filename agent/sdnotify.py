"""The systemd notification protocol: readiness, status, reload, stop and watchdog pings.

A service of ``Type=notify`` tells systemd its state by sending datagrams of
newline-separated ``KEY=VALUE`` assignments to the ``AF_UNIX`` socket named in
``$NOTIFY_SOCKET`` (sd_notify(3), "Description" and "Notes"; the protocol is declared
stable there). A name starting with ``/`` is a socket file; one starting with ``@`` is
in Linux's abstract namespace: the address is a NUL byte followed by the rest of the
name, with no trailing NUL (unix(7), "Abstract sockets"; case 045). Without the
variable, every call is a silent no-op: the agent runs the same outside systemd.

Written here rather than taken from a library, because none that installs on every
gateway fits: ``systemd-python`` and ``cysystemd`` wrap libsystemd and need its headers
and a C compiler on an armhf Raspberry Pi (cysystemd ships no armhf wheel);
``sdnotify`` (last release 2017) swallows every error and knows no watchdog settings;
``systemd-watchdog`` sends ``WATCHDOG=1`` even when ``$WATCHDOG_PID`` names another
process, times its pings by the wall clock, and has no way to send ``RELOADING=1``,
``MONOTONIC_USEC`` or ``STOPPING=1``. The protocol itself is a ``sendto`` of a short
datagram.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

STATUS_MAX = 512
"""Characters of a ``STATUS=`` text at most (systemctl status shows one line)."""


def watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """The watchdog interval systemd expects pings within, in microseconds, or None when
    the watchdog is off for process ``pid``.

    As sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is the interval (a positive decimal
    integer, from ``WatchdogSec=``); when ``$WATCHDOG_PID`` is set, the watchdog applies
    only to the process with that PID (a child that inherited the variables must not
    ping for its parent). Anything unparsable counts as off.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    wpid = environ.get("WATCHDOG_PID")
    if wpid is not None and (not wpid.isdigit() or int(wpid) != pid):
        return None
    return int(usec)


def socket_address(name: str) -> bytes | None:
    """The ``AF_UNIX`` address of ``$NOTIFY_SOCKET`` = ``name``: a path as it is, ``@x``
    as NUL + ``x`` (abstract namespace, unix(7)); None for anything else (sd_notify(3)
    also knows ``vsock:`` addresses, for virtual machines, which a gateway never is)."""
    if name.startswith("/"):
        return os.fsencode(name)
    if name.startswith("@") and len(name) > 1:
        return b"\0" + os.fsencode(name[1:])
    return None


class Notifier:
    """Sends notifications to systemd; each method is a no-op outside ``Type=notify``.

    Never raises and never blocks: the socket is non-blocking, and a datagram that cannot
    be sent (no one listening, a full queue) is dropped, with one warning in the log for
    the first failure. Each call costs one ``sendto`` on the calling thread.

    Args:
        environ: where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
            (default: the process environment).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_name = env.get("NOTIFY_SOCKET", "")
        self.watchdog_usec = watchdog_usec(env, os.getpid())
        """The watchdog interval (µs) for this process, or None: no pings are expected."""
        self._address = socket_address(self.socket_name) if self.socket_name else None
        self._sock: socket.socket | None = None
        self._warned = False
        self._ready = False
        self._reloading = False
        self._status = ""
        if self.socket_name and self._address is None:
            log.warning(
                "NOTIFY_SOCKET=%r is neither a path nor an abstract socket (@name): systemd "
                "is not told the agent's state",
                self.socket_name[:100],
            )
        if self._address is not None:
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is known (the agent runs as ``Type=notify``)."""
        return self._sock is not None

    @property
    def is_ready(self) -> bool:
        """Whether ``READY=1`` was sent and no reload has begun since."""
        return self._ready and not self._reloading

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; return whether it went out.

        A failed send is logged once per process (WARNING) with its reason; later ones
        are silent, so that a missing listener does not fill the log with a line per
        watchdog ping.
        """
        if self._sock is None or self._address is None:
            return False
        data = ("\n".join(assignments) + "\n").encode("utf-8", "replace")
        try:
            self._sock.sendto(data, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot notify systemd at NOTIFY_SOCKET=%s: %s (%s); the agent goes on, "
                    "but systemd may consider it not started or hung",
                    self.socket_name[:100],
                    exc.strerror or type(exc).__name__,
                    ", ".join(a.split("=", 1)[0] for a in assignments),
                )
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """``READY=1``: start-up is finished (sd_notify(3), ``READY=1``), or a reload
        announced with :meth:`reloading` is finished. Sent once per start and once per
        reload: further calls while ready do nothing."""
        if self._ready and not self._reloading:
            if status is not None:
                self.status(status)
            return
        self._ready, self._reloading = True, False
        fields = ["READY=1"]
        if status is not None:
            self._status = _status_text(status)
            fields.append(f"STATUS={self._status}")
        self.send(*fields)

    def reloading(self, status: str = "reloading the configuration") -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC``: a reload has begun; call :meth:`ready`
        when it is over, whether it applied or was refused (sd_notify(3), ``RELOADING=1``;
        systemd 253 and later need ``MONOTONIC_USEC``, CLOCK_MONOTONIC in µs, to match
        the message to the reload it asked for with ``Type=notify-reload``)."""
        self._reloading = True
        self._status = _status_text(status)
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={self._status}")

    def stopping(self, status: str = "stopping: flushing the buffer and the uplink") -> None:
        """``STOPPING=1``: the agent has begun its clean stop (sd_notify(3))."""
        self._status = _status_text(status)
        self.send("STOPPING=1", f"STATUS={self._status}")

    def status(self, text: str) -> None:
        """``STATUS=text``, shown by ``systemctl status``; only sent when it changed."""
        text = _status_text(text)
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the agent is alive (sd_notify(3)); nothing when the watchdog is
        off for this process (:attr:`watchdog_usec` is None)."""
        if self.watchdog_usec is not None:
            self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket (idempotent); later calls are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_text(text: str) -> str:
    """One line of at most :data:`STATUS_MAX` characters (a newline would end the
    assignment and start another, sd_notify(3))."""
    one = " ".join(text.split())
    return one if len(one) <= STATUS_MAX else one[: STATUS_MAX - 1] + "…"
