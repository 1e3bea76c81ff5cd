"""`zoo export`: a logged or registered model to one ONNX file, its normalization inside."""

from dataclasses import asdict

import click

from zoo.cli.options import FORMAT, MODEL_URI, echo_json


@click.command()
@MODEL_URI
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Fail if onnxruntime and PyTorch outputs differ by more than this.")
@FORMAT
def export(model_uri, output, tolerance, fmt) -> None:
    """Export MODEL_URI (models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME, runs:/RUN_ID/model or a model
    folder) to ONNX with its normalization inside the graph (input: pixels in [0, 1])."""
    from zoo.model_format.onnx_graph import export_onnx
    from serving.loading import load_model
    if not output.endswith(".onnx"):
        raise click.BadParameter(f"{output!r} should end in .onnx", param_hint="--output")
    report = export_onnx(load_model(model_uri), output, tolerance=tolerance)
    if fmt == "json":
        echo_json(asdict(report))
    else:
        click.echo(f"wrote {report.path} (opset {report.opset}); max |onnxruntime - torch| = {report.max_abs_diff:.2e} "
                   f"over batches {report.batch_sizes_checked}")
