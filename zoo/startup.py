"""A `zoo` command's start-up: the cyclic garbage collector held back while the libraries load.

Importing torch, torch._dynamo (torch.optim, torchvision and torch.export pull it in) and MLflow
creates about a million objects that live as long as the process. Under CPython's default
thresholds the collector walks them again and again while they are being created, and once more
at exit: on the 2-core development machine about 0.7 s of the 3.3 s those imports take, and 1 to
2 s after the command has finished (benchmarks/RESULTS.md, "`zoo train`'s fixed cost").

So :func:`begin` (the `zoo` entry point calls it first) raises the youngest generation's threshold
while the command starts: collections still happen, about a hundred times less often. When the
work begins (:func:`settled`: the first MLflow run starts, or `zoo classify` has loaded its model),
the objects loaded so far are frozen (``gc.freeze``: later collections skip them) and the default
thresholds come back for the rest of the command, however long a study runs. A short command that
starts no run (`zoo export`) keeps the raised threshold to its end. At exit everything left is
frozen, so CPython's last collections have little to walk. A program that imports the project's
modules without going through the `zoo` entry point keeps its own collector settings:
:func:`settled` does nothing there.
"""

from __future__ import annotations

import atexit
import gc

STARTUP_THRESHOLD = 100_000  # allocations between young collections while starting (CPython's default: 700)

_defaults: tuple[int, ...] | None = None  # the thresholds before begin(), kept while start-up lasts
_begun = False


def begin() -> None:
    """Hold the collector back until :func:`settled`; freeze what is left at exit. Once per process."""
    global _defaults, _begun
    if _begun:
        return
    _begun, _defaults = True, gc.get_threshold()
    gc.set_threshold(max(STARTUP_THRESHOLD, _defaults[0]), *_defaults[1:])
    atexit.register(gc.freeze)  # registered first, so it runs after every later exit handler


def settled() -> None:
    """Start-up is over: freeze the libraries' objects and put the default thresholds back (once)."""
    global _defaults
    if _defaults is None:
        return
    gc.freeze()
    gc.set_threshold(*_defaults)
    _defaults = None
