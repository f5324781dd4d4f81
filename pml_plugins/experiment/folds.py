"""Class-disjoint cross-validation folds of the training classes, and the guard that keeps
a hyperparameter search away from the test split.

``dataset.cross_validation: {folds: k, fold: i, seed: s}`` turns an experiment into one
fold of a search (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020, §4): the
training classes are shuffled with ``seed`` and cut into ``k`` folds of near-equal size
(:func:`fold_classes`); the run trains on the other ``k - 1`` folds and is evaluated on
fold ``i`` as its validation split. Such a run has no test split: the data layer never
builds it.

Inside :func:`search_only` (the search worker runs every trial in it) loading a data set
without ``cross_validation`` raises :class:`TestSplitAccessError`: a search can reach the
test split by no path, not even by a hand-made config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

#: set while a search runs, in this process and in the processes it starts
SEARCH_ENV = "PML_PLUGINS_SEARCH"


class TestSplitAccessError(PermissionError):
    """A hyperparameter search asked for a data set with its test split."""


def fold_classes(
    classes: np.ndarray, folds: int, fold: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(training classes, validation classes)`` of fold ``fold`` of ``folds``.

    The sorted classes are permuted by ``numpy.random.default_rng(seed)`` and split by
    ``numpy.array_split`` into ``folds`` parts: every class is in exactly one validation
    fold, the folds differ in size by at most one class, and the same classes, seed and
    ``folds`` always give the same folds.
    """
    classes = np.sort(np.unique(classes))
    if folds < 2:
        raise ValueError(f"dataset.cross_validation.folds: {folds}; use at least 2")
    if not 0 <= fold < folds:
        raise ValueError(
            f"dataset.cross_validation.fold: {fold} is not a fold of {folds}; use 0 to {folds - 1}"
        )
    if 2 * folds > len(classes):
        raise ValueError(
            f"dataset.cross_validation.folds: {folds} folds of {len(classes)} training "
            f"classes; every validation fold needs 2 classes or more (one class alone has "
            f"nothing to be told apart from), so use at most {len(classes) // 2} folds"
        )
    parts = np.array_split(np.random.default_rng(seed).permutation(classes), folds)
    val = np.sort(parts[fold])
    return np.setdiff1d(classes, val), val


def assignment(classes: np.ndarray, folds: int, seed: int) -> list[list[int]]:
    """The validation classes of every fold (what a search records)."""
    return [fold_classes(classes, folds, i, seed)[1].tolist() for i in range(folds)]


@contextlib.contextmanager
def search_only() -> Iterator[None]:
    """Within this block (and in processes started from it) only cross-validation folds
    can be loaded; see :func:`check_access`."""
    old = os.environ.get(SEARCH_ENV)
    os.environ[SEARCH_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SEARCH_ENV, None)
        else:
            os.environ[SEARCH_ENV] = old


def check_access(dataset_cfg: Mapping[str, Any]) -> None:
    """Raise :class:`TestSplitAccessError` where a search asks for the test split."""
    if os.environ.get(SEARCH_ENV) == "1" and not dataset_cfg.get("cross_validation"):
        raise TestSplitAccessError(
            f"data set {dataset_cfg.get('name')!r} requested with its test split during a "
            f"hyperparameter search; a search trains and validates on cross-validation "
            f"folds of the training classes only (dataset.cross_validation), and the test "
            f"split is evaluated once, after the search (pml-plugins train / ensemble)"
        )
