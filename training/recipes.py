"""Training recipes by name (``--recipe``): the settings a run takes for what it was not told. ``seed`` is the
seed protocols' training, unchanged; the others add augmentation and a schedule for users' own images
(docs/training.md says which is the default where, and why)."""

from __future__ import annotations

from typing import Any

from zoo.errors import UsageError

SEED = {"schedule": "step", "warmup_epochs": 0.0, "label_smoothing": 0.0, "ema": 0.0, "patience": 0, "crop_pad": 0,
        "scale": "", "hflip": 0.0, "aa": "none", "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "weight_decay": 0.0}
# Weight decay by optimizer: decoupled (AdamW) takes timm's 0.05; coupled L2 (SGD) torchvision's 1e-4; none for
# Adam and Adadelta, whose L2 term the adaptive scaling would distort.
LIGHT = {**SEED, "schedule": "cosine", "warmup_epochs": 1.0, "label_smoothing": 0.1, "crop_pad": 4, "hflip": 0.5,
         "weight_decay": {"adamw": 0.05, "sgd": 1e-4}, "keep_best": True}
RECIPES: dict[str, dict[str, Any]] = {
    "seed": SEED,
    "light": LIGHT,
    "strong": {**LIGHT, "aa": "trivialaugment", "reprob": 0.25, "mixup": 0.2, "cutmix": 1.0},
    "finetune": {**LIGHT, "lr": 1e-4},
}
SETTINGS = tuple(SEED)  # the TrainConfig fields every recipe sets


def recipe_settings(name: str, optimizer: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return {k: v.get(optimizer.lower(), 0.0) if isinstance(v, dict) else v for k, v in RECIPES[name].items()}
