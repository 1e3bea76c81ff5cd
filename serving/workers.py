"""Where `zoo classify`'s batches are decoded, and on onnxruntime also classified: worker processes or a thread.

serving/classify.py picks one of three for a run:

- **Classifying workers** (onnxruntime; by default for images of at most SMALL_INPUT values, from two
  batches on): processes that each decode a whole batch and run it through their own onnxruntime
  session on one thread, returning each row's top-k. A batch of 28x28 images is too little work to
  split across onnxruntime's threads, and in one process the decoding (Pillow holds the GIL for most
  of a small PNG) and the inference slowed each other down: on 2 cores, whole batches per process
  classified a folder of PNGs faster than the plain PIL + onnxruntime loop, and this process with a
  decoding thread did not (benchmarks/RESULTS.md, "Speed against the floor of each job").
- **Decoding workers** (the torch runtime, and large images on more than 2 cores): processes that
  only decode; this process classifies.
- **A thread** of this process decodes the next batch while this one is classified.

Worker processes are forked while this process has loaded neither onnxruntime nor torch: a child
forked from a process whose onnxruntime or torch thread pools run can hang or crash (onnxruntime's
advice: create sessions after fork), so `zoo classify` starts them before it opens the model. A
process that has loaded either spawns its workers instead (slower to start: a fresh interpreter each).
"""

from __future__ import annotations

import signal
from collections import deque
from functools import partial
from itertools import chain
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from serving.scores import softmax, to_float, top_indices
from zoo.imaging import DecodeSpec, decode_batch
from zoo.machine import fork_is_safe, usable_cores, worker_start_method

if TYPE_CHECKING:
    from concurrent.futures import Executor  # concurrent.futures costs start-up; a single batch never needs it

Batch = list[tuple[str, "str | None"]]  # (path, why it is skipped)

# Images of at most this many values (128x128 grey, 73x73 RGB) are classified by worker processes by
# default: whole small batches per process beat threads inside onnxruntime. Larger ones stay in this
# process, where onnxruntime's threads share each image's work well and one copy of the model and
# its activations is held, not one per core (ResNet-18 at 224x224 holds a large batch of activations).
SMALL_INPUT = 16_384
MAX_CLASSIFYING_WORKERS = 8  # a model and a batch each; more cores than this are not measured

# Starting a spawned worker (an interpreter, numpy, Pillow) costs far more than decoding a small PNG:
# a spawned pool pays for itself only from a few thousand images on.
POOL_MIN_IMAGES = 4096


def default_workers() -> int:
    """Decoding workers: none on 2 cores or fewer, one per core but one beyond that.

    onnxruntime already runs a batch on every core and a 28x28 PNG decodes in a third of the
    time its inference takes, so on 2 cores decoding in this process was faster and cheaper than a
    pool (benchmarks/RESULTS.md, "`zoo classify`: bad input, bounded memory, start-up and throughput"). With more cores, workers decode beside inference
    (not measured here).
    """
    n = usable_cores()
    return 0 if n <= 2 else n - 1


def default_classifying_workers() -> int:
    """Classifying workers: one per core (at most MAX_CLASSIFYING_WORKERS), none on a single core."""
    n = usable_cores()
    return 0 if n < 2 else min(n, MAX_CLASSIFYING_WORKERS)


def start_pool(processes: int) -> Executor:
    """``processes`` workers, forked now when :func:`fork_is_safe` (a process pool forks at its first task,
    which would be too late), else spawned."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = worker_start_method()
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method), initializer=_start_worker)
    if method == "fork":
        pool.submit(int).result()
    return pool


def _start_worker() -> None:
    # Ctrl-C reaches the whole process group: the command stops sending batches, these finish theirs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- in a worker ---------------------------------------------------------------------------------

_sessions: dict[str, object] = {}  # one onnxruntime session per model file, per worker


def classify_batch(paths: list[str | None], model: str, spec: DecodeSpec, k: int
                   ) -> tuple[list[list[int]], list[list[float]], list[str | None]]:
    """Decode ``paths`` and classify the readable ones with the ONNX file ``model``: their top-k class
    indices and probabilities (in the order of the readable paths), and one error per path."""
    pixels, errors = decode_batch(paths, spec)
    good = [i for i, e in enumerate(errors) if e is None]
    if not good:
        return [], [], errors
    session = _sessions.get(model)
    if session is None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # the other cores run the other workers
        session = _sessions[model] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    scores = session.run(None, {session.get_inputs()[0].name: to_float(pixels if len(good) == len(paths) else pixels[good])})[0]
    order, probabilities = top_indices(softmax(scores), k)
    return order, probabilities, errors


# ---- in this process -----------------------------------------------------------------------------

def classified_batches(pool: Executor, processes: int, batches: Iterator[Batch], model: str, spec: DecodeSpec,
                       k: int) -> Iterator[tuple[Batch, list[list[int]], list[list[float]], list[str | None]]]:
    """Each batch with its readable rows' top-k (class indices, probabilities) and its errors, in order,
    classified by the ``processes`` workers of ``pool``, two batches in flight per worker."""
    job = partial(classify_batch, model=model, spec=spec, k=k)
    for batch, (order, probabilities, errors) in _in_order(pool, batches, job, depth=2 * processes):
        yield batch, order, probabilities, errors


def pool_for(batches: Iterator[Batch], processes: int, asked: bool) -> tuple[Iterator[Batch], Executor | None]:
    """The batches (those looked at put back) and a pool of ``processes`` workers when it pays: from two batches
    on when the workers were asked for or can be forked, else (spawned) from POOL_MIN_IMAGES images on."""
    ahead: list[Batch] = []  # paths only: cheap to look ahead
    forking = fork_is_safe()

    def pays() -> bool:
        return len(ahead) >= 2 and (asked or forking or sum(map(len, ahead)) >= POOL_MIN_IMAGES)

    while processes and not pays() and (batch := next(batches, None)):
        ahead.append(batch)
    return chain(ahead, batches), (start_pool(processes) if processes and pays() else None)


def decoded_batches(batches: Iterator[Batch], spec: DecodeSpec, workers: int | None = None
                    ) -> Iterator[tuple[Batch, np.ndarray, list[str | None]]]:
    """Each batch with its pixels and errors, in order, decoded a few batches ahead of the consumer by
    ``workers`` processes (never the whole list; see :func:`pool_for`), or here: with ``workers=0``, for a
    single batch, and by default (see default_workers) on 2 cores or fewer."""
    processes = default_workers() if workers is None else workers
    batches, pool = pool_for(batches, processes, asked=workers is not None)
    decode = partial(decode_batch, spec=spec)
    if pool:
        # Twice as many batches in flight as workers keeps each one busy.
        for batch, (pixels, errors) in _in_order(pool, batches, decode, depth=2 * processes):
            yield batch, pixels, errors
        return
    # Here, the next batch in a thread while the caller classifies this one: Pillow's decoders and
    # onnxruntime both release the GIL, so on two cores the one overlaps the other (a loop that decodes
    # then classifies leaves a core idle in each half).
    from concurrent.futures import ThreadPoolExecutor

    for batch, (pixels, errors) in _in_order(ThreadPoolExecutor(1, thread_name_prefix="zoo-decode"), batches,
                                             decode, depth=1):
        yield batch, pixels, errors


def _in_order(pool: Executor, batches: Iterator[Batch], job: Callable, depth: int) -> Iterator[tuple[Batch, tuple]]:
    """Each batch with ``job(its paths)`` run by ``pool``, in order, at most ``depth`` batches ahead of the
    consumer (memory stays bounded); the pool is shut down at the end, or as soon as the consumer stops."""
    from concurrent.futures import BrokenExecutor  # a process pool's BrokenProcessPool, without importing it

    pending: deque = deque()
    try:
        for batch in batches:
            pending.append((batch, pool.submit(job, _to_decode(batch))))
            if len(pending) > depth:
                batch, future = pending.popleft()
                yield batch, future.result()
        while pending:
            batch, future = pending.popleft()
            yield batch, future.result()
    except BrokenExecutor:
        raise WorkerDied() from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class WorkerDied(RuntimeError):
    complete_message = True  # zoo/cli/main.py: this line says all, no traceback hint

    def __init__(self) -> None:
        super().__init__("a worker process died (out of memory? killed?); the rows above were classified: "
                         "run again with fewer --workers, a smaller --batch-size, or --workers 0")


def _to_decode(batch: Batch) -> list[str | None]:
    return [path if error is None else None for path, error in batch]
