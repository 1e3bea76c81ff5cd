"""Figures runs log, built without pyplot: no global state shared between threads, nothing to close."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from zoo.data import Split

MISCLASSIFIED_SHOWN = 24  # images in the grid: enough to see a pattern, small enough to read the labels


def confusion_figure(labels: np.ndarray, predicted: np.ndarray, class_names: list[str], title: str) -> Figure:
    """True class (rows) against predicted (columns), as scikit-learn's ConfusionMatrixDisplay draws it."""
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


def misclassified_figure(split: Split, predicted: torch.Tensor, class_names: list[str], title: str,
                         limit: int = MISCLASSIFIED_SHOWN) -> Figure:
    """The first ``limit`` misclassified images labelled true/predicted, tiled into one imshow."""
    from torchvision.utils import make_grid

    labels = split.labels.cpu()
    wrong = (predicted != labels).nonzero().flatten()[:limit]
    columns, (height, width) = 8, split.images.shape[-2:]
    pad = round(0.6 * height)  # room for two lines of 7-point text above each image
    blank = torch.full((max(columns - len(wrong), 0), *split.images.shape[1:]), 255, dtype=torch.uint8)  # a full row
    images = torch.cat([split.images[wrong.to(split.images.device)].cpu(), blank])  # [N, C, H, W] uint8
    sheet = make_grid(images, nrow=columns, padding=pad, pad_value=255).permute(1, 2, 0).numpy()
    figure = Figure(figsize=(1.35 * columns, 1.35 * columns * sheet.shape[0] / sheet.shape[1] + 0.5), layout="constrained")
    figure.suptitle(f"{title}: {int((predicted != labels).sum())} of {len(labels)} test images misclassified"
                    if len(wrong) else f"{title}: no test image misclassified", fontsize=10)
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.imshow(sheet, interpolation="nearest")
    for slot, index in enumerate(wrong.tolist()):
        x = pad + (slot % columns) * (width + pad) + width / 2
        y = pad + (slot // columns) * (height + pad)
        ax.text(x, y - 0.5, f"true {class_names[labels[index]]}\npred {class_names[predicted[index]]}", fontsize=7,
                color="tab:red", ha="center", va="bottom")
    return figure


def accuracy_against_figure(values: dict[str, list[float]], accuracies: list[float], collapsed: list[bool],
                            threshold: float, title: str) -> Figure:
    """Accuracy against each searched value (a panel per parameter), collapsed trials in red."""
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
    """Validation accuracy per epoch with the kept epoch marked."""
    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    ax.plot([r.epoch for r in history], [r.val_accuracy for r in history], marker="o", label="val_accuracy")
    ax.axvline(best_epoch, color="tab:red", linestyle="--", label=f"kept: epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.legend()
    return figure
