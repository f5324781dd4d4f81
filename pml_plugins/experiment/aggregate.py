"""Collect run folders into one tidy CSV, tables (mean ± 95% CI over seeds) and plots.

``pml-plugins aggregate RUNS --out RESULTS [--paper-numbers CSV]`` writes::

    RESULTS/runs.csv        one row per run, split, stage and metric (tidy)
    RESULTS/summary.csv     mean, 95% CI half-width and n over seeds, per group
    RESULTS/<dataset>/table.md                 per embedding size: one row per loss
    RESULTS/<dataset>/recall_at_k.png          Recall@K curves
    RESULTS/<dataset>/heatmap_map_at_r.png     loss x embedding size, MAP@R
    RESULTS/<dataset>/heatmap_recall_at_1.png  loss x embedding size, R@1
    RESULTS/<dataset>/training_curves.png      total loss per iteration (record-keeper logs)
    RESULTS/<dataset>/scatter_2d.png           test embeddings of the 2-D runs
    RESULTS/<dataset>/runs/<loss>/<dim>/seed<k>/{config.yaml,manifest.json}  provenance

A run folder is any folder below RUNS holding ``metrics.json`` and ``config.yaml``. Its
loss label is the folder name two levels up when the folder follows the workflow's
layout ``<dataset>/<label>/<dim>/seed<k>`` (as the grid names it), else the loss's class
name. Confidence intervals use the t-distribution with n - 1 degrees of freedom over the
seeds (n = 1: no interval). The untrained baseline row is the network before training
(same initialisation for every loss of a seed), averaged per seed, then over seeds.
Numbers are percentages in the tables and plots, fractions in the CSVs.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .. import registry
from .files import RunFileError, read_json

LOG = logging.getLogger("pml_plugins")

RUN_COLUMNS = ("dataset", "loss", "embedding_size", "seed", "split", "stage", "metric", "value")
SUMMARY_COLUMNS = (
    "dataset",
    "loss",
    "embedding_size",
    "split",
    "stage",
    "metric",
    "n",
    "mean",
    "ci95",
    "std",
)
PAPER_COLUMNS = ("method", "dataset", "embedding_size", "metric", "value", "source")
UNTRAINED = "untrained network"

#: column order and short names of the tables' metrics (recall_at_K are added in K order)
METRIC_NAMES = {
    "mean_average_precision_at_r": "MAP@R",
    "r_precision": "R-Prec",
    "precision_at_1": "P@1",
    "NMI": "NMI",
    "AMI": "AMI",
    "F1": "F1",
}
#: names the papers' CSV may use for our metrics (lower case, without spaces)
METRIC_ALIASES = {
    "map@r": "mean_average_precision_at_r",
    "map_at_r": "mean_average_precision_at_r",
    "mapr": "mean_average_precision_at_r",
    "r-precision": "r_precision",
    "r-prec": "r_precision",
    "rp": "r_precision",
    "p@1": "precision_at_1",
    "nmi": "NMI",
    "ami": "AMI",
    "f1": "F1",
}


@dataclass
class Run:
    """One finished run folder."""

    path: Path
    dataset: str
    loss: str
    loss_class: str
    embedding_size: int
    seed: int
    config: dict[str, Any]
    metrics: dict[str, Any]


# ---------------------------------------------------------------- reading


#: the blocks of ``metrics.json``: before training and after
STAGES = ("untrained", "trained")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics_problem(metrics: Any, required: Sequence[str] = ("trained",)) -> str | None:
    """Why a parsed ``metrics.json`` is not a run's metrics, or None where it is: the
    ``required`` stages are there, and each stage maps split -> metric name -> number."""
    if not isinstance(metrics, dict):
        return f"no {required[0]!r} block"
    for stage in required:
        if stage not in metrics:
            return f"no {stage!r} block"
    for stage in STAGES:
        block = metrics.get(stage)
        if block is None and stage not in required:
            continue
        if not isinstance(block, dict):
            return f"{stage!r} is {block!r}, not a mapping of splits"
        for split, values in block.items():
            if not isinstance(values, dict):
                return f"{stage}.{split} is {values!r}, not a mapping of metric names to numbers"
            for name, value in values.items():
                if not _is_number(value):
                    return f"{stage}.{split}.{name} is {value!r}, not a number"
    return None


def read_run_metrics(path: Path, runs_dir: Path) -> dict[str, Any]:
    """A run's ``metrics.json``; a :class:`RunFileError` naming the file where it is
    damaged or does not hold a run's metrics (a table without that run would be wrong)."""
    folder = path.parent
    fix = (
        f"evaluate that run again with `pml-plugins train {folder / 'config.yaml'} --out "
        f"{folder} --resume`, or move {folder} out of {runs_dir}"
    )
    metrics = read_json(path, fix=fix)
    problem = metrics_problem(metrics)
    if problem is not None:
        raise RunFileError(f"{path} does not hold a run's metrics ({problem}); {fix}")
    return metrics


def find_runs(runs_dir: str | Path) -> list[Run]:
    """Every finished run below ``runs_dir`` (one per dataset/loss/size/seed)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs folder {str(runs_dir)!r} does not exist")
    runs: dict[tuple, Run] = {}
    for metrics_path in sorted(runs_dir.rglob("metrics.json")):
        folder = metrics_path.parent
        config_path = folder / "config.yaml"
        if not config_path.is_file():
            LOG.warning("skipping %s: no config.yaml beside metrics.json", folder)
            continue
        with open(config_path) as f:
            config = yaml.safe_load(f)
        metrics = read_run_metrics(metrics_path, runs_dir)
        loss_class, _ = registry.parse_spec(config["loss"])
        dim = int(config["model"]["embedding_size"])
        seed = int(config["seed"])
        label = loss_class
        if folder.name == f"seed{seed}" and folder.parent.name == str(dim):
            label = folder.parent.parent.name
        run = Run(folder, config["dataset"]["name"], label, loss_class, dim, seed, config, metrics)
        key = (run.dataset, run.loss, run.embedding_size, run.seed)
        if key in runs:
            LOG.warning(
                "skipping %s: same data set, loss, size and seed as %s", folder, runs[key].path
            )
            continue
        runs[key] = run
    if not runs:
        raise FileNotFoundError(
            f"no finished runs (metrics.json + config.yaml) below {str(runs_dir)!r}"
        )
    return list(runs.values())


def tidy_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        for stage in ("untrained", "trained"):
            for split, values in (run.metrics.get(stage) or {}).items():
                for metric, value in sorted(values.items()):
                    rows.append(
                        {
                            "dataset": run.dataset,
                            "loss": run.loss,
                            "embedding_size": run.embedding_size,
                            "seed": run.seed,
                            "split": split,
                            "stage": stage,
                            "metric": metric,
                            "value": float(value),
                        }
                    )
    return rows


def read_paper_numbers(path: str | Path) -> list[dict[str, Any]]:
    """Rows of the papers' CSV, metric names mapped to ours, values in % (a file whose
    values are all <= 1 holds fractions)."""
    from .config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper numbers {str(path)!r} do not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PAPER_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(
                f"paper numbers {str(path)!r}: missing column(s) {', '.join(missing)}; "
                f"expected {','.join(PAPER_COLUMNS)}"
            )
        rows = []
        for i, row in enumerate(reader, start=2):
            try:
                value = float(row["value"])
                dim = int(row["embedding_size"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"paper numbers {str(path)!r}, line {i}: value and embedding_size must be "
                    f"numbers, got {row['value']!r}, {row['embedding_size']!r}"
                ) from None
            rows.append(
                {
                    "method": row["method"].strip(),
                    "dataset": row["dataset"].strip().lower(),
                    "embedding_size": dim,
                    "metric": canonical_metric(row["metric"]),
                    "value": value,
                    "source": row["source"].strip(),
                }
            )
    # one unit per file: fractions (every value <= 1) or percentages
    if rows and max(abs(r["value"]) for r in rows) <= 1:
        for r in rows:
            r["value"] *= 100
    return rows


def canonical_metric(name: str) -> str:
    """Our metric name for a paper's (``R@4`` -> ``recall_at_4``, ``MAP@R`` -> ...)."""
    key = name.strip().lower().replace(" ", "")
    match = re.fullmatch(r"(?:r|recall)(?:@|_at_)(\d+)", key)
    if match:
        return f"recall_at_{match.group(1)}"
    return METRIC_ALIASES.get(key, name.strip())


# ---------------------------------------------------------------- statistics


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean, half-width of the t confidence interval and sample std (nan for n < 2)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return mean, half, std


def summarise(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± CI over seeds per (dataset, loss, size, split, stage, metric).

    The untrained stage is also summarised as the loss ``UNTRAINED``: per seed the mean
    over that seed's runs (one initialisation), then over seeds.
    """
    groups: dict[tuple, list[float]] = defaultdict(list)
    untrained: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["dataset"], r["loss"], r["embedding_size"], r["split"], r["stage"], r["metric"])
        groups[key].append(r["value"])
        if r["stage"] == "untrained":
            ukey = (
                r["dataset"],
                UNTRAINED,
                r["embedding_size"],
                r["split"],
                "untrained",
                r["metric"],
            )
            untrained[ukey][r["seed"]].append(r["value"])
    for ukey, by_seed in untrained.items():
        groups[ukey] = [float(np.mean(v)) for _, v in sorted(by_seed.items())]
    out = []
    for key, values in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        mean, half, std = mean_ci(values)
        out.append(dict(zip(SUMMARY_COLUMNS, (*key, len(values), mean, half, std), strict=True)))
    return out


# ---------------------------------------------------------------- tables


def metric_columns(metrics: Iterable[str]) -> list[str]:
    metrics = set(metrics)
    recalls = sorted(
        (m for m in metrics if re.fullmatch(r"recall_at_\d+", m)), key=lambda m: int(m[10:])
    )
    named = [m for m in METRIC_NAMES if m in metrics]
    rest = sorted(metrics - set(recalls) - set(named))
    return recalls + named + rest


def short_name(metric: str) -> str:
    if metric.startswith("recall_at_"):
        return f"R@{metric[10:]}"
    return METRIC_NAMES.get(metric, metric)


def _fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * half:.2f}"


def report_split(splits: Iterable[str]) -> list[str]:
    """The evaluated splits shown in tables: every split but the validation split."""
    return [s for s in sorted(set(splits)) if s != "val"] or sorted(set(splits))


def _table_row(
    loss: str, metrics: Sequence[str], cells: Mapping[tuple, Mapping], best: Mapping
) -> str:
    out, n = [], 0
    for m in metrics:
        c = cells.get((loss, m))
        if c is None:
            out.append("–")
            continue
        n = max(n, c["n"])
        text = _fmt(c["mean"], c["ci95"])
        if loss != UNTRAINED and round(100 * c["mean"], 2) == best.get(m):
            text = f"**{text}**"
        out.append(text)
    return f"| {loss} | " + " | ".join(out) + f" | {n} |"


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
        out.append(f"| *paper*: {method} ({source}) | " + " | ".join(text) + " | – |")
    return out


def _table_section(
    rows: Sequence[Mapping[str, Any]],
    split: str,
    dim: int,
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
    best = {}
    for m in metrics:
        means = [cells[(loss, m)]["mean"] for loss in losses if (loss, m) in cells]
        means = [v for v in means if not math.isnan(v)]
        if means:
            best[m] = round(100 * max(means), 2)
    lines = ["", f"## {split} split, embedding size {dim}", ""]
    lines.append("| method | " + " | ".join(short_name(m) for m in metrics) + " | seeds |")
    lines.append("|---" * (len(metrics) + 2) + "|")
    shown: set[tuple[str, str]] = set()
    if any(loss == UNTRAINED for loss, _ in cells):
        lines.append(_table_row(UNTRAINED, metrics, cells, best))
    for loss in losses:
        lines.append(_table_row(loss, metrics, cells, best))
        lines += _paper_rows({loss, loss_classes.get(loss, loss)}, metrics, papers, shown)
    lines += _paper_rows({p["method"] for p in papers}, metrics, papers, shown)
    return lines


def dataset_table(
    dataset: str,
    summary: Sequence[Mapping[str, Any]],
    paper: Sequence[Mapping[str, Any]] = (),
    loss_classes: Mapping[str, str] | None = None,
) -> str:
    """Markdown: per split and embedding size, one row per loss, one column per metric.

    The papers' rows (``paper``, from :func:`read_paper_numbers`) follow the row of the
    loss whose label or class name is their ``method``; the others close the table.
    """
    rows = [r for r in summary if r["dataset"] == dataset]
    n_seeds = sorted({r["n"] for r in rows if r["stage"] == "trained"})
    lines = [f"# {dataset}", ""]
    lines.append(
        "Mean ± 95% confidence interval over seeds (t-distribution, n = "
        f"{'/'.join(map(str, n_seeds))}), in %; the best trained value of each column in bold. "
        f"`{UNTRAINED}`: the network before training. Rows marked *paper* are the numbers "
        "the papers report on their own protocol (backbone, image size, data), with their "
        "source: they are context, not a comparison under identical settings."
    )
    for split in report_split(r["split"] for r in rows):
        for dim in sorted({r["embedding_size"] for r in rows}):
            papers = [
                p for p in paper if p["dataset"] == dataset.lower() and p["embedding_size"] == dim
            ]
            lines += _table_section(rows, split, dim, papers, loss_classes or {})
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _summary_lookup(summary: Sequence[Mapping[str, Any]], dataset: str, split: str) -> dict:
    return {
        (r["loss"], r["embedding_size"], r["metric"]): r
        for r in summary
        if r["dataset"] == dataset
        and r["split"] == split
        and (r["stage"] == "trained" or r["loss"] == UNTRAINED)
    }


def plot_recall_curves(summary, dataset: str, split: str, path: Path) -> Path:
    plt = _pyplot()
    look = _summary_lookup(summary, dataset, split)
    dims = sorted({d for _, d, _ in look})
    losses = sorted({loss for loss, _, _ in look if loss != UNTRAINED})
    ks = sorted({int(m[10:]) for _, _, m in look if re.fullmatch(r"recall_at_\d+", m)})
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        for loss in [*losses, UNTRAINED]:
            pts = [
                (k, look[(loss, dim, f"recall_at_{k}")])
                for k in ks
                if (loss, dim, f"recall_at_{k}") in look
            ]
            if not pts:
                continue
            x = [k for k, _ in pts]
            y = [100 * r["mean"] for _, r in pts]
            err = [0 if math.isnan(r["ci95"]) else 100 * r["ci95"] for _, r in pts]
            style = {"linestyle": "--", "color": "grey"} if loss == UNTRAINED else {"marker": "o"}
            ax.errorbar(x, y, yerr=err, label=loss, capsize=3, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel(f"Recall@K (%), {split}")
        ax.set_title(f"{dataset}, embedding size {dim}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(summary, dataset: str, split: str, metric: str, path: Path) -> Path:
    plt = _pyplot()
    look = _summary_lookup(summary, dataset, split)
    dims = sorted({d for _, d, _ in look})
    losses = sorted({loss for loss, _, _ in look if loss != UNTRAINED})
    grid = np.full((len(losses), len(dims)), np.nan)
    for i, loss in enumerate(losses):
        for j, dim in enumerate(dims):
            r = look.get((loss, dim, metric))
            if r is not None:
                grid[i, j] = 100 * r["mean"]
    fig, ax = plt.subplots(figsize=(1.6 * len(dims) + 3, 0.45 * len(losses) + 1.6))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(dims)), [str(d) for d in dims])
    ax.set_yticks(range(len(losses)), losses)
    ax.set_xlabel("embedding size")
    ax.set_title(f"{dataset}: {short_name(metric)} (%), {split}, mean over seeds")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(losses)):
        for j in range(len(dims)):
            if np.isfinite(grid[i, j]):
                color = "black" if grid[i, j] > middle else "white"
                ax.text(
                    j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color=color, fontsize=8
                )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_loss_history(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """(iteration, total_loss) from the run's record-keeper CSV, if it has one."""
    path = run.path / "logs" / "loss_histories.csv"
    if not path.is_file():
        return None
    its, vals = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                its.append(float(row["~iteration~"]))
                vals.append(float(row["total_loss"]))
            except (KeyError, TypeError, ValueError):
                continue
    if not its:
        return None
    order = np.argsort(its)
    return np.asarray(its)[order], np.asarray(vals)[order]


def plot_training_curves(runs: Sequence[Run], dataset: str, path: Path) -> Path:
    plt = _pyplot()
    runs = [r for r in runs if r.dataset == dataset]
    losses = sorted({r.loss for r in runs})
    cols = min(3, len(losses))
    nrows = math.ceil(len(losses) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dims = sorted({r.embedding_size for r in runs})
    for ax, loss in zip(axes.flat, losses, strict=False):
        for run in sorted(
            (r for r in runs if r.loss == loss), key=lambda r: (r.embedding_size, r.seed)
        ):
            hist = read_loss_history(run)
            if hist is None:
                continue
            color = colors[dims.index(run.embedding_size) % len(colors)]
            first = run.seed == min(
                r.seed for r in runs if r.loss == loss and r.embedding_size == run.embedding_size
            )
            ax.plot(
                *hist,
                color=color,
                alpha=0.7,
                marker=".",
                label=f"d={run.embedding_size}" if first else None,
            )
        if not ax.lines:
            ax.text(0.5, 0.5, "no loss history", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(loss, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("total loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(losses) :]:
        ax.axis("off")
    fig.suptitle(f"{dataset}: training loss (record-keeper loss_histories, every seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def embed_test_split(run: Run, max_points: int = 3000) -> tuple[np.ndarray, np.ndarray] | None:
    """The trained model's raw (unnormalised) embeddings of the run's query split."""
    import torch

    from . import data as data_mod
    from . import run as run_mod

    ckpt = run.path / "checkpoints"
    epoch = run_mod.latest_checkpoint(ckpt) if ckpt.is_dir() else 0
    if not epoch:
        LOG.warning("no checkpoint in %s: no 2-D scatter for it", run.path)
        return None
    splits = data_mod.load_splits(run.config["dataset"])
    plan = data_mod.eval_plan(run.config["dataset"]["name"], splits)
    query = [q for q, _ in plan if q != "val"]
    dataset = splits[query[0] if query else plan[-1][0]]
    models = run_mod.build_models(run.config, dataset[0][0])
    for name, model in models.items():
        state = torch.load(ckpt / f"{name}_{epoch}.pth", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
    labels = data_mod.labels_of(dataset)
    idx = np.arange(len(labels))
    if len(idx) > max_points:
        idx = np.random.RandomState(0).choice(idx, max_points, replace=False)
    out = []
    with torch.no_grad():
        for start in range(0, len(idx), 256):
            batch = torch.stack([dataset[int(i)][0] for i in idx[start : start + 256]])
            out.append(models["embedder"](models["trunk"](batch)).numpy())
    return np.concatenate(out), labels[idx]


def plot_scatter_2d(runs: Sequence[Run], dataset: str, path: Path) -> Path | None:
    """One panel per loss: the 2-D test embeddings of its first seed, coloured by class."""
    chosen: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        if run.dataset == dataset and run.embedding_size == 2:
            chosen.setdefault(run.loss, run)
    panels = []
    for loss, run in sorted(chosen.items()):
        emb = embed_test_split(run)
        if emb is not None:
            panels.append((loss, run, *emb))
    if not chosen:
        return None
    plt = _pyplot()
    if not panels:  # 2-D runs without checkpoints (epochs: 0): say so, in the declared file
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, f"{dataset}: no checkpoints of 2-D runs", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 4 * nrows), squeeze=False)
    for ax, (loss, run, emb, labels) in zip(axes.flat, panels, strict=False):
        classes = np.unique(labels)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, c in enumerate(classes):
            sel = labels == c
            ax.scatter(
                emb[sel, 0], emb[sel, 1], s=3, alpha=0.6, color=cmap(i % cmap.N), label=str(c)
            )
        ax.set_title(f"{loss} (seed {run.seed})", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        if len(classes) <= 10:
            ax.legend(fontsize=6, markerscale=3, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{dataset}: 2-D embeddings of the test classes (unnormalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})
    tmp.replace(path)
    return path


def copy_provenance(runs: Sequence[Run], folder: Path) -> list[Path]:
    """Each run's merged config and manifest, under ``folder/runs/<loss>/<dim>/seed<k>/``,
    so that every number in the tables can be traced to the config and versions that made it."""
    written = []
    for run in runs:
        target = folder / "runs" / run.loss / str(run.embedding_size) / f"seed{run.seed}"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "manifest.json"):
            source = run.path / name
            if source.is_file():
                (target / name).write_bytes(source.read_bytes())
                written.append(target / name)
    return written


def aggregate(
    runs_dir: str | Path,
    out_dir: str | Path,
    paper_numbers: str | Path | None = None,
    tables: bool = True,
) -> list[Path]:
    """Write the CSVs (and, with ``tables``, the tables and plots); return their paths."""
    runs = find_runs(runs_dir)
    paper = read_paper_numbers(paper_numbers) if paper_numbers else []
    out_dir = Path(out_dir)
    rows = tidy_rows(runs)
    summary = summarise(rows)
    written = [
        _write_csv(out_dir / "runs.csv", RUN_COLUMNS, rows),
        _write_csv(out_dir / "summary.csv", SUMMARY_COLUMNS, summary),
    ]
    if not tables:
        return written
    classes = {r.loss: r.loss_class for r in runs}
    for dataset in sorted({r.dataset for r in runs}):
        folder = out_dir / dataset
        folder.mkdir(parents=True, exist_ok=True)
        table = folder / "table.md"
        table.write_text(dataset_table(dataset, summary, paper, classes))
        written.append(table)
        splits = report_split(r["split"] for r in summary if r["dataset"] == dataset)
        split = splits[-1] if "test" not in splits else "test"
        written.append(plot_recall_curves(summary, dataset, split, folder / "recall_at_k.png"))
        for metric, name in (
            ("mean_average_precision_at_r", "heatmap_map_at_r.png"),
            ("recall_at_1", "heatmap_recall_at_1.png"),
        ):
            written.append(plot_heatmap(summary, dataset, split, metric, folder / name))
        written.append(plot_training_curves(runs, dataset, folder / "training_curves.png"))
        written.extend(copy_provenance([r for r in runs if r.dataset == dataset], folder))
        scatter = plot_scatter_2d(runs, dataset, folder / "scatter_2d.png")
        if scatter is not None:
            written.append(scatter)
    return written
