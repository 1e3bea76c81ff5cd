"""`zoo classify`: images, files or folders, through a registered model or an .onnx file (serving.classify)."""

import json

import click

from zoo.cli.options import MODEL_URI


@click.command()
@MODEL_URI
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--runtime", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True)
@click.option("--invert", is_flag=True, help="Invert grayscale (dark digits on light paper -> MNIST's light on dark).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images decoded and classified together: memory grows with this, not with the number of files.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes that decode images and, on onnx, classify them too (0: all in this process). "
                   "Default: one per CPU core, at most 8 (docs/classify.md).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Refuse images declaring more pixels (decompression bombs). Default: Pillow's limit, 89,478,485.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "jsonl"]), default="text", show_default=True,
              help="json: one array; jsonl: one object per line, written as each batch finishes (for large folders).")
def classify(model_uri, paths, top_k, runtime, invert, batch_size, workers, max_pixels, fmt) -> None:
    """Classify images (files or folders) with MODEL_URI (models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME,
    runs:/RUN_ID/model, a model folder or a .onnx file), printing the top-k labels.

    An unreadable input gets one line on stderr (an "error" row in json/jsonl), the others are classified; exit 1."""
    from serving.classify import classify_paths
    _print_classified(classify_paths(model_uri, paths, runtime=runtime, k=top_k, invert=invert, batch_size=batch_size,
                                     workers=workers, max_pixels=max_pixels), fmt)


def _print_classified(batches, fmt: str) -> None:
    total = failed = 0
    separator = "[\n  "  # json: the array is streamed, rows appear as batches finish
    for batch in batches:
        total += len(batch)
        for p in batch:
            if p.error:
                failed += 1
                click.echo(f"cannot classify {p.path}: {p.error}", err=True)
        if fmt in ("json", "jsonl"):
            lines = [json.dumps(p.to_dict()) for p in batch]
        else:  # errors went to stderr
            lines = [f"{p.path}\t" + "  ".join(f"{label} {prob:.3f}" for label, prob in p.top) for p in batch if not p.error]
        if fmt == "json" and lines:
            click.echo(separator + ",\n  ".join(lines), nl=False)
            separator = ",\n  "
        elif lines:
            click.echo("\n".join(lines))
    if fmt == "json":
        click.echo("\n]" if separator != "[\n  " else "[]")
    if failed:
        raise click.ClickException(f"{failed} of {total} inputs could not be classified (listed above)")
