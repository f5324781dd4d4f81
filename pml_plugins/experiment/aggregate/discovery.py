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
    """Every finished run below ``runs_dir`` (one per dataset/loss/size/seed).

    A run folder is any folder holding ``metrics.json`` and ``config.yaml``, except the
    folds of a hyperparameter search (``dataset.cross_validation``). Its loss
    label is the folder name two levels up when the folder follows the workflow's layout
    ``<dataset>/<label>/<dim>/seed<k>``, else the loss's class name.
    """
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
    """The rows of ``runs.csv`` (:data:`RUN_COLUMNS`): values as fractions."""
    rows = []
    for run in runs:
        for stage in STAGES:
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


def embed_test_split(run: Run, max_points: int = 3000) -> tuple[np.ndarray, np.ndarray] | None:
    """The trained model's raw (unnormalised) embeddings of the run's query split and their
    labels (at most ``max_points``, a fixed random subset); None without a checkpoint."""
    import torch

    from .. import data as data_mod
    from .. import run as run_mod

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
