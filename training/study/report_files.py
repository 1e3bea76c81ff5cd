"""A study's results as files for the docs (summary.md, trials.md, contour.png, accuracy_vs_normalization.png),
read from the Optuna storage alone, so a running study works too."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from training.study.report import study_figures, summarize


def summary_markdown(study: optuna.Study, one_class: float, margin: float) -> str:
    summary = summarize(study, one_class, margin)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    val, test = summary["val_accuracy"], summary["test_accuracy"]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in complete]
    lines = [
        f"| trials complete | collapsed (val acc <= {summary['collapse_threshold']:.3f}) | diverged | "
        "val accuracy median / sd / min / max | test accuracy median / sd / min / max | median trial (s) |",
        "|---:|---:|---:|---|---|---:|",
        f"| {summary['trials_complete']} | {summary['trials_collapsed']} | {summary['trials_diverged']} | "
        + " / ".join(f"{val[k]:.4f}" for k in ("median", "sd", "min", "max")) + " | "
        + " / ".join(f"{test[k]:.4f}" for k in ("median", "sd", "min", "max")) + f" | {np.median(durations):.0f} |",
    ]
    if enqueued := [t for t in complete if t.system_attrs.get("fixed_params")]:
        lines += ["", "| enqueued normalization (mean / std) | val accuracy | rank among complete trials |",
                  "|---|---:|---:|", *(f"| {t.params['mean']:g} / {t.params['std']:g} | {t.value:.4f} | "  # ties share the better rank
                                      f"{1 + sum(c.value > t.value for c in complete)} of {len(complete)} |" for t in enqueued)]
    return "\n".join(lines) + "\n"


def trials_markdown(study: optuna.Study) -> str:
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    lines = ["| trial | mean | std | val accuracy | test accuracy |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {t.number} | {t.params['mean']:.3f} | {t.params['std']:.3f} | {t.value:.4f} | "
              f"{t.user_attrs.get('test_accuracy', float('nan')):.4f} |" for t in complete]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_name")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one-class", type=float, default=0.1,
                        help="accuracy of predicting the most frequent validation class (0.1 on balanced splits)")
    parser.add_argument("--collapse-margin", type=float, default=0.02)
    args = parser.parse_args()
    study = optuna.load_study(study_name=args.study_name, storage=args.storage)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summary_markdown(study, args.one_class, args.collapse_margin)
    (args.out / "summary.md").write_text(summary)
    (args.out / "trials.md").write_text(trials_markdown(study))
    figures = study_figures(study, args.one_class + args.collapse_margin)  # those the parent run logs
    for name in ("contour", "accuracy_vs_normalization"):
        if name in figures:
            figures[name].savefig(args.out / f"{name}.png", dpi=80)
    print(summary)


if __name__ == "__main__":
    main()
