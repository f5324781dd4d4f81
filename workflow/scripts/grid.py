"""A grid of experiments: data sets x losses x embedding sizes x seeds, one config per cell.

The Snakemake workflow (``workflow/Snakefile``) reads a grid config and calls
:func:`cells_and_studies` (:func:`validate_grid` and the search's studies) at load time,
before any job starts; the tests call :func:`expand`.
A grid config::

    runs_dir: runs          # run folders: <runs_dir>/<dataset>/<loss label>/<dim>/seed<k>
    results_dir: results
    container: null         # image for --sdm apptainer, e.g. "docker://..."
    base: {...}             # an experiment config without `loss`: the defaults of every cell
    datasets:               # name -> fields of the `dataset` block (+ `overrides`: experiment keys)
      mnist_subset: {}
      cub200: {root: data/CUB_200_2011, overrides: {batch_size: 128}}
    losses:                 # label -> experiment keys of this loss (loss required)
      NRA: {loss: {NRALoss: {alpha: 4}}}
    embedding_sizes: [64, 128]
    seeds: [0, 1, 2]

Each cell is the deep merge of ``base``, ``{"dataset": datasets[d]}``, ``datasets[d]
["overrides"]`` and ``losses[label]``, in that order, then ``model.embedding_size = dim``,
``seed = s``, ``dataset.name = d``, ``name = label`` and ``output`` = the cell's run folder.
Mappings merge key by key, everything else is replaced; a component spec
(``{Name: {kwargs}}``) is one value and is replaced as a whole, so a loss entry's
``sampler: {RepresentativeSampler: {...}}`` replaces the base's ``MPerClassSampler``
instead of being merged with it, and ``miner: null`` removes the base's miner.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import search_plan
import yaml

from pml_plugins import registry
from pml_plugins.experiment import config as cfg_mod
from pml_plugins.experiment import run_folder
from pml_plugins.experiment.files import atomic_write
from pml_plugins.experiment.search.space import SearchSpaceError
from pml_plugins.experiment.search.spec import SearchSpecError
from pml_plugins.experiment.search.spec import validate as validate_search

#: the grid schema (``workflow/schemas/config.schema.yaml``)
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


class GridError(ValueError):
    """A grid config that cannot run; the message names the grid key, label or data set."""


# ---------------------------------------------------------------- expansion


def deep_merge(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge mappings left to right (later wins); component specs (``registry.is_spec``)
    are replaced whole."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            old = out.get(key)
            if (
                isinstance(old, Mapping)
                and isinstance(value, Mapping)
                and not registry.is_spec(old)
                and not registry.is_spec(value)
            ):
                out[key] = deep_merge(old, value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def cell_path(dataset: str, label: str, dim: int, seed: int) -> str:
    """The cell's run folder below ``runs_dir``: ``<dataset>/<label>/<dim>/seed<seed>``."""
    return f"{dataset}/{label}/{dim}/seed{seed}"


def expand(grid: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{cell path: experiment config}`` for every data set x loss x size x seed.

    The configs are the merged YAML of each cell (not yet validated, no defaults filled);
    see :func:`validate_grid`.
    """
    return _expand(grid)[0]


def studies(grid: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{study path: search spec}`` of a grid's ``search`` block (empty without one)."""
    return _expand(grid)[1]


def _expand(grid: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, dict]]:
    """``(cells, studies)``: the untuned cells expanded once, the search block on them."""
    runs_dir = grid.get("runs_dir", "runs")
    base = grid.get("base") or {}
    cells: dict[str, dict[str, Any]] = {}
    for dataset, dcfg in grid["datasets"].items():
        block = dict(dcfg or {})
        overrides = block.pop("overrides", None) or {}
        for label, lcfg in grid["losses"].items():
            for dim in grid["embedding_sizes"]:
                for seed in grid["seeds"]:
                    cfg = deep_merge(base, {"dataset": block}, overrides, lcfg)
                    cfg.setdefault("model", {})["embedding_size"] = dim
                    cfg["seed"] = seed
                    cfg["dataset"]["name"] = dataset
                    cfg["name"] = label
                    path = cell_path(dataset, label, dim, seed)
                    cfg["output"] = f"{runs_dir}/{path}"
                    cells[path] = cfg
    if not grid.get("search"):
        return cells, {}
    tuned, specs = search_plan.expand(grid, cells)
    return {**cells, **tuned}, specs


# ---------------------------------------------------------------- validation


def check_schema(grid: Any, schema_path: str | Path | None = None) -> None:
    """The grid's shape (keys, types); raises :class:`GridError` naming the key."""
    if not isinstance(grid, Mapping):
        raise GridError(f"a grid config is a mapping of keys, got {type(grid).__name__}")
    path = Path(schema_path or SCHEMA_PATH)
    if not path.is_file():
        raise GridError(f"grid schema {str(path)!r} not found; run from a source checkout")
    validator = jsonschema.Draft202012Validator(yaml.safe_load(path.read_text()))
    errors = list(validator.iter_errors(dict(grid)))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        where = ".".join(str(p) for p in best.absolute_path) or "<top level>"
        if best.validator == "additionalProperties":
            allowed = ", ".join(sorted(best.schema.get("properties", {})))
            raise GridError(f"grid config: {where}: {best.message}; allowed keys: {allowed}")
        raise GridError(f"grid config: {where}: {best.message}")


def _check_data_root(dataset: str, block: Mapping[str, Any]) -> None:
    """The data set's folder exists (and has the expected layout, where that is known)."""
    from pml_plugins.experiment import data as data_mod  # torch: only when data is checked

    if dataset in data_mod.EMBEDDED:
        return
    root = block.get("root")
    if not root and not block.get("download"):
        raise GridError(
            f"datasets.{dataset}.root: no data folder given for data set {dataset!r}; set "
            f"datasets.{dataset}.root, or run with --config check_data=false for a dry run"
        )
    if root and not block.get("download") and not Path(root).is_dir():
        raise GridError(
            f"datasets.{dataset}.root: folder {str(root)!r} for data set {dataset!r} does not "
            f"exist (relative paths start at the working directory {str(Path.cwd())!r}); "
            f"download the data there, or run with --config check_data=false for a dry run"
        )
    try:
        data_mod.check_root({"name": dataset, **block})
    except ModuleNotFoundError as exc:
        if exc.name != "pml_plugins.experiment.datasets":
            raise
    except FileNotFoundError as exc:
        raise GridError(f"datasets.{dataset}.root: data set {dataset!r}: {exc}") from None


def _check_embedded_sampler(path: str, label: str, cfg: Mapping[str, Any], cache: dict) -> None:
    """Batch / sampler vs the labels, for the embedded data sets (cheap to load)."""
    from pml_plugins.experiment import data as data_mod

    block = cfg["dataset"]
    if block["name"] not in data_mod.EMBEDDED or not cfg.get("sampler"):
        return
    key = json.dumps(block, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = data_mod.labels_of(data_mod.load_splits(block)["train"])
    try:
        cfg_mod.check_sampler(cfg, cache[key])
    except cfg_mod.ConfigError as exc:
        raise GridError(f"losses.{label} (cell {path}): {exc}") from None


def validate_grid(
    grid: Mapping[str, Any],
    check_data: bool | None = None,
    schema_path: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Check the grid and every cell; return ``{cell path: merged config}``.

    Raises :class:`GridError` naming the grid key, the loss label or the data set.
    ``check_data`` (default: the grid's ``check_data``, else True) checks that the data
    folders exist; switch it off to resolve a paper grid on a machine without the data.
    """
    return cells_and_studies(grid, check_data, schema_path)[0]


def cells_and_studies(
    grid: Mapping[str, Any],
    check_data: bool | None = None,
    schema_path: str | Path | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(validate_grid(grid), studies(grid))`` from one expansion: what the workflow reads
    at load time."""
    check_schema(grid, schema_path)
    known = cfg_mod.load_schema()["properties"]["dataset"]["properties"]["name"]["enum"]
    for dataset in grid["datasets"]:
        if dataset not in known:
            raise GridError(
                f"datasets.{dataset}: unknown data set {dataset!r}; use one of {', '.join(known)}"
            )
    if check_data is None:
        check_data = str(grid.get("check_data", True)).lower() == "true"
    if check_data:
        for dataset, block in grid["datasets"].items():
            block = {k: v for k, v in (block or {}).items() if k != "overrides"}
            _check_data_root(dataset, block)
    try:
        cells, specs = _expand(grid)
        for study, spec in specs.items():
            validate_search(spec, where=f"search (study {study})")
    except (SearchSpaceError, SearchSpecError) as exc:
        raise GridError(f"grid config: {exc}") from None
    labels_cache: dict = {}
    checked: set[tuple[str, str]] = set()
    for path, cfg in cells.items():
        label, dataset = cfg["name"], cfg["dataset"]["name"]
        # cells of one data set and loss differ only in embedding_size and seed, which
        # the grid schema has checked: validating one of them validates all
        if (dataset, label) in checked:
            continue
        checked.add((dataset, label))
        try:
            validated = cfg_mod.validate(cfg, check_data=False)
        except cfg_mod.ConfigError as exc:
            msg = str(exc).removeprefix("invalid config: ")
            raise GridError(
                f"losses.{label} on data set {dataset!r} (cell {path}): {msg}"
            ) from None
        device = validated["device"]
        if device.startswith("cuda:"):
            raise GridError(
                f"losses.{label} (cell {path}): device {device!r}: write 'cuda' in a grid; the "
                f"workflow gives each job its GPU (CUDA_VISIBLE_DEVICES)"
            )
        if check_data:
            _check_embedded_sampler(path, label, validated, labels_cache)
    return cells, specs


def uses_gpu(cell: Mapping[str, Any]) -> bool:
    """Whether a cell asks for a GPU (``device: cuda``)."""
    return str(cell.get("device", "auto")).startswith("cuda")


# ---------------------------------------------------------------- cell files


def write_cell(cell: Mapping[str, Any], path: str | Path) -> bool:
    """Write a cell's config; if its run folder holds a run of a different config, clear it.

    The training job calls ``pml-plugins train CELL --resume``, which continues from the
    run folder's checkpoints. Checkpoints of another config (the grid was edited; the keys
    that may differ are ``run_folder.ALLOWED_TO_DIFFER``, as for ``--resume``) must not be
    continued: their ``checkpoints/``, ``logs/``, metrics and run record are removed, so
    the run starts afresh. The folder is cleared under its lock: while a run still writes
    it, this raises ``run_folder.FolderLockedError`` and removes nothing. Returns True when
    an old run was cleared.
    """
    import shutil

    run_dir = Path(cell["output"])
    old_config = run_dir / "config.yaml"
    cleared = False
    if old_config.is_file():
        old = yaml.safe_load(old_config.read_text()) or {}
        new = cfg_mod.validate(cell, check_data=False)
        if run_folder.comparable(old) != run_folder.comparable(new):
            with run_folder.locked(run_dir):
                for name in ("checkpoints", "logs"):
                    shutil.rmtree(run_dir / name, ignore_errors=True)
                for name in (
                    "untrained_metrics.json",
                    "metrics.json",
                    "manifest.json",
                    run_folder.RECORD_NAME,
                    "config.yaml",
                ):
                    (run_dir / name).unlink(missing_ok=True)
            cleared = True
    atomic_write(path, yaml.safe_dump(dict(cell), sort_keys=False))
    return cleared


def main(argv: list[str] | None = None) -> int:
    """``python workflow/scripts/grid.py CELL.yaml CELL_JSON [BEST_JSON]``: the
    workflow's first step of a training job, :func:`write_cell` of a cell given as JSON
    (a tuned cell: with the best parameters of its study's ``best.json``)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print(
            "usage: python workflow/scripts/grid.py CELL.yaml CELL_JSON [BEST_JSON]",
            file=sys.stderr,
        )
        return 2
    cell = json.loads(args[1])
    if len(args) == 3 and args[2]:
        from pml_plugins.experiment.search.report import tuned_config

        cell = tuned_config(cell, args[2])
    try:
        cleared = write_cell(cell, args[0])
    except run_folder.FolderLockedError as exc:
        print(f"pml-plugins: error: {exc}", file=sys.stderr)
        return 2
    if cleared:
        print(f"{cell['output']}: the cell's config changed; the old run was removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
