"""`zoo renorm`: a trained network re-evaluated under other input normalizations, as is and adapted."""

import click

from zoo.cli.options import (
    ALIAS, DEVICE, EXPERIMENT, FORMAT, REGISTER, RUN_NAME, echo_json, options, unset_sentinels,
)


def _split_words(ctx: click.Context, param: click.Parameter, value) -> list[str]:
    """Repeated options or space- (for --adapt, comma-) separated lists: MLproject passes one string."""
    words: list[str] = []
    for item in value or ():
        words.extend(item.replace(",", " ").split() if param.name == "adaptations" else item.split())
    return words


def _optional_count(ctx: click.Context, param: click.Parameter, value) -> int | None:
    value = unset_sentinels(ctx, param, value)
    return None if value is None else click.IntRange(min=1).convert(value, param, ctx)


@click.command("renorm")
@click.option("--model", default="resnet18", show_default=True, help="A registered architecture: resnet18, resnet50.")
@click.option("--weights", default="IMAGENET1K_V1", show_default=True,
              help="torchvision weights name (IMAGENET1K_V1, DEFAULT; from torchvision's cache when offline) "
                   "or the path of a state dict or of a zoo checkpoint.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Class-folder images: ImageNet val (synset folders), torchvision's ImageNet root, or any ImageFolder.")
@click.option("--norm", "norms", multiple=True, callback=_split_words, metavar="SPEC",
              help="imagenet, identity or MEAN:STD (e.g. 0.5:0.5, 0.485,0.456,0.406:0.229,0.224,0.225). Repeatable or "
                   "space-separated. Default: imagenet.")
@click.option("--grid-mean", nargs=3, type=(float, float, int), default=None, metavar="LOW HIGH STEPS",
              help="Grid of means (applied to every channel); STEPS 0: no grid.")
@click.option("--grid-std", nargs=3, type=(float, float, int), default=None, metavar="LOW HIGH STEPS",
              help="Grid of stds (> 0), crossed with --grid-mean; STEPS 0: no grid.")
@click.option("--adapt", "adaptations", multiple=True, callback=_split_words, metavar="ADAPTATION",
              help="none, bn-recalibrate or fold. Repeatable or comma-separated. Default: none.")
@click.option("--limit", default=None, callback=_optional_count, metavar="N",
              help="Evaluate on N images drawn at random (seeded). Default: all.")
@click.option("--calibration", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Images for bn-recalibrate, split off --data (never evaluated) unless --calibration-data is given.")
@click.option("--calibration-data", type=click.Path(exists=True, file_okay=False), default=None, callback=unset_sentinels,
              help="Class-folder images to calibrate on (e.g. ImageNet train).")
@click.option("--source-norm", default=None, callback=unset_sentinels, metavar="SPEC",
              help="The normalization the weights were trained with. Default: the weights' own, else the model's.")
@click.option("--resize", type=click.IntRange(min=1), default=None,
              help="Shorter side before the crop (a registered model is served with both). Default: the weights' (256).")
@click.option("--crop", type=click.IntRange(min=1), default=None, help="Center crop. Default: the weights' (224).")
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Image decoding processes.")
@click.option("--memory-limit-gb", type=click.FloatRange(min=0), default=4.0, show_default=True,
              help="Decoded crops above this size go to a memmap on disk (--spill-dir) instead of memory.")
@click.option("--spill-dir", type=click.Path(file_okay=False), default=None, help="Where the memmap goes. Default: a temp folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Chooses the calibration and --limit images.")
@options(DEVICE, EXPERIMENT, RUN_NAME, REGISTER, ALIAS)
@click.option("--register-norm", default=None, callback=unset_sentinels, metavar="SPEC",
              help="Which evaluated normalization to register. Default: the first --norm.")
@click.option("--register-adapt", default=None, callback=unset_sentinels, metavar="ADAPTATION",
              help="Which adaptation to register. Default: fold, else bn-recalibrate, else none (the first evaluated).")
@FORMAT
def renorm(model, weights, data, norms, grid_mean, grid_std, adaptations, limit, calibration, calibration_data,
           source_norm, resize, crop, batch_size, workers, memory_limit_gb, spill_dir, seed, device, experiment,
           run_name, register, alias, register_norm, register_adapt, fmt) -> None:
    """Re-evaluate a pretrained network under other input normalizations, as is and adapted to them.

    One parent MLflow run (results table, top-1 heatmaps); one child run per (normalization, adaptation)."""
    from training.renorm import RenormConfig
    from training.renorm import renorm as run_renorm
    config = RenormConfig(
        data=data, model=model, weights=weights, norms=norms or ["imagenet"], grid_mean=grid_mean, grid_std=grid_std,
        adaptations=adaptations or ["none"], limit=limit, calibration=calibration, calibration_data=calibration_data,
        source_norm=source_norm, resize=resize, crop=crop, batch_size=batch_size, workers=workers, device=device,
        seed=seed, memory_limit_gb=memory_limit_gb, spill_dir=spill_dir, register=register, alias=alias,
        register_norm=register_norm, register_adapt=register_adapt)
    result = run_renorm(config, experiment=experiment, run_name=run_name)
    if fmt == "json":
        echo_json({"parent_run_id": result.parent_run_id, "model_uri": result.model_uri, "results": result.rows})
        return
    click.echo(f"parent run {result.parent_run_id} (source normalization {result.source})")
    for row in result.rows:
        if row["grid_mean"] is None:
            click.echo(f"{row['normalization']:<28}{row['adaptation']:<16}top1 {row['top1']:.4f}  top5 {row['top5']:.4f}  "
                       f"agreement {row['agreement']:.4f}")
    if result.model_uri:
        click.echo(f"model: {result.model_uri}  registered as {register}" + (f"@{alias}" if alias else ""))
