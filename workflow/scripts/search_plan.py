"""A grid's search block: which studies to run and which tuned cells they feed.

A grid config (``config/tuned.yaml``) with a ``search`` block tunes the listed
losses (``search.tune``; default: every loss of the grid) on every data set and embedding
size: one study per data set x loss x size, whose experiment is the loss's cell at seed
``search.seed``. Beside each untuned cell ``<label>`` the grid then has

- ``<label>+tuned``: the same cell with the study's best parameters, retrained on all
  training classes for every seed of the grid and tested once;
- ``<label>+ensemble`` (``search.ensemble``, default true): the best trial's ``k`` fold
  models, concatenated, tested once (seed 0 only: it is one ensemble); its run folder and
  table section are those of its own size, ``k x d`` (``<label>+ensemble/<k*d>/seed0``).

Study folders: ``<runs_dir>/<dataset>/<label>/<dim>/search/`` (the journal file and the
trials' fold run folders); reports: ``<results_dir>/<dataset>/search/<label>/<dim>/``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pml_plugins.experiment.files import atomic_write
from pml_plugins.experiment.search.space import SearchSpaceError, check_spaces
from pml_plugins.experiment.search.spec import validate

TUNED, ENSEMBLE = "+tuned", "+ensemble"
#: keys of the grid's search block copied into every study's spec
SPEC_KEYS = (
    "folds",
    "fold_seed",
    "trials",
    "metric",
    "seed",
    "startup_trials",
    "pruner",
    "pruner_startup_trials",
    "storage",
)


def load_spaces(block: Mapping[str, Any]) -> dict[str, Any]:
    """The search spaces: ``search.spaces`` inline, or the YAML file it names."""
    spaces = block.get("spaces")
    if isinstance(spaces, str):
        path = Path(spaces)
        if not path.is_file():
            raise SearchSpaceError(
                f"search.spaces: file {spaces!r} not found (relative paths start at the "
                f"working directory)"
            )
        spaces = yaml.safe_load(path.read_text())
    check_spaces(spaces)
    return spaces


def tuned_labels(grid: Mapping[str, Any]) -> list[str]:
    block = grid["search"]
    labels = block.get("tune") or list(grid["losses"])
    unknown = [x for x in labels if x not in grid["losses"]]
    if unknown:
        raise SearchSpaceError(
            f"search.tune: {', '.join(unknown)} not among the grid's losses "
            f"({', '.join(grid['losses'])})"
        )
    return labels


def expand(grid: Mapping[str, Any], cells: Mapping[str, dict[str, Any]]) -> tuple[dict, dict]:
    """``(tuned cells, study specs)`` of a grid with a ``search`` block.

    ``cells`` are the grid's untuned cells (:func:`grid.expand`). A tuned cell carries
    ``tuning: {from: <study path>}`` until the workflow writes it with the study's best
    parameters; an ensemble cell also ``ensemble: true``.
    """
    block = grid["search"]
    runs_dir = grid.get("runs_dir", "runs")
    spaces = load_spaces(block)
    seed = block.get("seed", 0)
    tuned: dict[str, dict[str, Any]] = {}
    studies: dict[str, dict[str, Any]] = {}
    labels = tuned_labels(grid)
    for cell in cells.values():
        label, dataset = cell["name"], cell["dataset"]["name"]
        dim, cell_seed = cell["model"]["embedding_size"], cell["seed"]
        if label not in labels:
            continue
        study = f"{dataset}/{label}/{dim}"
        if study not in studies:
            experiment = copy.deepcopy(cell)
            experiment["seed"] = seed
            experiment.pop("output", None)
            studies[study] = {
                "study": study,
                "experiment": experiment,
                "spaces": spaces,
                **{k: block[k] for k in SPEC_KEYS if k in block},
                "output": f"{runs_dir}/{study}/search",
            }
        # the ensemble of k fold models of d dimensions: a k*d-dimensional row
        variants = [(TUNED, dim, {})]
        if block.get("ensemble", True) and cell_seed == seed:
            variants.append((ENSEMBLE, block.get("folds", 4) * dim, {"ensemble": True}))
        for suffix, size, extra in variants:
            new_path = f"{dataset}/{label}{suffix}/{size}/seed{cell_seed}"
            new = copy.deepcopy(cell)
            new["model"]["embedding_size"] = size
            new["name"] = f"{label}{suffix}"
            new["output"] = f"{runs_dir}/{new_path}"
            new["tuning"] = {"from": study, **extra}
            tuned[new_path] = new
    return tuned, studies


def write_spec(spec: Mapping[str, Any], path: str | Path) -> None:
    """Write a study's spec (validated) as YAML, atomically."""
    validate(spec, where=f"search spec {path}")
    atomic_write(path, yaml.safe_dump(dict(spec), sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    """``python workflow/scripts/search_plan.py SPEC.yaml SPEC_JSON``: the workflow's
    first step of a search, :func:`write_spec` of a spec given as JSON."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(
            "usage: python workflow/scripts/search_plan.py SPEC.yaml SPEC_JSON",
            file=sys.stderr,
        )
        return 2
    write_spec(json.loads(args[1]), args[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
