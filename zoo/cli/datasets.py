"""`zoo datasets`: the dataset catalog (sizes, image shape, classes)."""

from __future__ import annotations

import click

from zoo.cli.options import FORMAT, echo_json


@click.command()
@click.option("--details", is_flag=True,
              help="With --format json: map each name to an object (description, train_images, test_images, "
                   "image_shape [C, H, W], classes) instead of to its description.")
@FORMAT
def datasets(details, fmt) -> None:
    """List the datasets in the catalog: training and test images, image shape, classes.

    Training images are the dataset's own training split, from which --val-fraction takes the
    validation split.
    """
    from zoo.data import list_datasets
    from zoo.data import dataset_info

    descriptions = list_datasets()
    if fmt == "json" and not details:  # the original shape, name -> description, kept for scripts
        echo_json(descriptions)
        return
    rows = {name: {"description": desc, **_info_fields(dataset_info(name))} for name, desc in descriptions.items()}
    if fmt == "json":
        echo_json(rows)
        return
    click.echo(f"{'name':<16}{'train':>8}{'test':>8}  {'image':<9}{'classes':>7}  description")
    for name, row in rows.items():
        shape = "x".join(map(str, row["image_shape"])) if row["image_shape"] else "?"
        click.echo(f"{name:<16}{_count(row['train_images']):>8}{_count(row['test_images']):>8}  {shape:<9}"
                   f"{_count(row['classes']):>7}  {row['description']}")
    click.echo("Any folder of class folders of images is a dataset too: --dataset PATH (FOLDER/CLASS/*.png, or "
               "FOLDER/train/CLASS/... with optional val/ and test/).", err=True)


def _info_fields(info) -> dict:
    """DatasetInfo as JSON fields; None for each when the dataset has no static facts recorded."""
    return info.to_dict() if info else {"train_images": None, "test_images": None, "image_shape": None, "classes": None}


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"
