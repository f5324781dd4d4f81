"""Finding run folders and reading what they hold: metrics, loss histories, embeddings."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ... import registry
from ..files import RunFileError, read_json

LOG = logging.getLogger("pml_plugins")

#: columns of ``runs.csv``: one row per run, split, stage and metric
RUN_COLUMNS = ("dataset", "loss", "embedding_size", "seed", "split", "stage", "metric", "value")
#: the blocks of ``metrics.json``: before training and after
STAGES = ("untrained", "trained")


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


def read_run_metrics(path: Path, runs_dir: str | Path) -> dict[str, Any]:
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


def run_folders(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The run folders: ``paths`` themselves where each holds ``metrics.json`` (the
    workflow's explicit list), else every folder below one given folder that does."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"runs folder {str(path)!r} does not exist")
    if len(paths) == 1 and not (paths[0] / "metrics.json").is_file():
        return [p.parent for p in sorted(paths[0].rglob("metrics.json"))]
    missing = [str(p) for p in paths if not (p / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} holds no metrics.json: not a finished run folder ({len(missing)} "
            f"of the {len(paths)} folders given); train it, or leave it out"
        )
    return sorted(paths)


def find_runs(runs: str | Path | Sequence[str | Path]) -> list[Run]:
    """Every finished run: the run folders given, or those below one folder (one per
    dataset/loss/size/seed).

    A run folder is any folder holding ``metrics.json`` and ``config.yaml``, except the
    folds of a hyperparameter search (``dataset.cross_validation``). Its loss
    label is the folder name two levels up when the folder follows the workflow's layout
    ``<dataset>/<label>/<dim>/seed<k>``, else the loss's class name.
    """
    runs_dir = Path(runs) if isinstance(runs, (str, Path)) else "the run folders given"
    folders = run_folders(runs)
    found: dict[tuple, Run] = {}
    for folder in folders:
        metrics_path = folder / "metrics.json"
        config_path = folder / "config.yaml"
        if not config_path.is_file():
            LOG.warning("skipping %s: no config.yaml beside metrics.json", folder)
            continue
        with open(config_path) as f:
            config = yaml.safe_load(f)
        if (config.get("dataset") or {}).get("cross_validation"):
            continue  # a fold of a hyperparameter search: validation only, not a result
        metrics = read_run_metrics(metrics_path, runs_dir)
        loss_class, _ = registry.parse_spec(config["loss"])
        dim = int(config["model"]["embedding_size"])
        seed = int(config["seed"])
        label = loss_class
        if folder.name == f"seed{seed}" and folder.parent.name == str(dim):
            label = folder.parent.parent.name
        run = Run(folder, config["dataset"]["name"], label, loss_class, dim, seed, config, metrics)
        key = (run.dataset, run.loss, run.embedding_size, run.seed)
        if key in found:
            LOG.warning(
                "skipping %s: same data set, loss, size and seed as %s", folder, found[key].path
            )
            continue
        found[key] = run
    if not found:
        raise FileNotFoundError(f"no finished runs (metrics.json + config.yaml) in {runs_dir}")
    return list(found.values())


def tidy_rows(runs: Iterable[Run]) -> list[dict[str, Any]]:
    """The rows of ``runs.csv`` (:data:`RUN_COLUMNS`): values as fractions."""
    rows = []
    for run in runs:
        key = (run.dataset, run.loss, run.embedding_size, run.seed)
        for stage in STAGES:
            for split, values in (run.metrics.get(stage) or {}).items():
                for metric, value in sorted(values.items()):
                    row = (*key, split, stage, metric, float(value))
                    rows.append(dict(zip(RUN_COLUMNS, row, strict=True)))
    return rows


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


def embed_test_split(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """The trained model's raw (unnormalised) embeddings of (up to 3000 of) the run's query
    split and their labels, as the run wrote them (``test_embeddings.npz``); None for a run
    without that file."""
    from .. import figure_points

    points = figure_points.read(run.path)
    if points is None:
        LOG.warning("no %s in %s: no 2-D scatter for it", figure_points.FILE_NAME, run.path)
    return points
