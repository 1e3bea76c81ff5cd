"""A study summarized and drawn on its parent run: summary, trials table, description, figures, interactive page."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import mlflow
import numpy as np
import optuna
from optuna.trial import TrialState
from zoo.progress import tqdm  # plain lines when stderr is no terminal

from training import tracking
from training.study.config import RUN_ATTR, SEARCHABLE, is_finished
from training.study.storage import stored_search
from zoo.access import masked_url


def _stats(values: list[float]) -> dict[str, float | None]:
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()),
            "max": float(a.max())} if len(a) else dict.fromkeys(("median", "sd", "min", "max"))


def summarize(study: optuna.Study, one_class: float, collapse_margin: float = 0.02) -> dict[str, Any]:
    """How much accuracy moves over normalizations, and how often training collapses to one class."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    threshold, val = one_class + collapse_margin, [t.value for t in complete]
    best = max(complete, key=lambda t: t.value, default=None)
    test = [t.user_attrs["test_accuracy"] for t in complete if "test_accuracy" in t.user_attrs]
    summary = {
        "study_name": study.study_name, "trials_complete": len(complete),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_diverged": sum(is_finished(t) and t.state == TrialState.FAIL for t in trials),
        "trials_failed_other": sum(t.state == TrialState.FAIL and not is_finished(t) for t in trials),
        "trials_running": sum(t.state == TrialState.RUNNING for t in trials),
        "collapse_threshold": threshold, "trials_collapsed": sum(v <= threshold for v in val),
        "val_accuracy": _stats(val), "test_accuracy": _stats(test),
        "best": best and {"trial": best.number, "params": best.params, "val_accuracy": best.value,
                          "test_accuracy": best.user_attrs.get("test_accuracy"), "run_id": best.user_attrs.get(RUN_ATTR)}}
    return summary


def log_summary(study: optuna.Study, parent_run_id: str, one_class: float, collapse_margin: float, storage_url: str,
                plots: bool = False) -> dict[str, Any]:
    """The summary, trials table, description and, with ``plots``, figures on the parent run."""
    summary = summarize(study, one_class, collapse_margin)
    mlflow.log_dict(summary, "study/summary.json", run_id=parent_run_id)
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration")).rename(
        columns={"value": "val_accuracy", "user_attrs_test_accuracy": "test_accuracy"})
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds()
    mlflow.log_text(frame.to_csv(index=False), "study/trials.csv", run_id=parent_run_id)
    metrics = {k: summary[k] for k in ("trials_complete", "trials_collapsed", "trials_diverged", "trials_pruned")}
    metrics.update({f"{stat}_{split}_accuracy": v for split in ("val", "test")
                    for stat, v in summary[f"{split}_accuracy"].items() if v is not None})
    tags = {tracking.NOTE_TAG: describe_study(study, summary, storage_url)}  # the parent's description
    if best := summary["best"]:
        mlflow.log_dict(best, "study/best_params.json", run_id=parent_run_id)
        tags.update({"best_trial": best["trial"], "best_run_id": best["run_id"],
                     **{f"best_{k}": f"{v:.6g}" for k, v in best["params"].items()}})
    tracking.log_batch(parent_run_id, metrics=metrics, tags=tags)
    if plots:
        log_plots(study, parent_run_id, summary["collapse_threshold"])
    return summary


PLOTS = ("contour.png", "param_importances.png", "accuracy_vs_normalization.png", "interactive.html")  # under study/


def describe_study(study: optuna.Study, summary: dict[str, Any], storage_url: str) -> str:
    """The parent run's description: what the study searches, what it found so far, how to open it."""
    s, val, best = stored_search(study) or {}, summary["val_accuracy"], summary["best"]
    searched = (f": trains **{s['model']}** on **{s['dataset']}** for {s['epochs']} epoch(s) per trial, with the input "
                f"mean searched in [{s['mean_range'][0]:g}, {s['mean_range'][1]:g}] and the std in "
                f"[{s['std_range'][0]:g}, {s['std_range'][1]:g}] (log scale)"
                + "".join(f", {k} in [{low:g}, {high:g}]" for k, (low, high) in s.get("search", {}).items())
                + (f", around the {s['recipe']} recipe" if s.get("recipe") else "")) if s else ""
    result = "no trial has completed yet." if not summary["trials_complete"] else (
        f"{summary['trials_complete']} trials complete ({summary['trials_collapsed']} collapsed to predicting one "
        f"class, {summary['trials_diverged']} diverged, {summary['trials_pruned']} pruned). Validation accuracy: "
        f"median **{100 * val['median']:.2f} %**, sd {100 * val['sd']:.2f} pt, range {100 * val['min']:.2f}-"
        f"{100 * val['max']:.2f} %. Best: trial {best['trial']} "
        f"({', '.join(f'{k} {v:.4g}' for k, v in best['params'].items())}).")
    return (f"Optuna study **{study.study_name}**{searched}. Every trial is a child run of this one.\n\n"
            f"**Result:** {result}\n\nFigures under `study/`: {', '.join(f'`{p}`' for p in PLOTS)}; every trial "
            f"in `study/trials.csv`.\n\nOpen the study in Optuna's dashboard: `{dashboard_command(storage_url)}`.")


def dashboard_command(storage_url: str) -> str:
    return f"optuna-dashboard {masked_url(storage_url)}"


def log_plots(study: optuna.Study, parent_run_id: str, collapse_threshold: float) -> None:
    figures = study_figures(study, collapse_threshold)  # sets the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    for name, figure in figures.items():
        mlflow.MlflowClient().log_figure(parent_run_id, figure, f"study/{name}.png")
        plt.close(figure)
    from optuna import visualization

    parts, embedded = [], False  # plotly.js embedded once, so the page works offline in the MLflow UI
    for plot in (visualization.plot_contour, visualization.plot_slice, visualization.plot_param_importances,
                 visualization.plot_optimization_history):
        figure = _optuna_plot(plot, study)
        if isinstance(figure, Exception):
            parts.append(f"<p>{plot.__name__}: not available yet ({figure})</p>")
        else:
            parts.append(figure.to_html(full_html=False, include_plotlyjs=not embedded))
            embedded = True
    mlflow.log_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>study {study.study_name}</title></head>"
                    f"<body><h2>Optuna study {study.study_name}</h2>{''.join(parts)}</body></html>",
                    "study/interactive.html", run_id=parent_run_id)


def _optuna_plot(plot: Any, study: optuna.Study) -> Any:
    """Optuna's ``plot`` of val_accuracy, or the exception that says it needs more complete trials."""
    import matplotlib

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # rc_context: Optuna switches matplotlib's global style to ggplot
        try:
            return plot(study, target_name="val_accuracy")
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            return exc


def study_figures(study: optuna.Study, collapse_threshold: float) -> dict[str, Any]:
    """Optuna's contour and importances and accuracy against each searched value, by name (those possible yet)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps plotting off GUI event loops
    from optuna.visualization import matplotlib as optuna_plots

    figures = {}
    for name, plot in (("contour", optuna_plots.plot_contour), ("param_importances", optuna_plots.plot_param_importances)):
        axes = _optuna_plot(plot, study)
        if isinstance(axes, Exception):
            tqdm.write(f"study: no {name} plot yet ({axes})", file=sys.stderr)
            continue
        figures[name] = np.asarray(axes).flat[0].figure
        figures[name].set_size_inches(8, 6)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        from training.figures import accuracy_against_figure

        # mean(s), std(s), then the --search settings
        names = sorted(complete[0].params, key=lambda k: (not k.startswith("mean"), not k.startswith("std"), k))
        figure = figures["accuracy_vs_normalization"] = accuracy_against_figure(
            {k: [t.params[k] for t in complete] for k in names}, [t.value for t in complete],
            [t.value <= collapse_threshold for t in complete], collapse_threshold,
            f"study {study.study_name}: {len(complete)} complete trials")
        for axes, name in zip(figure.axes, names):
            if SEARCHABLE.get(name, (0, 0, ""))[2] == "log":  # searched on a log scale, as the stds
                axes.set_xscale("log")
    return figures
