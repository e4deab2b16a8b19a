"""The C allocator's settings for a long-running agent on a small gateway.

glibc's malloc serves a request of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start)
with a mapping of its own, returned to the system when freed; but each time such a block
is freed, it raises the threshold to that block's size (the "dynamic mmap threshold",
mallopt(3), NOTES). The agent builds a few large buffers again and again (the state file
of every point each second, telemetry of devices with many points, the retained ``info``
message): once the threshold has risen, they come from the heap of the thread that makes
them and stay resident there. Fixing the threshold keeps them mapped and returned: at
10,000 points, peak RSS 46.4 → 44.5 MB (``bench/fleet.py``, 100 × 100), for a few
``mmap``/``munmap`` calls a second.
"""

from __future__ import annotations

import contextlib
import ctypes

M_MMAP_THRESHOLD = -3
"""mallopt(3) parameter number (glibc ``malloc.h``)."""
MMAP_THRESHOLD = 128 * 1024
"""Bytes: glibc's own initial threshold, kept for good."""


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` to ``threshold`` bytes, which also turns off its
    dynamic adjustment (mallopt(3)). Returns whether it was set: False where the C library
    has no ``mallopt`` (musl) or refuses the value; never raises."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
        return bool(mallopt(M_MMAP_THRESHOLD, threshold))
    return False
