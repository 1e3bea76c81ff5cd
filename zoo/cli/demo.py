"""`zoo demo`: the whole path on real data, offline: train -> track -> register -> export -> classify."""

from pathlib import Path

import click

from zoo.cli.options import DATA_DIR, EXPERIMENT, options


def write_digit_images(images, labels, class_names: list[str], folder: Path) -> list[tuple[Path, str]]:
    """Write uint8 [N, 1, H, W] images as PNG files named after their index and true label."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (img, y) in enumerate(zip(images, labels)):
        label = class_names[int(y)]
        path = folder / f"{i:04d}_true-{label}.png"
        Image.fromarray(img[0].numpy(), mode="L").save(path)
        written.append((path, label))
    return written


@click.command()
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--images", "n_images", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many held-out test digits to classify.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Where the ONNX file and the digit images go.")
@click.option("--register", "registered_name", default="mnist-cnn", show_default=True)
@click.option("--alias", default="champion", show_default=True)
@options(DATA_DIR, EXPERIMENT)
def demo(epochs, n_images, out_dir, registered_name, alias, data_dir, experiment) -> None:
    """Train the MNIST CNN on real digits (mnist-5k), register, export to ONNX and classify held-out digits."""
    import mlflow
    from serving.classify import classify_paths
    from zoo.model_format.onnx_graph import export_onnx
    from serving.loading import load_model
    from training.train import train
    from training.train_config import TrainConfig
    from zoo.access import masked_url
    from zoo.data import load_dataset
    out = Path(out_dir)
    uri = f"models:/{registered_name}@{alias}"
    click.echo(f"[1/4] training mnist_cnn on mnist-5k for {epochs} epochs (tracking: {masked_url(mlflow.get_tracking_uri())})", err=True)
    dataset = load_dataset("mnist-5k", data_dir=data_dir)
    result = train(TrainConfig(epochs=epochs, data_dir=data_dir), dataset=dataset, experiment=experiment,
                   register=registered_name, alias=alias)
    click.echo(f"      run {result.run_id}: test_accuracy={result.test_accuracy:.4f}, registered as {uri}", err=True)
    click.echo(f"[2/4] exporting {uri} to ONNX", err=True)
    report = export_onnx(load_model(uri), out / "mnist_cnn.onnx")
    click.echo(f"      {report.path}: max |onnxruntime - torch| = {report.max_abs_diff:.1e}", err=True)
    click.echo(f"[3/4] writing {n_images} held-out test digits to {out / 'digits'}", err=True)
    test = dataset.test.subset(n_images)
    written = write_digit_images(test.images, test.labels, dataset.classes, out / "digits")
    click.echo("[4/4] classifying them with onnxruntime", err=True)
    predictions = [p for batch in classify_paths(str(report.path), [p for p, _ in written], k=1) for p in batch]
    correct = 0
    click.echo(f"{'image':<32}{'true':>5}{'predicted':>11}{'probability':>13}")
    for (path, truth), pred in zip(written, predictions):
        correct += pred.label == truth
        mark = "" if pred.label == truth else "   <- wrong"
        click.echo(f"{path.name:<32}{truth:>5}{pred.label:>11}{pred.top[0][1]:>13.3f}{mark}")
    click.echo(f"{correct}/{len(written)} correct; test accuracy over all {len(dataset.test)} held-out digits: {result.test_accuracy:.4f}")
    click.echo("\nBrowse the runs:  zoo ui   (the MLflow UI on http://127.0.0.1:5000; Ctrl-C stops it)")
    click.echo(f"Classify more:    zoo classify {uri} {out / 'digits'}")
