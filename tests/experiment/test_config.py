"""Every config error path gives one clear message naming the key, and writes nothing."""

import copy
from pathlib import Path

import pytest
import yaml

from pml_plugins.cli import main
from pml_plugins.experiment import config as cfg_mod

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())


def _validate(**changes):
    raw = copy.deepcopy(DEFAULT)
    for dotted, value in changes.items():
        cfg_mod.set_dotted(raw, dotted.replace("__", "."), value)
    return cfg_mod.validate(raw)


def test_default_validates_and_gets_defaults():
    cfg = cfg_mod.validate({"loss": "ContrastiveLoss"})
    assert cfg["dataset"]["name"] == "mnist_subset"
    assert cfg["model"]["trunk"] == "SmallCNN"
    assert cfg["evaluation"]["k_values"] == [1, 2, 4, 8]
    assert cfg["amp"] == "off"


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"lossx": 1}, r"unknown key 'lossx'.*allowed keys here"),
        ({"model__depth": 3}, r"unknown key 'model.depth'"),
        ({"epochs": "ten"}, r"epochs: 'ten' is not of type 'integer'"),
        ({"batch_size": 1}, r"batch_size: 1 is less than the minimum of 2"),
        ({"dataset__name": "imagenet"}, r"dataset.name: 'imagenet' is not allowed; use one of"),
        (
            {"loss": {"MultiSimilarityLos": {}}},
            r"loss: unknown loss 'MultiSimilarityLos'.*Did you mean 'MultiSimilarityLoss'",
        ),
        ({"miner": "NRALossX"}, r"miner: unknown miner 'NRALossX'"),
        (
            {"loss": {"TripletMarginLoss": {"margn": 0.1}}},
            r"loss.TripletMarginLoss: unknown argument 'margn'",
        ),
        (
            {"loss": {"TripletMarginLoss": {"distance": "CosineSimilarty"}}},
            r"loss.TripletMarginLoss.distance: unknown",
        ),
        ({"optimizers__trunk": {"Adamm": {}}}, r"optimizers.trunk: unknown optimizer 'Adamm'"),
        ({"device": "gpu"}, r"device: 'gpu' does not match"),
        ({"loss": {"A": {}, "B": {}}}, r"loss: .* is not a component spec"),
    ],
)
def test_config_errors_name_key_and_fix(changes, pattern):
    with pytest.raises(cfg_mod.ConfigError, match=pattern):
        _validate(**changes)


def test_missing_loss():
    with pytest.raises(cfg_mod.ConfigError, match="'loss' is a required property"):
        cfg_mod.validate({"epochs": 1})


def test_missing_data_folder_names_folder(tmp_path):
    missing = tmp_path / "nowhere" / "CUB_200_2011"
    with pytest.raises(cfg_mod.ConfigError, match="dataset.root") as err:
        _validate(dataset={"name": "cub200", "root": str(missing)})
    assert str(missing) in str(err.value)


def test_sampler_m_larger_than_smallest_class():
    import numpy as np

    cfg = _validate(sampler={"MPerClassSampler": {"m": 8}}, batch_size=16)
    labels = np.repeat(np.arange(5), [10, 10, 10, 10, 5])
    with pytest.raises(
        cfg_mod.ConfigError, match=r"m=8 is larger than the smallest training class \(5"
    ):
        cfg_mod.check_sampler(cfg, labels)
    # explicitly allowed: PML's sampler repeats the images of small classes
    cfg_mod.check_sampler({**cfg, "allow_repeated_samples": True}, labels)
    cfg = _validate(sampler={"MPerClassSampler": {"m": 3}}, batch_size=16)
    with pytest.raises(cfg_mod.ConfigError, match="not a multiple of m=3"):
        cfg_mod.check_sampler(cfg, labels)
    cfg = _validate(sampler={"MPerClassSampler": {"m": 2}}, batch_size=16)
    with pytest.raises(cfg_mod.ConfigError, match="needs 8 classes per batch"):
        cfg_mod.check_sampler(cfg, labels)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"loss": {"NoSuchLoss": {}}}, "unknown loss 'NoSuchLoss'"),
        (
            {"sampler": {"MPerClassSampler": {"m": 600}}, "batch_size": 600},
            "larger than the smallest training class",
        ),
        (
            {"dataset": {"name": "sop", "root": "/nonexistent/Stanford_Online_Products"}},
            "dataset.root",
        ),
        ({"model": {"embedding_size": 0}}, "embedding_size: 0 is less than the minimum"),
    ],
)
def test_cli_bad_config_one_message_and_nothing_written(tmp_path, capsys, changes, message):
    raw = copy.deepcopy(DEFAULT)
    raw.update(changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("pml-plugins: error:") and message in err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_schema_file_is_valid_json_schema():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(cfg_mod.load_schema())


def test_argument_types_follow_the_constructor_defaults():
    # a number where the default is a number (int or float alike), null allowed
    _validate(loss={"MultiSimilarityLoss": {"alpha": 2.5, "beta": 40, "base": None}})
    with pytest.raises(cfg_mod.ConfigError, match=r"loss.MultiSimilarityLoss.beta: True is a"):
        _validate(loss={"MultiSimilarityLoss": {"beta": True}})
    with pytest.raises(cfg_mod.ConfigError, match=r"write it with a dot"):
        _validate(optimizers__trunk={"Adam": {"eps": "1e-8"}})
    # nested specs are checked as well
    with pytest.raises(
        cfg_mod.ConfigError, match=r"loss.TripletMarginLoss.distance.LpDistance.p: 'two'"
    ):
        _validate(loss={"TripletMarginLoss": {"distance": {"LpDistance": {"p": "two"}}}})


def test_schedulers_are_built_on_the_configured_optimizer():
    _validate(lr_schedulers__trunk={"StepLR": {"step_size": 2, "gamma": 0.5}})
    with pytest.raises(cfg_mod.ConfigError, match=r"lr_schedulers.trunk: StepLR cannot be built"):
        _validate(lr_schedulers__trunk={"StepLR": {"step_size": 2, "gamma": 0.5, "last_epoch": 3}})


def test_validation_leaves_the_torch_random_state_alone():
    import torch

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _validate(loss={"ProxyAnchorLoss": {"margin": 0.1}}, miner=None)  # proxies drawn at random
    assert torch.equal(torch.rand(3), expected)
