"""The one worker-pool mechanism (`zoo classify`, image folder decoding): processes started by zoo.machine's fork
policy, fed in order, a few items ahead. Standard library only: `zoo classify x.onnx` needs it without torch."""

from __future__ import annotations

import signal
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

from zoo.machine import worker_start_method

if TYPE_CHECKING:
    from concurrent.futures import Executor

T = TypeVar("T")


class WorkerDied(RuntimeError):
    complete_message = True  # zoo/cli/main.py: this line says all, no traceback hint


def start_pool(processes: int) -> Executor:
    """``processes`` workers: forked now when zoo.machine.fork_is_safe (a pool forks at its first task, maybe
    after torch or onnxruntime is loaded), else spawned (they import the caller's ``__main__``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = worker_start_method()
    # Ctrl-C reaches the whole process group: the caller stops sending work, the workers finish theirs.
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method), initializer=signal.signal,
                               initargs=(signal.SIGINT, signal.SIG_IGN))
    if method == "fork":
        pool.submit(int).result()
    return pool


def in_order(items: Iterable[T], job: Callable, pool: Executor | None = None, depth: int = 1) -> Iterator[tuple[T, object]]:
    """Each item with ``job(item)``, in order: run by ``pool`` at most ``depth`` items ahead of the consumer
    (memory stays bounded), or here without a pool. The pool is shut down at the end or when the consumer stops."""
    if pool is None:
        yield from ((item, job(item)) for item in items)
        return
    from concurrent.futures import BrokenExecutor  # a process pool's BrokenProcessPool, without importing it

    pending: deque = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(job, item)))
            if len(pending) > depth:
                item, future = pending.popleft()
                yield item, future.result()
        for item, future in pending:
            yield item, future.result()
    except BrokenExecutor:
        raise WorkerDied("a worker process died (out of memory? killed?); what is above is complete: run again with "
                         "fewer --workers, a smaller --batch-size, or --workers 0") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
