"""The markdown tables: per split and embedding size one row per loss, one column per
metric, mean ± 95% CI over seeds, the best method and its statistical ties in bold."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .statistics import (
    ALPHA,
    CONFIDENCE,
    UNTRAINED,
    Comparison,
    Group,
    Rank,
    compare_all,
    rank_metric,
    seed_ranks,
    seed_values,
)

#: column order and short names of the tables' metrics (recall_at_K are added in K order)
METRIC_NAMES = {
    "mean_average_precision_at_r": "MAP@R",
    "r_precision": "R-Prec",
    "precision_at_1": "P@1",
    "NMI": "NMI",
    "AMI": "AMI",
    "F1": "F1",
}
#: marks a ± 0.00: every seed gave the same value
SEEDS_AGREE = "†"


def metric_columns(metrics: Iterable[str]) -> list[str]:
    """Recall@K in K order, then :data:`METRIC_NAMES` in its order, then the rest."""
    metrics = set(metrics)
    recalls = sorted(
        (m for m in metrics if re.fullmatch(r"recall_at_\d+", m)), key=lambda m: int(m[10:])
    )
    named = [m for m in METRIC_NAMES if m in metrics]
    rest = sorted(metrics - set(recalls) - set(named))
    return recalls + named + rest


def short_name(metric: str) -> str:
    """``recall_at_4`` -> ``R@4``, ``mean_average_precision_at_r`` -> ``MAP@R``, ..."""
    if metric.startswith("recall_at_"):
        return f"R@{metric[10:]}"
    return METRIC_NAMES.get(metric, metric)


def report_split(splits: Iterable[str]) -> list[str]:
    """The evaluated splits shown in tables: every split but the validation split."""
    return [s for s in sorted(set(splits)) if s != "val"] or sorted(set(splits))


def format_cell(mean: float, half: float) -> str:
    """A fraction as ``mean ± half`` in %; a half-width that prints as 0.00 gets
    :data:`SEEDS_AGREE`; one seed (nan half-width): the value alone."""
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{100 * mean:.2f}"
    mark = SEEDS_AGREE if round(100 * half, 2) == 0 else ""
    return f"{100 * mean:.2f} ± {100 * half:.2f}{mark}"


def format_rank(rank: Rank | None) -> str:
    """Mean rank over seeds with the lowest and highest rank, e.g. ``2.3 (1–4)``."""
    if rank is None or not rank.n:
        return "–"
    if rank.n == 1:
        return f"{rank.ranks[0]:g}"
    return f"{rank.mean:.1f} ({rank.low:g}–{rank.high:g})"


def header_text(n_seeds: Sequence[int], ranked_on: str | None) -> list[str]:
    """The paragraph under the title: how to read the numbers, the bold and the ranks."""
    ns = "/".join(map(str, n_seeds)) or "0"
    level = f"{100 * ALPHA:g}%"
    lines = [
        f"Mean ± {100 * CONFIDENCE:g}% confidence interval over seeds (t-distribution with "
        f"n − 1 degrees of freedom, n = {ns}), in %.",
        "",
        f"- **Bold**: in each column, the trained method with the highest mean and every "
        f"trained method not significantly different from it: two-sided paired t-test over "
        f"the seeds both ran (seed s of every method starts from the same network), level "
        f"{level}, not corrected for the several comparisons; `comparisons.csv` holds each "
        f"t and p. Bold methods are not shown to differ from the best, which does not show "
        f"them equal: with {min(n_seeds, default=0)} seeds only large differences are "
        f"detected.",
    ]
    if 1 in n_seeds:
        lines.append(
            "- n = 1: one seed gives no interval and no test; there bold marks the highest "
            "value only, which another seed may not confirm."
        )
    lines.append(
        f"- ± 0.00{SEEDS_AGREE}: every seed gave the same value to 0.01 points. The seeds "
        f"agreed; the mean is not known to 0.01 points (a t-interval cannot show variation "
        f"the seeds did not show)."
    )
    if ranked_on is not None:
        lines.append(
            f"- rank: the rank of {short_name(ranked_on)} among the trained methods in each "
            f"seed (1 = best; equal values share a rank), mean over seeds (lowest–highest)."
        )
    lines.append(
        f"- `{UNTRAINED}`: the network before training (the same for every method of a "
        f"seed), neither tested nor ranked. Rows marked *paper* are the numbers the papers "
        f"report on their own protocol (backbone, image size, data), with their source: "
        f"they are context, not a comparison under identical settings."
    )
    return lines


def _table_row(
    loss: str,
    metrics: Sequence[str],
    cells: Mapping[tuple, Mapping],
    marks: Mapping[str, Comparison],
    rank: Rank | None,
) -> str:
    out, n = [], 0
    for m in metrics:
        c = cells.get((loss, m))
        if c is None:
            out.append("–")
            continue
        n = max(n, c["n"])
        text = format_cell(c["mean"], c["ci95"])
        if loss != UNTRAINED and m in marks and marks[m].marked:
            text = f"**{text}**"
        out.append(text)
    return f"| {loss} | " + " | ".join(out) + f" | {format_rank(rank)} | {n} |"


def _paper_rows(
    names: set[str], metrics: Sequence[str], papers: Sequence[Mapping], shown: set
) -> list[str]:
    """Rows of the papers' numbers for the methods in ``names`` not shown yet."""
    out = []
    for method, source in sorted({(p["method"], p["source"]) for p in papers}):
        if method not in names or (method, source) in shown:
            continue
        shown.add((method, source))
        values = {
            p["metric"]: p["value"]
            for p in papers
            if (p["method"], p["source"]) == (method, source)
        }
        text = [f"{values[m]:.1f}" if m in values else "–" for m in metrics]
        out.append(f"| *paper*: {method} ({source}) | " + " | ".join(text) + " | – | – |")
    return out


def _table_section(
    rows: Sequence[Mapping[str, Any]],
    dataset: str,
    split: str,
    dim: int,
    comparisons: Mapping[Group, Mapping[str, Comparison]],
    ranks: Mapping[str, Rank],
    ranked_on: str | None,
    papers: Sequence[Mapping[str, Any]],
    loss_classes: Mapping[str, str],
) -> list[str]:
    """One markdown table: the losses of one split and embedding size."""
    cells = {
        (r["loss"], r["metric"]): r
        for r in rows
        if r["split"] == split
        and r["embedding_size"] == dim
        and (r["stage"] == "trained" or r["loss"] == UNTRAINED)
    }
    if not cells:
        return []
    losses = sorted({loss for loss, _ in cells if loss != UNTRAINED})
    metrics = metric_columns(m for _, m in cells)
    rank_head = f"rank ({short_name(ranked_on)})" if ranked_on else "rank"
    lines = ["", f"## {split} split, embedding size {dim}", ""]
    lines.append(
        "| method | " + " | ".join(short_name(m) for m in metrics) + f" | {rank_head} | seeds |"
    )
    lines.append("|---" * (len(metrics) + 3) + "|")
    shown: set[tuple[str, str]] = set()

    def marks(loss: str) -> dict[str, Comparison]:
        return {
            m: comparisons[(dataset, split, dim, m)][loss]
            for m in metrics
            if loss in comparisons.get((dataset, split, dim, m), {})
        }

    if any(loss == UNTRAINED for loss, _ in cells):
        lines.append(_table_row(UNTRAINED, metrics, cells, {}, None))
    for loss in losses:
        lines.append(_table_row(loss, metrics, cells, marks(loss), ranks.get(loss)))
        lines += _paper_rows({loss, loss_classes.get(loss, loss)}, metrics, papers, shown)
    lines += _paper_rows({p["method"] for p in papers}, metrics, papers, shown)
    return lines


def dataset_table(
    dataset: str,
    summary: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    paper: Sequence[Mapping[str, Any]] = (),
    loss_classes: Mapping[str, str] | None = None,
) -> str:
    """Markdown: per split and embedding size, one row per loss, one column per metric.

    ``summary`` are :func:`~.statistics.summarise`'s rows, ``rows`` the per-run rows they
    were made from (for the paired tests and the ranks). The papers' rows (``paper``, from
    :func:`~.papers.read_paper_numbers`) follow the row of the loss whose label or class
    name is their ``method``; the others close the table.
    """
    summary = [r for r in summary if r["dataset"] == dataset]
    rows = [r for r in rows if r["dataset"] == dataset]
    comparisons = compare_all(rows)
    values = seed_values(rows)
    ranked_on = rank_metric(r["metric"] for r in rows if r["stage"] == "trained")
    n_seeds = sorted({r["n"] for r in summary if r["stage"] == "trained"})
    lines = [f"# {dataset}", "", *header_text(n_seeds, ranked_on)]
    for split in report_split(r["split"] for r in summary):
        for dim in sorted({r["embedding_size"] for r in summary}):
            papers = [
                p for p in paper if p["dataset"] == dataset.lower() and p["embedding_size"] == dim
            ]
            ranks = seed_ranks(values.get((dataset, split, dim, ranked_on), {}))
            lines += _table_section(
                summary,
                dataset,
                split,
                dim,
                comparisons,
                ranks,
                ranked_on,
                papers,
                loss_classes or {},
            )
    return "\n".join(lines) + "\n"
