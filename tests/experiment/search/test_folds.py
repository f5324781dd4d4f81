"""Class-disjoint folds, and the guard that keeps a search off the test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from pml_plugins.experiment import config as cfg_mod
from pml_plugins.experiment import data, folds
from tests.datatrees import make_tree


@pytest.mark.parametrize("n_classes, k", [(5, 2), (100, 4), (9, 4), (98, 4)])
def test_folds_partition_the_classes_and_are_stable(n_classes, k):
    classes = np.arange(10, 10 + n_classes)
    parts = folds.assignment(classes, k, seed=3)
    flat = sorted(sum(parts, []))
    assert flat == classes.tolist()  # every class in exactly one validation fold
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 2
    for i, val in enumerate(parts):
        train, val2 = folds.fold_classes(classes[::-1], k, i, seed=3)  # order-independent
        assert val2.tolist() == val
        assert sorted(train.tolist() + val) == classes.tolist()
    assert folds.assignment(classes, k, seed=3) == parts
    if n_classes > 5:
        assert folds.assignment(classes, k, seed=4) != parts


def test_a_validation_fold_needs_two_classes():
    with pytest.raises(ValueError, match="at most 2 folds"):
        folds.fold_classes(np.arange(5), 3, 0, 0)
    with pytest.raises(ValueError, match="use 0 to 1"):
        folds.fold_classes(np.arange(5), 2, 2, 0)


def test_an_embedded_fold_has_train_and_val_only_with_labels_from_zero():
    block = {"name": "mnist_subset", "cross_validation": {"folds": 2, "fold": 1, "seed": 0}}
    splits = data.load_splits(block)
    assert set(splits) == {"train", "val"}
    train, val = (np.unique(splits[k].labels) for k in ("train", "val"))
    # training labels 0..C-1 (proxy losses index proxies by label), validation after them
    assert train.tolist() == list(range(len(train)))
    assert val.tolist() == list(range(len(train), 5))
    assert len(splits["train"]) + len(splits["val"]) == 2500
    assert data.eval_plan("mnist_subset", splits) == [("val", ["val"])]


def test_the_fixed_splits_are_unchanged_by_the_renumbering():
    splits = data.load_splits({"name": "mnist_subset", "val_classes": 0.2})
    assert [np.unique(splits[k].labels).tolist() for k in ("train", "val", "test")] == [
        [0, 1, 2, 3],
        [4],
        [5, 6, 7, 8, 9],
    ]


def test_inside_a_search_the_test_split_cannot_be_loaded():
    with folds.search_only():
        with pytest.raises(folds.TestSplitAccessError, match="test split"):
            data.load_splits({"name": "mnist_subset"})
        cv = {"name": "mnist_subset", "cross_validation": {"folds": 2, "fold": 0}}
        assert "test" not in data.load_splits(cv)
    assert "test" in data.load_splits({"name": "mnist_subset", "limit_per_class": 4})


def test_a_train_command_started_by_a_search_is_refused_the_test_split(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"loss": "ContrastiveLoss", "epochs": 1, "device": "cpu"}))
    env = {**os.environ, folds.SEARCH_ENV: "1"}
    cmd = [
        sys.executable,
        "-m",
        "pml_plugins.cli",
        "train",
        str(config),
        "--out",
        str(tmp_path / "r"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "pml-plugins: error: data set 'mnist_subset' requested with its test"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_an_image_data_set_fold_never_opens_a_test_image(tmp_path, monkeypatch):
    """Every test image is overwritten with bytes no decoder reads: a fold still loads
    (and decodes each of its own images), the full data set does not."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tree = make_tree("cub200", tmp_path / "cub")
    splits = data.load_splits({"name": "cub200", "root": str(tree.root)})
    for path in splits["test"].paths:
        with open(path, "wb") as f:
            f.write(b"not an image")
    cv = {"name": "cub200", "root": str(tree.root), "cross_validation": {"folds": 2, "fold": 0}}
    with folds.search_only():
        fold = data.load_splits(cv)
    assert set(fold) == {"train", "val"}
    classes = np.unique(np.concatenate([fold["train"].class_ids, fold["val"].class_ids]))
    assert classes.tolist() == np.unique(splits["train"].class_ids).tolist()
    assert len(fold["train"]) + len(fold["val"]) == len(splits["train"])
    with pytest.raises(FileNotFoundError, match="cannot be decoded|decod"):
        data.load_splits({"name": "cub200", "root": str(tree.root)})


@pytest.mark.parametrize(
    "block, fragment",
    [
        ({"cross_validation": {"folds": 2, "fold": 2}}, "cross_validation.fold: 2 is not a fold"),
        ({"cross_validation": {"folds": 1, "fold": 0}}, "folds"),
        (
            {"cross_validation": {"folds": 2, "fold": 0}, "val_classes": 0.2},
            "dataset.val_classes: a cross-validation fold is its own validation split",
        ),
    ],
)
def test_a_bad_cross_validation_block_is_a_config_error(block, fragment):
    with pytest.raises(cfg_mod.ConfigError, match=fragment.replace(".", r"\.")):
        cfg_mod.validate({"loss": "ContrastiveLoss", "dataset": {"name": "mnist_subset", **block}})


def test_fold_assignment_is_json_serialisable():
    assert json.loads(json.dumps(folds.assignment(np.arange(5), 2, 0))) == [[2, 3, 4], [0, 1]]
