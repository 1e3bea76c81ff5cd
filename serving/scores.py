"""One batch's arithmetic: decoded pixels to the exported graph's input, its scores to the top-k classes.

Shared by this process and the worker processes that classify whole batches (serving/workers.py),
so a row is the same number wherever its batch ran. numpy only.
"""

from __future__ import annotations

import numpy as np


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1], the exported graph's input."""
    return pixels.astype(np.float32) / np.float32(255.0)


def softmax(scores: np.ndarray) -> np.ndarray:
    # Networks end in logits or log-probabilities: softmax gives probabilities for both.
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_indices(probabilities: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's ``k`` best classes and their probabilities, best first (ties: the lower index), as Python
    lists: read back in two calls, not one float() per label (a third of the time of building the rows)."""
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order.tolist(), np.take_along_axis(probabilities, order, axis=1).tolist()
