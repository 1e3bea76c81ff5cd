"""The machine a command runs on: its cache folder and how to size its workers. Imports nothing but the standard library."""

import os
import sys
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Where zoo keeps what it can make again or send later: ``$ZOO_CACHE_DIR``, else ``~/.cache/zoo``."""
    return Path(os.environ.get("ZOO_CACHE_DIR", Path.home() / ".cache" / "zoo"), *parts)


def offline() -> bool:
    """``ZOO_OFFLINE`` set (and not 0): nothing is downloaded."""
    return os.environ.get("ZOO_OFFLINE", "") not in ("", "0")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container or `taskset` limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fork_is_safe() -> bool:
    """Linux, and neither onnxruntime nor torch loaded (a forked child would inherit half their thread pools)."""
    return sys.platform == "linux" and not {"onnxruntime", "torch"} & sys.modules.keys()


def worker_start_method() -> str:
    """``fork`` when :func:`fork_is_safe` (no import in the workers), else ``spawn``."""
    return "fork" if fork_is_safe() else "spawn"
