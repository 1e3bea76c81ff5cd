"""`zoo train`: train one model and log it to MLflow (training.train does the work)."""

import os

import click

from training.recipes import RECIPES
from zoo.cli.options import (
    ALIAS, BATCH_SIZE, DATA_DIR, DATASET, DEVICE, EXPERIMENT, FORMAT, IMAGE_SIZE, KEEP_CHECKPOINTS, MAX_BATCHES, MEAN,
    MODEL, MODEL_OPT, MOMENTUM, RECIPE_OPTIONS, REGISTER, RESUME, RUN_NAME, STD, TEST_FRACTION, TRACKING_TIMEOUT,
    VAL_FRACTION, echo_json, options, resume_options, unset_sentinels,
)


@click.command()
@options(MODEL, DATASET, IMAGE_SIZE, VAL_FRACTION, TEST_FRACTION, MEAN, STD)
@click.option("--epochs", type=click.IntRange(min=1), default=14, show_default=True,
              help="Passes over the training split; val metrics and checkpoints after each.")
@BATCH_SIZE
@click.option("--optimizer", default=None, callback=unset_sentinels, help="adadelta, sgd, adam or adamw. Default: the model's recipe.")
@click.option("--lr", type=float, default=None, help=f"Learning rate. Default: the model's (--recipe finetune: {RECIPES['finetune']['lr']:g}).")
@click.option("--gamma", type=float, default=None, help="StepLR decay per epoch (--schedule step). Default: the model's.")
@options(MOMENTUM, *RECIPE_OPTIONS, MODEL_OPT)
@click.option("--weights", default=None, callback=unset_sentinels, metavar="pretrained|FILE",
              help="timm: models: start from timm's pretrained weights (offline from the Hugging Face cache, HF_HOME) "
                   "or a local checkpoint FILE (tensors and state dicts only), adapted to the data (docs/models.md); "
                   "the default recipe becomes finetune.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Seeds the initial weights, dropout and the order of the batches.")
@DEVICE
@click.option("--precision", type=click.Choice(["fp32", "bf16-mixed"]), default="fp32", show_default=True,
              help="bf16-mixed: forward passes in bfloat16 (weights stay float32); rounds inputs to 8 significant bits.")
@options(DATA_DIR, EXPERIMENT, RUN_NAME, REGISTER, ALIAS)
@click.option("--dry-run", is_flag=True, help="Train on 2 batches per epoch: checks the pipeline in seconds.")
@options(MAX_BATCHES, KEEP_CHECKPOINTS)
@click.option("--no-checkpoints", is_flag=True, help="Same as --keep-checkpoints none.")
@options(RESUME, TRACKING_TIMEOUT, FORMAT)
@click.pass_context
def train(ctx, model, dataset, image_size, val_fraction, test_fraction, mean, std, epochs, batch_size, optimizer, lr, gamma,
          momentum, model_opts, weights, seed, device, precision, data_dir, experiment, run_name, register, alias, dry_run,
          max_batches, keep_checkpoints, no_checkpoints, resume, tracking_timeout, fmt, **recipe) -> None:
    """Train one model and log it to MLflow (params, per-epoch metrics, checkpoints, model).

    Ctrl-C or SIGTERM ends the run KILLED with its last checkpoint; --resume RUN_ID continues it."""
    from training.train import resume as resume_training
    from training.train import train as run_train
    from training.train_config import TrainConfig, check_contradictions
    if weights:
        model_opts = {**model_opts, **pretrained_weights_option(model, weights)}
    config = TrainConfig(
        model=model, dataset=dataset, image_size=image_size, val_fraction=val_fraction, test_fraction=test_fraction,
        mean=mean, std=std, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, gamma=gamma,
        momentum=momentum, model_config=model_opts, seed=seed, device=device, precision=precision, data_dir=data_dir,
        max_batches=2 if dry_run else max_batches, checkpoints=not no_checkpoints, keep_checkpoints=keep_checkpoints,
        **recipe)  # --recipe and its settings (zoo.cli.options.RECIPE_OPTIONS), None where not given
    if resume:
        given = resume_options(ctx, config)
        result = resume_training(resume, given, register=register, alias=alias, tracking_timeout=tracking_timeout)
    else:
        check_contradictions(config)
        result = run_train(config, experiment=experiment, run_name=run_name, register=register, alias=alias,
                           tracking_timeout=tracking_timeout)
    summary = {"run_id": result.run_id, "model_uri": result.model_uri,
               "registered": f"models:/{register}@{alias}" if register and alias else register,
               "normalization": result.normalization.to_dict(), "val_accuracy": result.val_accuracy,
               "test_accuracy": result.test_accuracy}
    if fmt == "json":
        echo_json(summary)
    else:
        click.echo(f"run {result.run_id}: test_accuracy={result.test_accuracy:.4f} "
                   f"val_accuracy={result.val_accuracy:.4f} ({result.normalization})")
        click.echo(f"model: {result.model_uri}" + (f"  registered as {summary['registered']}" if register else ""))


def pretrained_weights_option(model: str, weights: str) -> dict[str, str]:
    """--weights as the timm builder's option: pretrained=true, or weights=FILE (absolute: --resume finds it)."""
    from zoo.models.registry import TIMM_PREFIX
    if not model.startswith(TIMM_PREFIX):
        raise click.UsageError(f"--weights starts timm: models (--model timm:NAME) from pretrained weights, not "
                               f"{model!r}; a torchvision ResNet's weights are re-evaluated with zoo renorm --weights")
    if weights == "pretrained":
        return {"pretrained": "true"}
    if not os.path.isfile(weights):
        raise click.BadParameter(f"no such file: {weights} (give pretrained, or a local timm checkpoint)",
                                 param_hint="--weights")
    return {"weights": os.path.abspath(weights)}
