"""What a finished search hands on: the best parameters, the history, Optuna's plots.

``pml-plugins search-report SPEC --out DIR`` writes

    best.json                 the chosen parameters, their mean validation score, the budget,
                              the folds' classes, the space, and the best trial's fold run
                              folders (the fold ensemble's members)
    trials.csv                one row per trial: number, state, value, per-fold values, params
    optimization_history.png  Optuna's optimisation history (validation score per trial)
    param_importances.png     Optuna's parameter importances (fANOVA)

The best trial is the best complete one among the first ``trials`` counted (complete or
pruned) trials, by trial number, so that every method is judged on the same budget even
where concurrent workers ran a trial more.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import data as data_mod
from .. import files, folds
from .space import apply, describe
from .spec import SearchSpec, SearchSpecError
from .worker import FOLDER_ATTR, open_study


def best_trial(spec: SearchSpec, study: optuna.Study) -> tuple[FrozenTrial, list[FrozenTrial]]:
    """The best complete trial, and the budget: the first ``spec.trials`` trials that ended
    complete or pruned."""
    ended = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    trials = sorted(ended, key=lambda t: t.number)[: spec.trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(trials) < spec.trials or not complete:
        raise SearchSpecError(
            f"study {spec.study!r} has {len(trials)} of its {spec.trials} trials ended "
            f"({len(complete)} complete); run `pml-plugins search` on it until the budget is met"
        )
    return max(complete, key=lambda t: (t.value, -t.number)), trials


def fold_assignment(spec: SearchSpec) -> list[list[int]]:
    """Each fold's validation classes, by the data set's own class ids (the embedded sets:
    the digits)."""
    with folds.search_only():
        splits = data_mod.load_splits(spec.fold_config({}, 0, spec.output)["dataset"])
    # embedded sets have no class_ids: their training digits are 0..C-1 either way
    ids = [
        s.class_ids if hasattr(s, "class_ids") else data_mod.labels_of(s) for s in splits.values()
    ]
    return folds.assignment(np.unique(np.concatenate(ids)), spec.folds, spec.raw["fold_seed"])


def summary(spec: SearchSpec, study: optuna.Study) -> dict[str, Any]:
    best, trials = best_trial(spec, study)
    folder = spec.output / "trials" / best.user_attrs[FOLDER_ATTR]
    states = [t.state.name.lower() for t in trials]
    return {
        "study": spec.study,
        "metric": spec.raw["metric"],
        "value": best.value,
        "params": best.params,
        "trial": best.number,
        "budget": spec.trials,
        "complete": states.count("complete"),
        "pruned": states.count("pruned"),
        "folds": spec.folds,
        "fold_seed": spec.raw["fold_seed"],
        "fold_classes": fold_assignment(spec),
        "fold_values": [best.user_attrs.get(f"fold{i}") for i in range(spec.folds)],
        "fold_runs": [str(folder / f"fold{i}") for i in range(spec.folds)],
        "space": describe(spec.space),
        "sampler": f"TPE (seed {spec.raw['seed']}, {spec.raw['startup_trials']} random trials first)",
        "pruner": spec.raw["pruner"],
    }


def write_trials_csv(spec: SearchSpec, study: optuna.Study, path: Path) -> None:
    names = list(spec.space)
    header = ["number", "state", "value", *[f"fold{i}" for i in range(spec.folds)], *names]
    rows = []
    for t in sorted(study.get_trials(), key=lambda t: t.number):
        value = "" if t.value is None or math.isnan(t.value) else f"{t.value:.6f}"
        folds_ = [t.user_attrs.get(f"fold{i}", "") for i in range(spec.folds)]
        rows.append(
            [t.number, t.state.name.lower(), value, *folds_, *[t.params.get(n, "") for n in names]]
        )
    with files.atomic_open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_plots(spec: SearchSpec, study: optuna.Study, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    label = METRIC_LABELS.get(spec.raw["metric"], spec.raw["metric"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = ovm.plot_optimization_history(study, target_name=f"mean validation {label}")
        _title(
            ax, f"{spec.study}\nsearch history ({spec.folds}-fold CV, TPE); pruned trials not shown"
        )
        ax.legend(loc="best", fontsize=8)
        _save(ax, out / "optimization_history.png", (7, 4.2))
        title = (
            f"{spec.study}\nimportance of each parameter for the mean validation {label} (fANOVA)"
        )
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=spec.raw["seed"])
        try:
            ax = ovm.plot_param_importances(study, evaluator=evaluator)
            ax.get_legend().remove()
        except (RuntimeError, ValueError) as exc:  # e.g. every complete trial scored the same
            import matplotlib.pyplot as plt

            ax = plt.figure().add_subplot()
            ax.axis("off")
            ax.text(0.5, 0.5, f"no importances: {exc}", ha="center", va="center", wrap=True)
        _title(ax, title)
        _save(ax, out / "param_importances.png", (7, 1.6 + 0.5 * len(spec.space)))


METRIC_LABELS = {"mean_average_precision_at_r": "MAP@R", "precision_at_1": "P@1"}


def _title(ax, text: str) -> None:
    """``text`` as the figure's title, left-aligned over the whole figure (an axes title
    starts at the axes and was cut off right of long parameter names)."""
    for loc in ("left", "center", "right"):
        ax.set_title("", loc=loc)
    ax.figure.suptitle(text, x=0.01, ha="left", fontsize=9)


def _save(ax, path: Path, size: tuple[float, float]) -> None:
    import matplotlib.pyplot as plt

    ax.figure.set_size_inches(*size)
    ax.figure.tight_layout(rect=(0, 0, 1, 1 - 0.45 / size[1]))
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)


def write_report(spec: SearchSpec, out: str | Path) -> dict[str, Any]:
    """best.json, trials.csv and the two plots of ``spec``'s finished study into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(spec, create=False)
    best = summary(spec, study)
    write_trials_csv(spec, study, out / "trials.csv")
    write_plots(spec, study, out)
    files.write_json(out / "best.json", best)
    return best


def tuning_record(best: dict[str, Any]) -> dict[str, Any]:
    """What a tuned run's config says about where its hyperparameters came from."""
    keys = ("study", "metric", "value", "trial", "budget", "complete", "pruned", "folds")
    return {k: best[k] for k in (*keys, "params", "space", "sampler")}


def tuned_config(config: dict[str, Any], best_json: str | Path) -> dict[str, Any]:
    """``config`` with the best parameters of ``best_json`` and its ``tuning`` record."""
    best = files.read_json(Path(best_json), "run `pml-plugins search-report` again")
    tuned = apply(config, best["params"])
    tuned["tuning"] = tuning_record(best)
    return tuned
