"""The typed, read-only view of a validated experiment config (``config.ExperimentConfig``)."""

import copy
import dataclasses
from pathlib import Path

import grid
import numpy as np
import pytest
import yaml

from pml_plugins.experiment import config as cfg_mod

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
View = cfg_mod.ExperimentConfig


def _grid_cell() -> dict:
    cells = grid.expand(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    return next(iter(cells.values()))


def _check_view(validated: dict) -> None:
    before = copy.deepcopy(validated)
    view = View.from_dict(validated)
    assert validated == before, "from_dict must not change the dict"
    assert view.dataset_name == validated["dataset"]["name"]
    assert view.embedding_size == validated["model"]["embedding_size"]
    ev = validated["evaluation"]
    assert view.evaluation == cfg_mod.Evaluation(
        tuple(ev["k_values"]), ev["clustering"], ev["batch_size"], ev["interval"]
    )
    for field in dataclasses.fields(View):
        if field.name not in ("dataset_name", "embedding_size", "evaluation"):
            assert getattr(view, field.name) == validated.get(field.name), field.name
    # round trip through config.yaml: the dict written and read back gives the same view
    assert View.from_dict(yaml.safe_load(yaml.safe_dump(validated, sort_keys=False))) == view
    # read-only, and a copy: changing the dict does not change the view
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.epochs = 1
    validated["loss"] = "Changed"
    assert view.loss == before["loss"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_view_of_every_example(path):
    _check_view(cfg_mod.validate(yaml.safe_load(path.read_text()), check_data=False))


def test_view_of_a_grid_cell():
    cell = _grid_cell()
    _check_view(cfg_mod.validate(cell, check_data=False))
    view = View.from_dict(cfg_mod.validate(cell, check_data=False))
    assert (view.name, view.output) == (cell["name"], cell["output"])
    assert (view.seed, view.embedding_size) == (cell["seed"], cell["model"]["embedding_size"])


def test_view_of_a_missing_or_invalid_dict_raises():
    valid = cfg_mod.validate({"loss": "ContrastiveLoss"})
    for bad in (None, [], "loss: x"):
        with pytest.raises(cfg_mod.ConfigError, match="is a mapping of keys"):
            View.from_dict(bad)
    with pytest.raises(cfg_mod.ConfigError, match="'loss' is a required property"):
        View.from_dict({k: v for k, v in valid.items() if k != "loss"})
    with pytest.raises(cfg_mod.ConfigError, match="epochs: 'ten' is not of type"):
        View.from_dict({**valid, "epochs": "ten"})
    # not validated: the defaults are not filled in
    with pytest.raises(cfg_mod.ConfigError, match="key '.+' is missing: .* defaults filled in"):
        View.from_dict({"loss": "ContrastiveLoss"})
    no_interval = copy.deepcopy(valid)
    del no_interval["evaluation"]["interval"]
    with pytest.raises(cfg_mod.ConfigError, match="key 'interval' is missing"):
        View.from_dict(no_interval)
    with pytest.raises(cfg_mod.ConfigError, match="is missing"):
        cfg_mod.check_labels({"loss": "ContrastiveLoss"}, np.arange(4))
