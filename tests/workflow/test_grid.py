"""The grid: expansion (deep merge), validation messages, cell files."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import grid
import pytest
import yaml

from pml_plugins.experiment import config as cfg_mod

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GRID = REPO / "config" / "config.yaml"


def small_grid() -> dict:
    return {
        "runs_dir": "out/runs",
        "base": {
            "batch_size": 32,
            "model": {"trunk": "SmallCNN", "embedder": "linear"},
            "sampler": {"MPerClassSampler": {"m": 4}},
            "miner": {"MultiSimilarityMiner": {"epsilon": 0.1}},
            "evaluation": {"k_values": [1, 2]},
        },
        "datasets": {
            "digits": {
                "limit_per_class": 10,
                "overrides": {"batch_size": 16, "model": {"embedder": "mlp"}},
            }
        },
        "losses": {
            "A": {
                "loss": "NRALoss",
                "miner": None,
                "sampler": {
                    "RepresentativeSampler": {
                        "classes_per_batch": 2,
                        "samples_per_class": 8,
                        "iterations_per_projection": 5,
                    }
                },
                "trainer": "AlternatingProjections",
            },
            "B.v2": {"loss": {"TripletMarginLoss": {"margin": 0.2}}},
        },
        "embedding_sizes": [2, 8],
        "seeds": [0, 1],
    }


def test_expand_paths_are_every_combination():
    cells = grid.expand(small_grid())
    expected = {
        f"digits/{label}/{dim}/seed{seed}"
        for label, dim, seed in itertools.product(["A", "B.v2"], [2, 8], [0, 1])
    }
    assert set(cells) == expected
    for path, cfg in cells.items():
        _, label, dim, seed = path.split("/")
        assert cfg["name"] == label
        assert cfg["model"]["embedding_size"] == int(dim)
        assert cfg["seed"] == int(seed[4:])
        assert cfg["output"] == f"out/runs/{path}"


def test_expand_merges_base_dataset_overrides_and_loss_in_order():
    g = small_grid()
    before = copy.deepcopy(g)
    cells = grid.expand(g)
    assert g == before, "expand must not modify the grid"
    a = cells["digits/A/2/seed1"]
    assert a == {
        "batch_size": 16,  # dataset override beats base
        "model": {"trunk": "SmallCNN", "embedder": "mlp", "embedding_size": 2},
        # a component spec is replaced whole, not merged with the base's
        "sampler": {
            "RepresentativeSampler": {
                "classes_per_batch": 2,
                "samples_per_class": 8,
                "iterations_per_projection": 5,
            }
        },
        "miner": None,
        "evaluation": {"k_values": [1, 2]},
        "dataset": {"name": "digits", "limit_per_class": 10},
        "loss": "NRALoss",
        "trainer": "AlternatingProjections",
        "seed": 1,
        "name": "A",
        "output": "out/runs/digits/A/2/seed1",
    }
    b = cells["digits/B.v2/8/seed0"]
    assert b["miner"] == {"MultiSimilarityMiner": {"epsilon": 0.1}}
    assert b["sampler"] == {"MPerClassSampler": {"m": 4}}
    assert b["loss"] == {"TripletMarginLoss": {"margin": 0.2}}
    # cells do not share mutable state
    b["sampler"]["MPerClassSampler"]["m"] = 99
    assert cells["digits/B.v2/8/seed1"]["sampler"]["MPerClassSampler"]["m"] == 4


def test_deep_merge_replaces_specs_and_merges_plain_mappings():
    merged = grid.deep_merge(
        {"optimizers": {"trunk": {"Adam": {"lr": 1}}, "embedder": {"SGD": {"lr": 2}}}},
        {"optimizers": {"trunk": {"SGD": {"lr": 3}}}},
    )
    assert merged == {"optimizers": {"trunk": {"SGD": {"lr": 3}}, "embedder": {"SGD": {"lr": 2}}}}
    assert grid.deep_merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}
    assert grid.deep_merge({"a": {"b": 1}}, None, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}
    # a spec is what registry.is_spec says: {Name: null} is one, {Name: 5} is not
    assert grid.deep_merge({"s": {"A": {"m": 1}}}, {"s": {"B": None}}) == {"s": {"B": None}}
    assert grid.deep_merge({"s": {"A": 1}}, {"s": {"B": 2}}) == {"s": {"A": 1, "B": 2}}


def test_every_cell_of_the_small_grid_validates():
    cells = grid.validate_grid(small_grid())
    assert len(cells) == 8
    for cfg in cells.values():
        cfg_mod.validate(cfg)  # a ConfigError here fails the test


def test_default_grid_expands_to_valid_cells():
    g = yaml.safe_load(DEFAULT_GRID.read_text())
    cells = grid.validate_grid(g)
    n = len(g["datasets"]) * len(g["losses"]) * len(g["embedding_sizes"]) * len(g["seeds"])
    assert len(cells) == n
    assert 2 in g["embedding_sizes"], "the default grid must have a 2-D size for the scatter plot"
    assert {c["dataset"]["name"] for c in cells.values()} == {"mnist_subset"}


def expect_error(g: dict, *fragments: str, **kw) -> str:
    with pytest.raises(grid.GridError) as info:
        grid.validate_grid(g, **kw)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def test_unknown_loss_names_the_label_and_the_suggestion():
    g = small_grid()
    g["losses"]["Mine"] = {"loss": {"NRALos": {"alpha": 4}}}
    expect_error(g, "losses.Mine", "'NRALos'", "'NRALoss'")


def test_unknown_loss_argument_names_the_label():
    g = small_grid()
    g["losses"]["B.v2"]["loss"] = {"TripletMarginLoss": {"margn": 0.2}}
    expect_error(g, "losses.B.v2", "margn")


def test_missing_data_root_names_the_dataset_and_folder(tmp_path):
    g = small_grid()
    missing = tmp_path / "no_such_folder"
    g["datasets"] = {"cub200": {"root": str(missing)}}
    expect_error(g, "datasets.cub200", str(missing), "check_data=false")
    g["datasets"] = {"cars196": {}}
    expect_error(g, "datasets.cars196.root", "cars196")


def test_check_data_false_resolves_without_the_data(tmp_path):
    g = small_grid()
    g["datasets"] = {"cub200": {"root": str(tmp_path / "absent"), "image_size": 64}}
    g["base"]["sampler"] = {"MPerClassSampler": {"m": 4}}
    cells = grid.validate_grid(g, check_data=False)
    assert len(cells) == 8
    g["check_data"] = False  # the same, from the grid (--config check_data=false)
    assert set(grid.validate_grid(g)) == set(cells)


@pytest.mark.parametrize(
    "change, fragments",
    [
        (lambda g: g.update(embedding_sizes="64"), ["embedding_sizes", "not of type 'array'"]),
        (lambda g: g.pop("losses"), ["'losses' is a required property"]),
        (lambda g: g.update(epochs=3), ["epochs", "allowed keys"]),
        (lambda g: g["losses"].update(C={"miner": None}), ["losses.C", "'loss' is a required"]),
        (lambda g: g["losses"].update({"a/b": {"loss": "NRALoss"}}), ["'a/b'"]),
        (lambda g: g.update(seeds=[]), ["seeds"]),
        (lambda g: g["datasets"].update(mnist={}), ["datasets.mnist", "unknown data set"]),
        (lambda g: g["base"].update(batch_sise=4), ["losses.A", "batch_sise"]),
    ],
)
def test_malformed_grid_names_the_key(change, fragments):
    g = small_grid()
    change(g)
    expect_error(g, *fragments)


def test_a_grid_must_not_pin_a_gpu_index():
    g = small_grid()
    g["base"]["device"] = "cuda:1"
    expect_error(g, "cuda:1", "write 'cuda'")


def test_sampler_impossible_on_the_embedded_data_fails_at_validation():
    g = small_grid()
    g["datasets"]["digits"]["limit_per_class"] = 3
    expect_error(g, "losses.B.v2", "m=4")
    # without the data check, the same grid resolves (the run itself would fail)
    assert len(grid.validate_grid(g, check_data=False)) == 8


def test_uses_gpu():
    assert grid.uses_gpu({"device": "cuda"})
    assert not grid.uses_gpu({"device": "cpu"})
    assert not grid.uses_gpu({})


def test_write_cell_round_trips_and_keeps_a_run_of_the_same_config(tmp_path):
    cell = grid.expand(small_grid())["digits/B.v2/2/seed0"]
    cell["output"] = str(tmp_path / "run")
    path = tmp_path / "run" / "cell.yaml"
    assert grid.write_cell(cell, path) is False
    assert yaml.safe_load(path.read_text()) == cell
    # a run folder left by a killed run of this same config: kept, to be resumed
    run = tmp_path / "run"
    cfg_mod.dump({**cfg_mod.validate(cell), "output": str(run)}, run / "config.yaml")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "state_1.pth").write_bytes(b"x")
    assert grid.write_cell(cell, path) is False
    assert (run / "checkpoints" / "state_1.pth").exists()


def test_write_cell_clears_a_run_of_another_config(tmp_path):
    cell = grid.expand(small_grid())["digits/B.v2/2/seed0"]
    run = tmp_path / "run"
    cell["output"] = str(run)
    old = cfg_mod.validate({**cell, "epochs": cell.get("epochs", 5) + 1})
    run.mkdir()
    cfg_mod.dump(old, run / "config.yaml")
    for name in ("checkpoints", "logs"):
        (run / name).mkdir()
        (run / name / "x").write_text("old")
    for name in ("metrics.json", "untrained_metrics.json", "manifest.json"):
        (run / name).write_text("{}")
    # through the command the training job runs
    proc = subprocess.run(
        [
            sys.executable,
            grid.__file__,
            str(run / "cell.yaml"),
            json.dumps(cell),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "changed" in proc.stdout
    left = sorted(p.name for p in run.iterdir())
    assert left == [".lock", "cell.yaml"]  # the run folder's lock file, released
    assert yaml.safe_load((run / "cell.yaml").read_text()) == cell
