"""The papers' image data sets: CUB-200-2011, Cars196, Stanford Online Products, In-Shop.

Each is read from a folder in its official layout (``dataset.root``) by a thin subclass
of PML's data set class (In-Shop, which PML lacks, by a PML ``BaseDataset``), and split
class-disjointly as in the papers (docs/datasets.md, "Data sets")::

    cub200   classes 1-100 train / 101-200 test
    cars196  classes 1-98 train / 99-196 test
    sop      Ebay_train.txt / Ebay_test.txt
    inshop   list_eval_partition.txt: train / query / gallery

``load_splits`` returns ``{"train", ["val"], "test"}`` (In-Shop: ``{"train", ["val"],
"query", "gallery"}``); ``dataset.val_classes`` moves the last fraction of the training
classes into a class-disjoint validation split; ``dataset.cross_validation`` (a fold of a
hyperparameter search, :mod:`..folds`) returns ``{"train", "val"}`` only, and no image of
an evaluation split is opened. Every split has a ``labels`` numpy array,
remapped to 0..C-1 over all splits (training classes first, so training labels are
0..C_train-1 as proxy losses need), and ``class_ids`` with the data set's own ids; it
returns ``(image tensor, label)``.

``check_root`` raises ``FileNotFoundError`` before training when the folder is missing or
incomplete, naming the folder, the expected layout and where to get the data.
``load_splits`` decodes every image the splits hold once (:mod:`.verify`; remembered in
the user's cache folder, ``$XDG_CACHE_HOME/pml-plugins`` or ``~/.cache/pml-plugins``, per
image list, sizes and modification times) and raises :class:`CorruptImagesError`, also a
``FileNotFoundError``, naming a file that cannot be decoded, before anything is trained
or written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..folds import fold_classes
from . import cars, cub, inshop, sop, transforms
from .cars import Cars196RGB
from .common import LOG, DatasetFormatError, RGBImages
from .cub import CUB200
from .inshop import InShop
from .sop import StanfordOnlineProductsRGB
from .verify import CorruptImagesError, verify_images

__all__ = [
    "CUB200",
    "Cars196RGB",
    "CorruptImagesError",
    "DatasetFormatError",
    "InShop",
    "StanfordOnlineProductsRGB",
    "check_root",
    "load_splits",
    "transforms",
]

MODULES: dict[str, ModuleType] = {"cub200": cub, "cars196": cars, "sop": sop, "inshop": inshop}
CLASSES: dict[str, type[RGBImages]] = {
    "cub200": CUB200,
    "cars196": Cars196RGB,
    "sop": StanfordOnlineProductsRGB,
    "inshop": InShop,
}


def _module(name: str) -> ModuleType:
    if name not in MODULES:
        raise ValueError(
            f"dataset.name: unknown image data set {name!r}; use one of {list(MODULES)}"
        )
    return MODULES[name]


def check_root(name: str, root: str | Path | None, download: bool = False) -> None:
    """Raise ``FileNotFoundError`` unless ``root`` holds ``name`` in its official layout
    (or ``download`` is set and the folder is empty or missing, where PML can download)."""
    _module(name).check_root(root, download=download)


def _val_classes(train_classes: np.ndarray, fraction: float) -> np.ndarray:
    """The last ``fraction`` of the sorted training classes (at least one where > 0),
    the same rule as ``data.split_classes``."""
    if not fraction:
        return train_classes[:0]
    n_val = max(1, int(round(len(train_classes) * fraction)))
    if n_val >= len(train_classes):
        raise ValueError(
            f"dataset.val_classes={fraction} leaves no training class "
            f"({len(train_classes)} training classes); lower it"
        )
    return train_classes[len(train_classes) - n_val :]


def _limit_per_class(labels: np.ndarray, limit: int) -> np.ndarray:
    """Mask keeping the first ``limit`` samples of every class."""
    _, inverse = np.unique(labels, return_inverse=True)
    seen = np.zeros(inverse.max() + 1 if len(inverse) else 0, dtype=np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    for i, c in enumerate(inverse):
        keep[i] = seen[c] < limit
        seen[c] += 1
    return keep


def load_splits(
    dataset_cfg: Mapping[str, Any],
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
) -> dict[str, RGBImages]:
    """The class-disjoint splits of the config's ``dataset`` block.

    Transforms default to :mod:`.transforms` at ``dataset.image_size`` (224): random
    resized crop + flip for ``train``, resize + centre crop for every other split.
    Every image of the returned splits is decoded once (see :mod:`.verify`).
    """
    name = dataset_cfg["name"]
    module = _module(name)
    root = dataset_cfg.get("root")
    download = bool(dataset_cfg.get("download", False))
    check_root(name, root, download)
    image_size = dataset_cfg.get("image_size") or transforms.DEFAULT_IMAGE_SIZE
    train_transform = train_transform or transforms.train_transform(image_size)
    eval_transform = eval_transform or transforms.eval_transform(image_size)

    cls = CLASSES[name]
    splits: dict[str, RGBImages] = {
        split: cls(root=str(root), split=split, download=download) for split in module.SPLITS
    }
    for split, ds in splits.items():
        official = module.OFFICIAL_SIZES[split]
        if len(ds) != official:
            LOG.warning(
                "%s: split %r has %d images, the official data set %d (data folder %s)",
                name,
                split,
                len(ds),
                official,
                Path(root).resolve(),
            )
        if len(ds) == 0:
            raise DatasetFormatError(f"{name}: split {split!r} is empty in {Path(root).resolve()}")

    limit = dataset_cfg.get("limit_per_class")
    if limit:
        splits = {k: ds.subset(_limit_per_class(ds.class_ids, limit)) for k, ds in splits.items()}

    train_classes = np.unique(splits["train"].class_ids)
    eval_names = [k for k in splits if k != "train"]
    eval_classes = np.unique(np.concatenate([splits[k].class_ids for k in eval_names]))
    shared = np.intersect1d(train_classes, eval_classes)
    if len(shared):
        raise DatasetFormatError(
            f"{name}: {len(shared)} classes (e.g. {shared[:5].tolist()}) are in both the "
            f"training and the {'/'.join(eval_names)} split; the list files are not the "
            f"official class-disjoint split"
        )

    val = _val_classes(train_classes, float(dataset_cfg.get("val_classes") or 0.0))
    cv = dataset_cfg.get("cross_validation")
    if cv:  # a fold of a search: no evaluation split, none of its images is opened
        val = fold_classes(train_classes, cv["folds"], cv["fold"], cv.get("seed", 0))[1]
        eval_names = []
    out: dict[str, RGBImages] = {}
    if len(val):
        train = splits["train"]
        in_val = np.isin(train.class_ids, val)
        out["train"] = train.subset(~in_val)
        out["val"] = train.subset(in_val)
    else:
        out["train"] = splits["train"]
    for k in eval_names:
        out[k] = splits[k]

    verify_images([path for ds in out.values() for path in ds.paths], name)

    # 0..C-1 over all splits: training classes first, then validation, then evaluation
    order = np.concatenate([np.setdiff1d(train_classes, val), val, eval_classes])
    mapping = {int(c): i for i, c in enumerate(order)}
    for split, ds in out.items():
        ds.labels = np.fromiter((mapping[int(c)] for c in ds.class_ids), np.int64, len(ds))
        ds.transform = train_transform if split == "train" else eval_transform
    return out
