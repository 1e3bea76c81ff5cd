"""The machine a command runs on, as far as sizing its workers goes. Imports nothing but the standard library."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity where the platform has one (a container or
    `taskset` limits it), else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
