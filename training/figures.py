"""Pictures a person looks at in the MLflow UI instead of reading numbers.

Every function returns a matplotlib ``Figure`` built without pyplot, so no global figure
state is shared between threads (a study's trials) and nothing needs closing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from zoo.data import Split

MISCLASSIFIED_SHOWN = 24  # images in the grid: enough to see a pattern, small enough to read the labels


def confusion_figure(labels: np.ndarray, predicted: np.ndarray, class_names: list[str], title: str) -> Figure:
    """Counts of true class (rows) against predicted class (columns), with the class names.

    Drawn with one imshow and a text per cell: scikit-learn's ConfusionMatrixDisplay drew the
    same picture but its import alone cost seconds on every run.
    """
    n = len(class_names)
    counts = np.bincount(n * labels.astype(np.int64) + predicted.astype(np.int64), minlength=n * n).reshape(n, n)
    size = 3.0 + 0.45 * n
    figure = Figure(figsize=(size, size), layout="constrained")
    ax = figure.add_subplot()
    ax.imshow(counts, cmap="Blues", interpolation="nearest")
    dark = counts > (counts.max() + counts.min()) / 2  # white text on dark cells, as scikit-learn does
    for (row, column), count in np.ndenumerate(counts):
        ax.text(column, row, str(count), ha="center", va="center", color="white" if dark[row, column] else "black",
                fontsize=8 if n > 6 else 10)
    ax.set_xticks(range(n), class_names, rotation=45 if max(map(len, class_names)) > 2 else 0,
                  ha="right" if max(map(len, class_names)) > 2 else "center", rotation_mode="anchor")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="Predicted label", ylabel="True label")
    ax.set_title(title, fontsize=10, wrap=True)  # the figure is as narrow as 2 classes make it
    return figure


def _tile(images: np.ndarray, columns: int, pad: tuple[int, int]) -> np.ndarray:
    """[N, H, W(, C)] uint8 images laid out in rows of ``columns`` on white, each with ``pad`` (above, right)
    blank pixels: room for a label above every image."""
    count, height, width = images.shape[:3]
    rows = max(1, math.ceil(count / columns))
    cell_height, cell_width = height + pad[0], width + pad[1]
    sheet = np.full((rows * cell_height, columns * cell_width, *images.shape[3:]), 255, dtype=np.uint8)
    for slot, image in enumerate(images):
        top, left = (slot // columns) * cell_height + pad[0], (slot % columns) * cell_width
        sheet[top : top + height, left : left + width] = image
    return sheet


def misclassified_figure(split: Split, predicted: torch.Tensor, class_names: list[str], title: str,
                         limit: int = MISCLASSIFIED_SHOWN) -> Figure:
    """The first ``limit`` wrongly classified images, each labelled with its true and predicted class.

    The images are tiled into one array and drawn with one imshow: 24 subplots cost seconds.
    """
    labels = split.labels.cpu()
    wrong = (predicted != labels).nonzero().flatten()[:limit]
    columns = 8
    images = split.images[wrong.to(split.images.device)].cpu()  # [N, C, H, W] uint8
    images = images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1)  # grayscale as is, RGB as an image
    height, width = split.images.shape[-2:]
    pad = (round(0.6 * height), 2)  # two lines of 7-point text above each image
    sheet = _tile(images.numpy(), columns, pad)
    figure = Figure(figsize=(1.35 * columns, 1.35 * columns * sheet.shape[0] / sheet.shape[1] + 0.5), layout="constrained")
    figure.suptitle(f"{title}: {int((predicted != labels).sum())} of {len(labels)} test images misclassified"
                    if len(wrong) else f"{title}: no test image misclassified", fontsize=10)
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.imshow(sheet, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for slot, index in enumerate(wrong.tolist()):
        x = (slot % columns) * (width + pad[1]) + width / 2
        y = (slot // columns) * (height + pad[0]) + pad[0]
        ax.text(x, y - 0.5, f"true {class_names[labels[index]]}\npred {class_names[predicted[index]]}", fontsize=7,
                color="tab:red", ha="center", va="bottom")
    return figure


def accuracy_against_figure(values: dict[str, list[float]], accuracies: list[float], collapsed: list[bool],
                            threshold: float, title: str) -> Figure:
    """Accuracy against each searched value (one panel per parameter, e.g. mean and std), with the
    trials that collapsed to predicting one class in red below the collapse threshold."""
    figure = Figure(figsize=(5 * len(values), 4), layout="constrained")
    acc, down = np.asarray(accuracies), np.asarray(collapsed, dtype=bool)
    for i, (name, xs) in enumerate(values.items()):
        ax = figure.add_subplot(1, len(values), i + 1)
        x = np.asarray(xs)
        ax.scatter(x[~down], acc[~down], color="tab:blue", label="trained")
        ax.scatter(x[down], acc[down], color="tab:red", marker="x", label=f"collapsed ({down.sum()})")
        ax.axhline(threshold, color="tab:red", linestyle=":", linewidth=1, label="collapse threshold")
        if name.startswith("std"):
            ax.set_xscale("log")  # searched on a log scale
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set(xlabel=name, ylabel="validation accuracy", title=f"accuracy against {name}")
        ax.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure


def accuracy_figure(history: list, best_epoch: int, title: str) -> Figure:
    """Validation accuracy per epoch with the kept epoch marked (a matplotlib Figure, no pyplot state)."""
    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    ax.plot([r.epoch for r in history], [r.val_accuracy for r in history], marker="o", label="val_accuracy")
    ax.axvline(best_epoch, color="tab:red", linestyle="--", label=f"kept: epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.legend()
    return figure
