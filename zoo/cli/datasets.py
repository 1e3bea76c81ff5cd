"""`zoo datasets`: the dataset catalog (sizes, image shape, classes)."""

from dataclasses import asdict

import click

from zoo.cli.options import FORMAT, echo_json


@click.command()
@click.option("--details", is_flag=True, help="With --format json: map each name to an object (description, "
              "train_images, test_images, image_shape [C, H, W], classes) instead of to its description.")
@FORMAT
def datasets(details, fmt) -> None:
    """List the datasets in the catalog: training images (before --val-fraction), test images, image shape, classes."""
    from zoo.data import dataset_info, list_datasets
    descriptions = list_datasets()
    if fmt == "json" and not details:  # the original shape, name -> description, kept for scripts
        echo_json(descriptions)
        return
    rows = {name: {"description": desc, **asdict(dataset_info(name))} for name, desc in descriptions.items()}
    if fmt == "json":
        echo_json(rows)
        return
    click.echo(f"{'name':<16}{'train':>8}{'test':>8}  {'image':<9}{'classes':>7}  description")
    for name, row in rows.items():
        shape = "x".join(map(str, row["image_shape"]))
        click.echo(f"{name:<16}{row['train_images']:>8,}{row['test_images']:>8,}  {shape:<9}{row['classes']:>7,}  "
                   f"{row['description']}")
    click.echo("Any folder of class folders of images is a dataset too: --dataset PATH (FOLDER/CLASS/*.png, or "
               "FOLDER/train/CLASS/... with optional val/ and test/).", err=True)
