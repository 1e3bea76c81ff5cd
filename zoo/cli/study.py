"""`zoo study`: search input normalizations with Optuna, one MLflow parent run per study."""

import click

from zoo.cli.options import (
    ALIAS, BATCH_SIZE, DATA_DIR, DATASET, DEVICE, EXPERIMENT, FORMAT, IMAGE_SIZE, MAX_BATCHES, MODEL, REGISTER,
    TEST_FRACTION, TRACKING_TIMEOUT, VAL_FRACTION, echo_json, options, unset_sentinels,
)

_POSITIVE = click.IntRange(min=1)


def _size(ctx: click.Context, param: click.Parameter, value):
    """MLproject passes 0 for the default ("all images", or the automatic --jobs): it cannot leave a parameter out."""
    return None if value in (None, 0) else value


@click.command()
@options(MODEL, DATASET, IMAGE_SIZE, VAL_FRACTION, TEST_FRACTION)
@click.option("--trials", type=_POSITIVE, default=20, show_default=True,
              help="Finished trials the study must hold; a re-run tops it up to this number.")
@click.option("--epochs", type=_POSITIVE, default=1, show_default=True, help="Training epochs per trial.")
@click.option("--mean-range", nargs=2, type=float, default=(-1.0, 2.0), show_default=True, metavar="LOW HIGH",
              help="Mean searched on a linear scale.")
@click.option("--std-range", nargs=2, type=float, default=(0.05, 1.0), show_default=True, metavar="LOW HIGH",
              help="Std searched on a log scale (LOW > 0).")
@click.option("--per-channel", is_flag=True, help="Search one mean and std per channel (RGB models).")
@click.option("--recipe", default=None, metavar="NAME",
              help="Every trial's training recipe: seed, light, strong or finetune (as zoo train --recipe). "
                   "Default: zoo train's for the model and data.")
@click.option("--search", default="", metavar="NAME[=LOW:HIGH],...",
              help="Also search these training settings, e.g. lr,weight_decay; NAME=LOW:HIGH sets a range "
                   "(lr=1e-4:1e-2). Searchable: lr, weight_decay, label_smoothing, mixup, cutmix, hflip, crop_pad, ema, "
                   "warmup_epochs, reprob, momentum (their default ranges: docs/study.md).")
@click.option("--sampler", type=click.Choice(["tpe", "random", "qmc"]), default="tpe", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed (training always starts from seed 1).")
@click.option("--jobs", type=click.IntRange(min=0), default=None, callback=_size,
              help="Trials run at once, one per process (this one and N - 1 it starts), sharing the CPU's threads; "
                   "results do not depend on it. Default: one per CPU core (at most 8) on the CPU, 1 on a GPU.")
@click.option("--batch-trials", type=_POSITIVE, default=1, show_default=True, metavar="K",
              help="Train K trials at once in one batched computation (torch.func.vmap), each its own trial and child "
                   "run. For GPUs: slower on a CPU.")
@click.option("--storage", envvar="ZOO_OPTUNA_STORAGE", default="sqlite:///optuna.db", show_default=True,
              help="Optuna storage URL; share a postgresql://USER@HOST:PORT/DB between machines. A relative SQLite "
                   "path is recorded as an absolute one. [env: ZOO_OPTUNA_STORAGE]")
@click.option("--study-name", default=None, callback=unset_sentinels, help="Default: MODEL-DATASET-normalization.")
@click.option("--prune", is_flag=True, help="Median-prune trials on per-epoch validation accuracy.")
@BATCH_SIZE
@click.option("--train-size", type=click.IntRange(min=0), default=None, callback=_size, help="Use the first N training images (default all).")
@click.option("--val-size", type=click.IntRange(min=0), default=None, callback=_size, help="Use the first N validation images.")
@click.option("--test-size", type=click.IntRange(min=0), default=None, callback=_size, help="Use the first N test images.")
@MAX_BATCHES
@click.option("--enqueue", nargs=2, multiple=True, metavar="MEAN STD",
              help="A normalization to try first (repeatable), e.g. 0.1307 0.3081, or auto auto: the training split's "
                   "own statistics (averaged over channels unless --per-channel).")
@click.option("--log-models", type=click.Choice(["best", "all", "none"]), default="best", show_default=True,
              help="Which trials log an MLflow model (only the best trial keeps its checkpoints).")
@options(REGISTER, ALIAS)
@click.option("--heartbeat", type=_POSITIVE, default=60, show_default=True,
              help="Seconds between trial heartbeats; a trial silent for two is failed and retried once.")
@click.option("--collapse-margin", type=click.FloatRange(min=0), default=0.02, show_default=True,
              help="A trial whose val accuracy is <= the most frequent class's share + this counts as collapsed.")
@options(DEVICE, DATA_DIR, EXPERIMENT, TRACKING_TIMEOUT)
@click.option("--no-progress", is_flag=True, help="No progress bar (Optuna logs each trial instead).")
@FORMAT
def study(model, dataset, image_size, val_fraction, test_fraction, trials, epochs, mean_range, std_range, per_channel,
          recipe, search, sampler, seed, jobs, batch_trials, storage, study_name,
          prune, batch_size, train_size, val_size, test_size, max_batches, enqueue, log_models, register, alias,
          heartbeat, collapse_margin, device, data_dir, experiment, tracking_timeout, no_progress, fmt) -> None:
    """Search input normalizations (mean, std), and with --search training settings, with Optuna: one MLflow parent
    run, one child run per trial.

    Run the same command on several machines (sharing --storage) to parallelize, or again to resume a study."""
    from training.study.config import StudyConfig
    from training.study.report import dashboard_command
    from training.study.workers import default_jobs, run_study
    config = StudyConfig(
        model=model, dataset=dataset, trials=trials, epochs=epochs, mean_range=tuple(mean_range),
        std_range=tuple(std_range), per_channel=per_channel, recipe=recipe,
        search=tuple(item for item in search.split(",") if item.strip()), sampler=sampler, seed=seed, jobs=jobs or default_jobs(device),
        storage=storage, batch_trials=batch_trials, study_name=study_name, experiment=experiment, prune=prune,
        batch_size=batch_size, train_size=train_size, val_size=val_size, test_size=test_size, max_batches=max_batches,
        log_models=log_models, register=register, alias=alias, heartbeat=heartbeat, enqueue=list(enqueue),
        collapse_margin=collapse_margin, device=device, data_dir=data_dir, image_size=image_size,
        val_fraction=val_fraction, test_fraction=test_fraction, progress=not no_progress, tracking_timeout=tracking_timeout)
    result = run_study(config)
    report = {"study_name": result.study_name, "parent_run_id": result.parent_run_id,
              "best_model_uri": result.best_model_uri, "storage": result.storage, **result.summary}
    if fmt == "json":
        echo_json(report)
        return
    s = result.summary
    click.echo(f"study {result.study_name} (parent run {result.parent_run_id}): {s['trials_complete']} complete, "
               f"{s['trials_diverged']} diverged, {s['trials_pruned']} pruned, {s['trials_collapsed']} collapsed "
               f"(val accuracy <= {s['collapse_threshold']:.4f})")
    for split in ("val", "test"):
        stats = s[f"{split}_accuracy"]
        if stats["median"] is not None:
            click.echo(f"{split} accuracy: median {stats['median']:.4f}  sd {stats['sd']:.4f}  "
                       f"min {stats['min']:.4f}  max {stats['max']:.4f}")
    if s["best"]:
        params = "  ".join(f"{k}={v:.4g}" for k, v in s["best"]["params"].items())
        click.echo(f"best: trial {s['best']['trial']}  {params}  val_accuracy={s['best']['val_accuracy']:.4f}"
                   + (f"  model {result.best_model_uri}" if result.best_model_uri else ""))
    click.echo(f"open it in Optuna's dashboard: {dashboard_command(result.storage)}")
