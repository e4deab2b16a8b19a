"""Supervision of the device tasks: one device's bug never stops the others.

A polling task (one per Modbus bus) or a reading task (one per serial or seismic sensor)
that raises something its own code did not expect is logged at CRITICAL and started
again after a pause that doubles from :data:`RESTART_MIN_S` up to :data:`RESTART_MAX_S`
(back to the least after :data:`HEALTHY_AFTER_S` of running without a failure). The
other tasks go on meanwhile. The log line names the exception's type and where it was
raised (file, line, function), never its text: an exception's message may quote config
values, secrets included.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

RESTART_MIN_S = 1.0
"""First pause before a failed task is started again, seconds."""
RESTART_MAX_S = 60.0
"""Longest pause between restarts of a task that keeps failing, seconds."""
HEALTHY_AFTER_S = 300.0
"""A task that ran this long before failing is restarted after the least pause."""


def where_raised(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``exc``'s traceback (the file
    by its name only), or ``unknown place`` without one; never the exception's text."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown place"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


async def supervised(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    restart_min: float = RESTART_MIN_S,
    restart_max: float = RESTART_MAX_S,
    healthy_after: float = HEALTHY_AFTER_S,
) -> None:
    """Await ``run()`` until it returns; when it raises an ``Exception``, log it (CRITICAL,
    ``task NAME failed``, the exception's type and :func:`where_raised`) and call
    ``run()`` again after a pause (seconds: ``restart_min`` doubling up to
    ``restart_max``; reset after ``healthy_after`` seconds without a failure).

    Cancellation (the agent stopping) is passed through at once, also during a pause;
    ``BaseException`` other than ``Exception`` (``KeyboardInterrupt``, ``SystemExit``)
    is not caught.
    """
    pause = restart_min
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if time.monotonic() - started >= healthy_after:
                pause = restart_min
            log.critical(
                "task %s failed: %s at %s; the other tasks go on, restarting it in %.3g s",
                name,
                type(exc).__name__,
                where_raised(exc),
                pause,
            )
            del exc  # its traceback holds the frames of the failed run
        await asyncio.sleep(pause)
        pause = min(pause * 2, restart_max)
