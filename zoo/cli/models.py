"""`zoo models`: the architectures the zoo trains, or the registered models it serves."""

import fnmatch

import click

from zoo.cli.options import FORMAT, echo_json


@click.command()
@click.option("--registered", is_flag=True, help="List the MLflow registered models (with aliases) instead of architectures.")
@click.option("--filter", "pattern", default=None, help="fnmatch pattern on the architecture name, e.g. 'mnist*'.")
@FORMAT
def models(registered, pattern, fmt) -> None:
    """List the architectures the zoo can train, or the registered models it can serve."""
    rows = _registered_models() if registered else _architectures(pattern)
    if fmt == "json":
        echo_json(rows)
        return
    for row in rows:
        if registered:
            aliases = ", ".join(f"@{a}->v{v}" for a, v in row["aliases"].items()) or "no alias"
            click.echo(f"{row['name']}\tlatest v{row['latest_version']}\t{aliases}")
        else:
            shape = "x".join(map(str, row["input_shape"])) if row["input_shape"] else "its own"
            click.echo(f"{row['name']:<14}{shape:<10}{row['classes'] or 'any':>3} classes  {row['description']}")
    if not registered:
        click.echo("Each builds for the data's channels, size and classes. List timm's architectures with: "
                   "python -c \"import timm; print(timm.list_models('*resnet*'))\"", err=True)


def _architectures(pattern: str | None) -> list[dict]:
    """The registered architectures, then timm:NAME (timm's are too many to list)."""
    from zoo.models.registry import TIMM_PREFIX, get_model_spec, list_models
    specs = [get_model_spec(name) for name in list_models(pattern)]
    rows = [{"name": s.name, "input_shape": list(s.input_shape), "classes": s.num_classes,
             "normalization": s.normalization.to_dict(), "description": s.description} for s in specs]
    timm = f"{TIMM_PREFIX}NAME"
    if pattern is None or fnmatch.fnmatch(timm, pattern):
        rows.append({"name": timm, "input_shape": None, "classes": None, "normalization": None, "description":
                     "Builds any timm architecture, timm.create_model(NAME, in_chans=C, num_classes=K): input shape and "
                     "normalization from its pretrained config; needs the timm extra: pip install 'mlflow-zoo[timm]'."})
    return rows


def _registered_models() -> list[dict]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    return [{"name": rm.name,
             "latest_version": max((int(v.version) for v in client.search_model_versions(f"name = '{rm.name}'")),
                                   default=None),
             "aliases": {alias: int(v) for alias, v in (rm.aliases or {}).items()}}
            for rm in client.search_registered_models()]
