"""The table's note on tuned rows: how each row's hyperparameters were chosen."""

from __future__ import annotations

from collections.abc import Iterable

from .discovery import Run


def _value(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tuning_notes(runs: Iterable[Run]) -> list[str]:
    """Markdown lines: for each tuned (or fold-ensemble) row, its study, budget, folds,
    space, chosen values and validation score; untuned rows use the grid's values."""
    seen: dict[str, dict] = {}
    for run in sorted(runs, key=lambda r: r.loss):
        record = run.config.get("tuning")
        if record and "study" in record and run.loss not in seen:
            seen[run.loss] = record
    if not seen:
        return []
    lines = [
        "",
        "## How the tuned rows were chosen",
        "",
        "Rows without a suffix use the grid's values (the papers' defaults). `+tuned`: the "
        "best parameters of an Optuna study on class-disjoint cross-validation folds of the "
        "training classes (the test split unread), retrained on all training classes for "
        "every seed. `+ensemble`: the best trial's fold models, each L2-normalised and "
        "concatenated (one ensemble, no seeds). Every study had the same budget.",
        "",
        "| row | study budget | folds | search space | chosen | mean validation score |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in seen.items():
        budget = (
            f"{r['budget']} trials ({r['complete']} complete, {r['pruned']} pruned), {r['sampler']}"
        )
        space = "; ".join(f"`{k.split('.', 1)[1]}` {v}" for k, v in r["space"].items())
        chosen = ", ".join(f"{k.rsplit('.', 1)[1]} = {_value(v)}" for k, v in r["params"].items())
        what = f"{label} ({r['ensemble']})" if "ensemble" in r else label
        lines.append(
            f"| {what} | {budget} | {r['folds']} | {space} | {chosen} | "
            f"{r['metric']} {r['value']:.4f} |"
        )
    return lines
