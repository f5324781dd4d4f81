"""Collect run folders into tidy CSVs, tables (mean ± 95% CI over seeds, the best method
and its statistical ties marked) and figures.

``pml-plugins aggregate RUNS --out RESULTS [--paper-numbers CSV]`` writes::

    RESULTS/runs.csv         one row per run, split, stage and metric (tidy)
    RESULTS/summary.csv      mean, 95% CI half-width, std and n over seeds, per group
    RESULTS/comparisons.csv  each trained method against the best: paired t-test over seeds
    RESULTS/<dataset>/table.md                 per embedding size: one row per loss
    RESULTS/<dataset>/recall_at_k.png          Recall@K curves with 95% CIs
    RESULTS/<dataset>/heatmap_map_at_r.png     loss x embedding size, MAP@R
    RESULTS/<dataset>/heatmap_recall_at_1.png  loss x embedding size, R@1
    RESULTS/<dataset>/rank_map_at_r.png        rank of MAP@R per seed, mean and range
    RESULTS/<dataset>/training_curves.png      total loss per iteration (record-keeper logs)
    RESULTS/<dataset>/scatter_2d.png           L2-normalised test embeddings of the 2-D runs
    RESULTS/<dataset>/runs/<loss>/<dim>/seed<k>/{config.yaml,manifest.json}  provenance

The parts: :mod:`.discovery` (run folders, their metrics, loss histories and embeddings),
:mod:`.papers` (the papers' numbers), :mod:`.statistics` (intervals, paired tests, ranks),
:mod:`.tables`, :mod:`.figures` and :mod:`.provenance`. Confidence intervals use the
t-distribution with n - 1 degrees of freedom over the seeds (n = 1: no interval). A
method is marked with the best one when a two-sided paired t-test over the seeds finds no
difference at the 5% level. The untrained baseline row is the network before training
(same initialisation for every loss of a seed), averaged per seed, then over seeds.
Numbers are percentages in the tables and plots, fractions in the CSVs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .discovery import RUN_COLUMNS, embed_test_split, find_runs, metrics_problem, tidy_rows
from .figures import (
    on_unit_circle,
    plot_all,
    plot_heatmap,
    plot_ranks,
    plot_recall_curves,
    scatter_panels,
)
from .papers import canonical_metric, read_paper_numbers
from .provenance import copy_provenance, write_csv
from .statistics import (
    COMPARISON_COLUMNS,
    SUMMARY_COLUMNS,
    UNTRAINED,
    compare_all,
    compare_with_best,
    comparison_rows,
    paired_t_test,
    seed_ranks,
    summarise,
)
from .tables import dataset_table, report_split
from .tuning import tuning_notes

#: the names used through the package (its parts hold the rest)
__all__ = [
    "RUN_COLUMNS",
    "UNTRAINED",
    "aggregate",
    "canonical_metric",
    "compare_all",
    "compare_with_best",
    "embed_test_split",
    "find_runs",
    "metrics_problem",
    "on_unit_circle",
    "paired_t_test",
    "plot_heatmap",
    "plot_ranks",
    "plot_recall_curves",
    "read_paper_numbers",
    "scatter_panels",
    "seed_ranks",
    "summarise",
    "tidy_rows",
]


def aggregate(
    runs_dir: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    paper_numbers: str | Path | None = None,
    tables: bool = True,
) -> list[Path]:
    """Write the CSVs (and, with ``tables``, the tables, figures and each run's config and
    manifest); return their paths."""
    runs = find_runs(runs_dir)
    paper = read_paper_numbers(paper_numbers) if paper_numbers else []
    out_dir = Path(out_dir)
    rows = tidy_rows(runs)
    summary = summarise(rows)
    written = [
        write_csv(out_dir / "runs.csv", RUN_COLUMNS, rows),
        write_csv(out_dir / "summary.csv", SUMMARY_COLUMNS, summary),
        write_csv(
            out_dir / "comparisons.csv", COMPARISON_COLUMNS, comparison_rows(compare_all(rows))
        ),
    ]
    if not tables:
        return written
    classes = {r.loss: r.loss_class for r in runs}
    for dataset in sorted({r.dataset for r in runs}):
        folder = out_dir / dataset
        folder.mkdir(parents=True, exist_ok=True)
        table = folder / "table.md"
        notes = tuning_notes(r for r in runs if r.dataset == dataset)
        text = dataset_table(dataset, summary, rows, paper, classes)
        table.write_text(text + ("\n".join(notes) + "\n" if notes else ""))
        written.append(table)
        splits = report_split(r["split"] for r in summary if r["dataset"] == dataset)
        split = splits[-1] if "test" not in splits else "test"
        written.extend(plot_all(summary, rows, runs, dataset, split, folder))
        written.extend(copy_provenance([r for r in runs if r.dataset == dataset], folder))
    return written
