"""A search: which experiment, which space, which budget, where the study lives.

A search spec is a YAML file (the workflow writes one per data set x loss x embedding
size; ``pml-plugins search SPEC`` runs a worker on it)::

    study: mnist_subset/GradML/64      # the study's name in its storage
    experiment: {...}                   # an experiment config; its hyperparameters are searched
    spaces: {GradMLLoss: {k: {int: [1, 4]}, w: {float: [0.1, 10], log: true}}}
    folds: 4                            # class-disjoint folds of the training classes
    fold_seed: 0                        # the seed that assigns classes to folds
    trials: 20                          # the budget: trials that end complete or pruned
    metric: mean_average_precision_at_r # validation metric, averaged over the folds
    seed: 0                             # TPE's seed
    startup_trials: 8                   # random trials before TPE models the results
    pruner: median                      # stop a trial after a fold below the median; null: never
    storage: null                       # null: <output>/study.journal (Optuna's journal file);
                                        #   or an RDB URL (postgresql://..., sqlite:///...)
    output: runs/search/mnist_subset/GradML/64   # the trials' run folders, the study file
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import optuna.distributions as od
import yaml

from .. import config as cfg_mod
from .space import COMPONENT_KEYS, SearchSpaceError, apply, check_spaces, experiment_space

SCHEMA_PATH = Path(__file__).with_name("search.schema.yaml")
#: keys of a spec that may change between the workers of one study (where they run)
LOCAL_KEYS = ("storage", "output")


class SearchSpecError(ValueError):
    """A search spec that cannot run; the message names the key and the fix."""


@dataclass
class SearchSpec:
    """A validated search spec (see the module docstring)."""

    study: str
    experiment: dict[str, Any]
    space: dict[str, od.BaseDistribution]
    raw: dict[str, Any]

    @property
    def folds(self) -> int:
        return self.raw["folds"]

    @property
    def trials(self) -> int:
        return self.raw["trials"]

    @property
    def output(self) -> Path:
        return Path(self.raw["output"])

    def storage_url(self) -> str | None:
        return self.raw.get("storage")

    def fingerprint(self) -> str:
        """SHA-256 of everything that decides the search's results (not where it runs)."""
        kept = {k: v for k, v in self.raw.items() if k not in LOCAL_KEYS}
        kept["experiment"] = {k: v for k, v in self.experiment.items() if k != "output"}
        text = json.dumps(kept, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fold_config(self, params: Mapping[str, Any], fold: int, folder: Path) -> dict[str, Any]:
        """The experiment of one fold of a trial: ``params`` set, ``cross_validation``."""
        config = apply(self.experiment, params)
        config["dataset"] = {
            **config["dataset"],
            "cross_validation": {"folds": self.folds, "fold": fold, "seed": self.raw["fold_seed"]},
        }
        config["output"] = str(folder / f"fold{fold}")
        return config


@functools.cache
def _schema() -> dict[str, Any]:
    """The spec schema, parsed once (jsonschema only reads it)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def validate(raw: Any, where: str = "search spec") -> SearchSpec:
    """Check a spec mapping; raise :class:`SearchSpecError` naming the key."""
    if not isinstance(raw, Mapping):
        raise SearchSpecError(f"{where}: a mapping of keys, got {type(raw).__name__}")
    schema = _schema()
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(dict(raw)))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        key = ".".join(map(str, err.absolute_path)) or "<top level>"
        raise SearchSpecError(f"{where}: {key}: {err.message}")
    raw = copy.deepcopy(dict(raw))
    for key, sub in schema["properties"].items():
        if key not in raw and "default" in sub:
            raw[key] = copy.deepcopy(sub["default"])  # the cached schema stays as read
    try:
        experiment = cfg_mod.validate(raw["experiment"], check_data=False)
    except cfg_mod.ConfigError as exc:
        raise SearchSpecError(f"{where}: experiment: {exc}") from None
    if experiment["dataset"].get("cross_validation") or experiment["dataset"].get("val_classes"):
        raise SearchSpecError(
            f"{where}: experiment.dataset: leave out cross_validation and val_classes; "
            f"the search makes the folds (folds, fold_seed)"
        )
    try:
        space = experiment_space(experiment, check_spaces(raw["spaces"]))
    except SearchSpaceError as exc:
        raise SearchSpecError(f"{where}: {exc}") from None
    if not space:
        names = [k for k in COMPONENT_KEYS if experiment.get(k)]
        raise SearchSpecError(
            f"{where}: spaces: no entry for any component of the experiment "
            f"({', '.join(f'{k}: {cfg_mod.registry.parse_spec(experiment[k])[0]}' for k in names)}); "
            f"add one (docs/protocol.md, 'Adding a search space')"
        )
    if raw["startup_trials"] > raw["trials"]:
        raise SearchSpecError(
            f"{where}: startup_trials: {raw['startup_trials']} random trials exceed the budget "
            f"of {raw['trials']} trials; lower startup_trials"
        )
    return SearchSpec(raw["study"], experiment, space, raw)


def load(path: str | Path) -> SearchSpec:
    """Read and validate a spec file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SearchSpecError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise SearchSpecError(f"{path}: not valid YAML ({exc})") from None
    return validate(raw, where=str(path))
