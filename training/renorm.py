"""Re-evaluate a trained network under other input normalizations, as is and adapted (docs/renorm.md): one parent
run (CSV table, top-1 heatmaps over the mean x std grid), one child run per (normalization, adaptation). Adaptations
retrain nothing: ``none``, ``bn-recalibrate`` (BatchNorm statistics re-estimated on separate calibration images),
``fold`` (the first convolution rewritten to compute the same under the new normalization, borders included)."""

from __future__ import annotations

import copy
import csv
import io
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import mlflow
import torch
from torch import nn
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from training import registration, tracking
from training.engine import evaluate_batches, resolve_device
from zoo.data import Split
from zoo.folder_dataset import warn_skipped
from zoo.image_folder import LabelledFiles, decode_crops, list_labelled_files
from zoo.normalization import Normalization, fold_normalization, parse_spec, recalibrate_batchnorm
from zoo.pretrained import Pretrained, load_pretrained
from zoo.errors import UsageError

ADAPTATIONS = ("none", "bn-recalibrate", "fold")
REGISTER_ADAPT_PREFERENCE = ("fold", "bn-recalibrate", "none")  # default --register-adapt: the first evaluated
# fold is exact up to float32 rounding, relative to the largest |reference logit|.
FOLD_TOLERANCE = 1e-4


@dataclass
class RenormConfig:
    data: str
    model: str = "resnet18"
    weights: str = "IMAGENET1K_V1"  # a torchvision weights name, or the path of a state dict
    norms: list[str] = field(default_factory=lambda: ["imagenet"])  # imagenet, identity or MEAN:STD
    grid_mean: tuple[float, float, int] | None = None  # (low, high, steps); steps 0: no grid
    grid_std: tuple[float, float, int] | None = None
    adaptations: list[str] = field(default_factory=lambda: ["none"])
    limit: int | None = None  # evaluation images, drawn at random (seeded) from the data
    calibration: int = 1024  # images for bn-recalibrate, split off the data unless calibration_data is given
    calibration_data: str | None = None
    source_norm: str | None = None  # what the weights were trained with; default: the weights' own
    resize: int | None = None  # default: the weights' preprocessing (256/224 for a state dict)
    crop: int | None = None
    batch_size: int = 128
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    memory_limit_gb: float = 4.0  # above this, crops go to a memmap in spill_dir
    spill_dir: str | None = None
    register: str | None = None
    alias: str | None = None
    register_norm: str | None = None  # default: the first --norm
    register_adapt: str | None = None  # default: fold, else bn-recalibrate, else none (the first evaluated)


@dataclass
class Candidate:
    label: str
    normalization: Normalization
    grid_cell: tuple[float, float] | None = None  # (mean, std) when it comes from the grid


@dataclass
class RenormResult:
    parent_run_id: str
    rows: list[dict]
    model_uri: str | None = None
    source: Normalization | None = None


def grid_axis(spec: tuple[float, float, int] | None, name: str) -> np.ndarray:
    if spec is None or int(spec[2]) == 0:
        return np.array([])
    low, high, steps = float(spec[0]), float(spec[1]), int(spec[2])
    if steps < 0 or low > high:
        raise UsageError(f"{name} takes LOW HIGH STEPS with LOW <= HIGH and STEPS >= 1 (0: no grid), got {spec}")
    if name == "--grid-std" and low <= 0:
        raise UsageError(f"--grid-std must stay positive (division by std), got LOW={low}")
    return np.linspace(low, high, steps)


def candidates(config: RenormConfig, channels: int) -> list[Candidate]:
    """The explicit normalizations, then the grid cells (mean-major)."""
    out = [Candidate(spec.strip() if ":" in spec else spec.strip().lower(), parse_spec(spec, channels)) for spec in config.norms]
    means, stds = grid_axis(config.grid_mean, "--grid-mean"), grid_axis(config.grid_std, "--grid-std")
    if (len(means) == 0) != (len(stds) == 0):
        raise UsageError("give both --grid-mean and --grid-std (LOW HIGH STEPS each), or neither")
    for m, s in itertools.product(means, stds):
        cell = (round(float(m), 6), round(float(s), 6))
        out.append(Candidate(f"grid {cell[0]:g}:{cell[1]:g}", Normalization.parse(cell[0], cell[1], channels), cell))
    if not out:
        raise UsageError("nothing to evaluate: give --norm and/or --grid-mean/--grid-std")
    return out


def check_config(config: RenormConfig, channels: int = 3) -> tuple[list[Candidate], Candidate | None, str | None]:
    """Every usage error before any decoding or run; returns the candidates and what to register."""
    bad = [a for a in config.adaptations if a not in ADAPTATIONS]
    if bad or not config.adaptations:
        raise UsageError(f"unknown adaptation {', '.join(bad) or '(none given)'}; valid: {', '.join(ADAPTATIONS)}")
    if config.limit is not None and config.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {config.limit}")
    if "bn-recalibrate" in config.adaptations and config.calibration < 2:
        raise UsageError(f"bn-recalibrate needs --calibration of at least 2 images, got {config.calibration}")
    registration.check_registry_names(config.register, config.alias)
    cands = candidates(config, channels)
    if not config.register:
        if config.alias or config.register_norm or config.register_adapt:
            raise UsageError("--alias, --register-norm and --register-adapt need --register NAME")
        return cands, None, None
    wanted = parse_spec(config.register_norm, channels) if config.register_norm else cands[0].normalization
    chosen = next((c for c in cands if c.normalization == wanted), None)
    if chosen is None:
        raise UsageError(f"--register-norm {config.register_norm} is not among the evaluated normalizations; add it with --norm")
    adapt = config.register_adapt or next(a for a in REGISTER_ADAPT_PREFERENCE if a in config.adaptations)
    if adapt not in config.adaptations:  # config.adaptations are known ones by now
        raise UsageError(f"--register-adapt {adapt} was not evaluated (evaluated: {', '.join(config.adaptations)}); "
                         f"valid: {', '.join(ADAPTATIONS)}, each evaluated only when given with --adapt")
    return cands, chosen, adapt


@dataclass
class Crops(Split):
    """uint8 [N, 3, crop, crop] crops (maybe memmap-backed) and their labels."""
    skipped: int = 0  # files that could not be decoded, left out


def split_files(config: RenormConfig, files: LabelledFiles, class_names: list[str]) -> tuple[LabelledFiles, LabelledFiles | None]:
    """(evaluation, calibration) files, never overlapping."""
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(files), generator=generator)
    calibration = None
    if "bn-recalibrate" in config.adaptations:
        if config.calibration_data:
            other, _ = list_labelled_files(config.calibration_data, class_names)
            calibration = other.take(torch.randperm(len(other), generator=generator)[: config.calibration])
        else:
            if len(files) <= config.calibration:
                raise UsageError(f"{files.root} has {len(files)} images, not enough for {config.calibration} calibration "
                                 "images plus evaluation images; lower --calibration or give --calibration-data")
            calibration, order = files.take(order[: config.calibration]), order[config.calibration :]
    evaluation = order[: config.limit] if config.limit else order
    return files.take(evaluation.sort().values), calibration


def decode(config: RenormConfig, files: LabelledFiles, resize: int, crop: int, desc: str) -> Crops:
    """The files' crops; unreadable files are left out, named in one warning and counted."""
    skipped: list[tuple[str, str]] = []
    images = decode_crops(files.files, resize=resize, crop=crop, workers=config.workers, desc=desc, skipped=skipped,
                          memory_limit_bytes=int(config.memory_limit_gb * (1 << 30)), spill_dir=config.spill_dir)
    labels = files.labels
    if skipped:
        warn_skipped(files.root, skipped, len(files))
        unreadable = {path for path, _ in skipped}
        labels = labels[torch.tensor([str(f) not in unreadable for f in files.files])]
    return Crops(images, labels, skipped=len(skipped))


def run_network(network: nn.Module, crops: Crops, normalization: Normalization, device: torch.device, batch_size: int,
                desc: str, on_logits) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy and predictions; ``on_logits(rows, CPU float logits)`` sees each batch."""
    network.eval()
    with tqdm(total=len(crops.labels), unit="img", desc=desc, leave=False) as bar:
        def seen(rows: slice, logits: torch.Tensor) -> None:
            on_logits(rows, logits.float().cpu())
            bar.update(len(logits))

        _, top1, predicted = evaluate_batches(lambda x: network(normalization.apply(x)), crops, batch_size, device=device, on_logits=seen)
    return top1.item(), predicted


def score(network: nn.Module, crops: Crops, normalization: Normalization, reference: torch.Tensor,
          device: torch.device, batch_size: int, desc: str) -> dict[str, float]:
    """top1/top5 accuracy, agreement with the reference's top-1 class, largest logit difference from it."""
    k, seen = min(5, reference.shape[1]), {"top5": 0, "max_diff": 0.0}

    def compare(rows: slice, logits: torch.Tensor) -> None:
        seen["top5"] += int((logits.topk(k, dim=1).indices == crops.labels[rows, None]).any(dim=1).sum())
        seen["max_diff"] = max(seen["max_diff"], float((logits - reference[rows]).abs().max()))

    top1, predicted = run_network(network, crops, normalization, device, batch_size, desc, compare)
    n = max(len(crops.labels), 1)
    return {"top1": top1, "top5": seen["top5"] / n, "agreement": int((predicted == reference.argmax(dim=1)).sum()) / n,
            "max_abs_logit_diff": seen["max_diff"]}


def adapt(base: nn.Module, adaptation: str, source: Normalization, target: Normalization,
          calibration: Crops | None, device: torch.device, batch_size: int) -> nn.Module:
    """``base`` itself for ``none``, else an adapted copy."""
    if adaptation == "none":
        return base
    network = copy.deepcopy(base)
    if adaptation == "fold":
        return fold_normalization(network, source, target)
    images = calibration.images
    recalibrate_batchnorm(network, (target.apply(images[i : i + batch_size].to(device))
                                    for i in range(0, len(images), batch_size)))
    return network.eval()


@dataclass
class Prepared:
    """What the evaluations share."""
    config: RenormConfig
    pretrained: Pretrained
    class_names: list[str]
    class_mapping: str
    data_root: str
    evaluation: Crops
    calibration: Crops | None
    crop: int
    resize: int
    device: torch.device
    source: Normalization  # what the weights were trained with


def prepare(config: RenormConfig) -> Prepared:
    """Load the weights, map the class folders, split off calibration images, decode everything once."""
    pretrained = load_pretrained(config.model, config.weights)
    if config.source_norm:
        pretrained.normalization = parse_spec(config.source_norm, 3)
    resize, crop = config.resize or pretrained.resize, config.crop or pretrained.crop
    if resize < crop:
        raise UsageError(f"--resize ({resize}) must be at least --crop ({crop})")
    files, class_names = list_labelled_files(config.data, pretrained.class_names)
    if len(class_names) != pretrained.num_classes:
        raise UsageError(f"the weights have {pretrained.num_classes} classes but {config.data} names {len(class_names)} "
                         "(a state dict without class names takes them from the sorted folder names)")
    device = resolve_device(config.device)
    eval_files, calib_files = split_files(config, files, class_names)
    pretrained.network.to(device).eval()
    return Prepared(config, pretrained, class_names, files.class_mapping, str(files.root.resolve()),
                    evaluation=decode(config, eval_files, resize, crop, "decoding evaluation images"),
                    calibration=decode(config, calib_files, resize, crop, "decoding calibration images") if calib_files else None,
                    crop=crop, resize=resize, device=device, source=pretrained.normalization)


def parent_params(job: Prepared) -> dict[str, object]:
    config, source = job.config, job.source.as_params()
    return {
        "model": config.model, "weights": job.pretrained.weights, "data": job.data_root,
        "class_mapping": job.class_mapping, "eval_images": len(job.evaluation.labels),
        "calibration_images": len(job.calibration.labels) if job.calibration else 0,
        "calibration_data": config.calibration_data or ("split off --data" if job.calibration else None),
        "source_mean": source["mean"], "source_std": source["std"], "resize": job.resize, "crop": job.crop,
        "adaptations": ",".join(config.adaptations), "norms": " ".join(config.norms),
        "grid_mean": _fmt_grid(config.grid_mean), "grid_std": _fmt_grid(config.grid_std),
        "seed": config.seed, "batch_size": config.batch_size,
        "skipped_files": job.evaluation.skipped + (job.calibration.skipped if job.calibration else 0),
    }


def evaluate_pair(job: Prepared, cand: Candidate, adaptation: str, reference: torch.Tensor, register: bool) -> dict:
    """One child run of the active parent: adapt, score, log, and log/register the model if asked."""
    config, base = job.config, job.pretrained.network
    network = adapt(base, adaptation, job.source, cand.normalization, job.calibration, job.device, config.batch_size)
    parent_id = tracking.mlflow.active_run().info.run_id
    tags = {tracking.KIND_TAG: "renorm-eval", "zoo.model": config.model, "zoo.weights": job.pretrained.weights,
            "zoo.normalization": cand.label, "zoo.adaptation": adaptation}
    with tracking.start_run(parent_run_id=parent_id, run_name=f"{adaptation} {cand.label}", tags=tags) as child:
        tracking.log_params({"model": config.model, "weights": job.pretrained.weights, **cand.normalization.as_params(),
                             "normalization": cand.label, "adaptation": adaptation, "grid": cand.grid_cell is not None,
                             "eval_images": len(job.evaluation.labels)})
        metrics = score(network, job.evaluation, cand.normalization, reference, job.device, config.batch_size, adaptation)
        mlflow.log_metrics(metrics)
        if adaptation == "fold":
            warn_if_fold_inexact(metrics, reference, f"{config.model} under {cand.label}")
        mlflow.set_tag(tracking.NOTE_TAG, describe_evaluation(job, cand, adaptation, metrics))
        model_uri = None
        if register:
            model_uri = tracking.log_model(
                copy.deepcopy(network), model_name=config.model, normalization=cand.normalization,
                input_shape=(3, job.crop, job.crop), resize=job.resize, class_names=job.class_names,
                registered_name=config.register, sample_images=job.evaluation.images[:2], alias=config.alias,
                weights=job.pretrained.weights, adaptation=adaptation, source_normalization=job.source.to_dict(),
                eval_data=Path(job.data_root).name,  # the registry's `dataset` tag; the weights get their own
                top1=metrics["top1"])
    grid_mean, grid_std = cand.grid_cell or (None, None)
    return {"normalization": cand.label, **cand.normalization.as_params(), "adaptation": adaptation,
            "grid_mean": grid_mean, "grid_std": grid_std, **metrics, "run_id": child.info.run_id, "model_uri": model_uri}


def warn_if_fold_inexact(metrics: dict[str, float], reference: torch.Tensor, what: str) -> None:
    """fold must reproduce the reference; if not, the first Conv2d is probably not the first layer."""
    limit = FOLD_TOLERANCE * float(reference.abs().max())
    if metrics["agreement"] < 1.0 or metrics["max_abs_logit_diff"] > limit:
        tqdm.write(f"warning: fold of {what} is not exact (agreement {metrics['agreement']:.4f}, max |logit difference| "
                   f"{metrics['max_abs_logit_diff']:.3g} > {limit:.3g}); is the first Conv2d the first layer the input "
                   "meets?", file=sys.stderr)


def renorm(config: RenormConfig, *, experiment: str | None = None, run_name: str | None = None) -> RenormResult:
    cands, register_cand, register_adapt = check_config(config)
    job = prepare(config)
    tags = {tracking.KIND_TAG: "renorm", "zoo.model": config.model, "zoo.weights": job.pretrained.weights}
    with tracking.start_run(experiment=experiment, run_name=run_name or f"renorm {config.model} on {Path(job.data_root).name}",
                            tags=tags) as parent:
        tracking.log_params(parent_params(job))
        tracking.log_dataset_inputs(Path(job.data_root).name, job.data_root, {"evaluation": job.evaluation})
        mlflow.set_tag(tracking.NOTE_TAG, describe_renorm(job))
        logits: list[torch.Tensor] = []  # the unmodified network under its own normalization: every pair's reference
        run_network(job.pretrained.network, job.evaluation, job.source, job.device, config.batch_size, "reference",
                    lambda rows, batch: logits.append(batch))
        reference = torch.cat(logits)
        result = RenormResult(parent.info.run_id, [], source=job.source)
        pairs = [(c, a) for c in cands for a in config.adaptations]
        for cand, adaptation in tqdm(pairs, unit="eval", desc=f"renorm {config.model}"):
            row = evaluate_pair(job, cand, adaptation, reference, cand is register_cand and adaptation == register_adapt)
            result.model_uri = row.pop("model_uri") or result.model_uri
            result.rows.append(row)
        log_summary(result.rows, config, len(job.class_names))
        mlflow.set_tag(tracking.NOTE_TAG, describe_renorm(job, result.rows))
    return result


ADAPTATION_MEANING = {
    "none": "only the input normalization changes",
    "bn-recalibrate": "BatchNorm statistics re-estimated on calibration images under the new normalization",
    "fold": "the first convolution rewritten to compute under the new normalization what it computed under the old",
}


def describe_renorm(job: Prepared, rows: list[dict] | None = None) -> str:
    """The parent run's markdown description: what was re-evaluated on what, then top-1 per normalization."""
    config = job.config
    lines = [
        f"Re-evaluated the pretrained **{config.model}** (weights `{job.pretrained.weights}`, trained with "
        f"{job.source}) on {len(job.evaluation.labels):,} images of `{job.data_root}`, under other input "
        "normalizations; nothing is retrained. Adaptations: "
        + "; ".join(f"**{a}**: {ADAPTATION_MEANING[a]}" for a in config.adaptations) + ".",
        "", "Every (normalization, adaptation) pair is a child run.",
    ]
    if rows:
        explicit = [r for r in rows if r["grid_mean"] is None]
        lines += ["", "| normalization | " + " | ".join(config.adaptations) + " |",
                  "|---|" + "---|" * len(config.adaptations)]
        for label in dict.fromkeys(r["normalization"] for r in explicit):
            top1 = {r["adaptation"]: r["top1"] for r in explicit if r["normalization"] == label}
            lines.append(f"| {label} | " + " | ".join(f"{100 * top1[a]:.1f} %" for a in config.adaptations) + " |")
        lines += ["", "Top-1 accuracy above; the whole table is `renorm_results.csv`"
                  + (", the grid's top-1 the `heatmap_top1_*.png` figures." if any(r["grid_mean"] is not None for r in rows) else ".")]
    return "\n".join(lines)


def describe_evaluation(job: Prepared, cand: Candidate, adaptation: str, metrics: dict[str, float]) -> str:
    return (
        f"**{job.config.model}** (weights `{job.pretrained.weights}`, trained with {job.source}) evaluated with "
        f"input normalization **{cand.normalization}** ({cand.label}), adaptation **{adaptation}**: "
        f"{ADAPTATION_MEANING[adaptation]}.\n\n"
        f"**Result** on {len(job.evaluation.labels):,} images: top-1 **{100 * metrics['top1']:.2f} %**, "
        f"top-5 {100 * metrics['top5']:.2f} %; {100 * metrics['agreement']:.1f} % of the images keep the top-1 class "
        f"of the unmodified network under its own normalization."
    )


def _fmt_grid(spec: tuple[float, float, int] | None) -> str | None:
    return None if spec is None or int(spec[2]) == 0 else f"{spec[0]:g} {spec[1]:g} {int(spec[2])}"


def log_summary(rows: list[dict], config: RenormConfig, num_classes: int) -> None:
    """On the parent run: the table, and per adaptation a grid heatmap and the grid's median top-1."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    mlflow.log_text(table.getvalue(), "renorm_results.csv")
    for adaptation in config.adaptations:
        cells = [r for r in rows if r["adaptation"] == adaptation and r["grid_mean"] is not None]
        if not cells:
            continue
        mlflow.log_metrics({f"grid_median_top1_{adaptation}": float(np.median([r["top1"] for r in cells]))})
        figure = heatmap(cells, f"{config.model} top-1, adaptation: {adaptation} (chance {1 / num_classes:.1%})")
        mlflow.log_figure(figure, f"heatmap_top1_{adaptation}.png")


def heatmap(cells: list[dict], title: str):
    """Top-1 (%) over the grid: mean on x, std on y, one annotated cell per evaluation (no pyplot state)."""
    from matplotlib.figure import Figure

    means, stds = sorted({r["grid_mean"] for r in cells}), sorted({r["grid_std"] for r in cells})
    grid = np.full((len(stds), len(means)), np.nan)
    for r in cells:
        grid[stds.index(r["grid_std"]), means.index(r["grid_mean"])] = 100 * r["top1"]
    figure = Figure(figsize=(1.1 * len(means) + 3, 0.8 * len(stds) + 2), layout="tight")
    ax = figure.add_subplot()
    image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white" if value < 50 else "black", fontsize=8)
    ax.set_xticks(range(len(means)), [f"{m:.3g}" for m in means])
    ax.set_yticks(range(len(stds)), [f"{s:.3g}" for s in stds])
    ax.set(xlabel="mean (all channels)", ylabel="std (all channels)", title=title)
    figure.colorbar(image, ax=ax, label="top-1 accuracy (%)")
    return figure
