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
    """Counts of true class (rows) against predicted class (columns), with the class names."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = 3.0 + 0.45 * len(class_names)
    figure = Figure(figsize=(size, size), layout="constrained")
    ax = figure.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        labels, predicted, labels=range(len(class_names)), display_labels=class_names, ax=ax, colorbar=False,
        xticks_rotation=45 if max(map(len, class_names)) > 2 else "horizontal", cmap="Blues",
    )
    ax.set_title(title, fontsize=10)
    return figure


def misclassified_figure(split: Split, predicted: torch.Tensor, class_names: list[str], title: str,
                         limit: int = MISCLASSIFIED_SHOWN) -> Figure:
    """The first ``limit`` wrongly classified images, each titled with its true and predicted label."""
    labels = split.labels.cpu()
    wrong = (predicted != labels).nonzero().flatten()[:limit]
    columns = 8
    rows = max(1, math.ceil(len(wrong) / columns))
    figure = Figure(figsize=(1.35 * columns, 1.55 * rows + 0.5), layout="constrained")
    figure.suptitle(f"{title}: {int((predicted != labels).sum())} of {len(labels)} test images misclassified"
                    if len(wrong) else f"{title}: no test image misclassified", fontsize=10)
    for slot, index in enumerate(wrong.tolist()):
        ax = figure.add_subplot(rows, columns, slot + 1)
        image = split.images[index].cpu()
        # [C, H, W] uint8: grayscale shown as is, RGB as an image
        ax.imshow(image[0] if image.shape[0] == 1 else image.permute(1, 2, 0), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {class_names[labels[index]]}\npred {class_names[predicted[index]]}", fontsize=7,
                     color="tab:red")
        ax.set_axis_off()
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
