"""Cars196 (Krause et al., "3D Object Representations for Fine-Grained Categorization",
3dRR 2013): 16,185 images of 196 car models.

Standard deep-metric-learning split (docs/datasets.md, "Data sets"): classes 1-98 train
(8,054 images), classes 99-196 test (8,131 images), regardless of the official
train/test halves, which split each class.

Two layouts are read:

- the original release (``car_ims/`` + ``cars_annos.mat``), which most deep-metric-learning
  code reads;
- the class-folder layout of the Kaggle mirror that PML's ``Cars196`` downloads
  (``names.csv``, ``anno_train.csv``, ``anno_test.csv``, ``car_data/car_data/...``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pytorch_metric_learning.datasets import Cars196

from .common import (
    DatasetFormatError,
    RGBImages,
    as_int,
    is_empty_or_missing,
    layout_error,
    read_table,
)

NAME = "cars196"
SOURCE = (
    "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (original release: car_ims.tgz "
    "and cars_annos.mat) or its mirror "
    "https://www.kaggle.com/datasets/jutrera/stanford-car-dataset-by-classes-folder"
)
SPLITS = ("train", "test")
OFFICIAL_SIZES = {"train": 8054, "test": 8131}
LAYOUT = (
    "either the original release, <root>/cars_annos.mat (struct 'annotations' with "
    "relative_im_path, class) and <root>/car_ims/<image>.jpg; or the Kaggle class-folder "
    "mirror (what dataset.download: true fetches), <root>/names.csv (one class name per "
    'line, 196 lines), <root>/anno_train.csv and <root>/anno_test.csv ("<file>,<x1>,<y1>,'
    '<x2>,<y2>,<class_id>" per line) and <root>/car_data/car_data/{train,test}/<class name>/'
    "<file>"
)
MAT_REQUIRED = ("cars_annos.mat", "car_ims")
CSV_REQUIRED = ("names.csv", "anno_train.csv", "anno_test.csv", "car_data/car_data")


def _layout(root: Path) -> str | None:
    if (root / "cars_annos.mat").exists():
        return "mat"
    if (root / "names.csv").exists() or (root / "anno_train.csv").exists():
        return "csv"
    return None


def check_root(root: str | Path | None, download: bool = False) -> None:
    if root is not None and download and is_empty_or_missing(root):
        return
    layout = _layout(Path(root)) if root is not None else None
    required = CSV_REQUIRED if layout == "csv" else MAT_REQUIRED
    missing = [r for r in required if root is None or not (Path(root) / r).exists()]
    if missing:
        raise layout_error(NAME, root, missing, LAYOUT, SOURCE, download_hint=not download)


def _read_mat(path: Path) -> tuple[list[str], list[int]]:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True)
    except Exception as exc:  # scipy raises several types for a corrupt file
        raise DatasetFormatError(f"{NAME}: {path} is not a readable .mat file: {exc}") from None
    ann = mat.get("annotations")
    fields = getattr(getattr(ann, "dtype", None), "names", None) or ()
    if ann is None or "relative_im_path" not in fields or "class" not in fields:
        raise DatasetFormatError(
            f"{NAME}: {path} must hold a struct array 'annotations' with the fields "
            f"'relative_im_path' and 'class' (found: {', '.join(fields) or 'none'})"
        )
    ann = np.atleast_1d(ann)
    paths = [str(p) for p in ann["relative_im_path"]]
    classes = [as_int(str(c), path, "class", NAME) for c in ann["class"]]
    return paths, classes


class Cars196RGB(RGBImages, Cars196):
    """PML's ``Cars196`` with RGB images, numpy ``labels``, the original layout as well.

    Fixes over PML 2.9's ``Cars196``: grayscale images are converted to RGB; the original
    release (``cars_annos.mat`` + ``car_ims/``) is read as well as the Kaggle mirror;
    malformed CSV lines, unknown class ids and missing images raise
    :class:`DatasetFormatError`. ``download=True`` uses PML's download (the Kaggle mirror).
    Labels are the official class ids (1-196).
    """

    NAME = NAME

    def generate_split(self) -> None:
        root = Path(self.root)
        self.data_dir = root
        classes = {"train": range(1, 99), "test": range(99, 197)}.get(self.split, range(1, 197))
        layout = _layout(root)
        if layout == "mat":
            list_file = root / "cars_annos.mat"
            rel, labels = _read_mat(list_file)
            paths = [os.path.join(root, r) for r in rel]
        elif layout == "csv":
            list_file = root / "names.csv"
            paths, labels = self._read_csv(root)
        else:
            raise layout_error(NAME, root, MAT_REQUIRED, LAYOUT, SOURCE, True)
        for c in labels:
            if not 1 <= c <= 196:
                raise DatasetFormatError(f"{NAME}: {list_file}: class id {c} is not in 1..196")
        self.paths = [p for p, c in zip(paths, labels, strict=True) if c in classes]
        self.labels = [c for c in labels if c in classes]
        self._finish_split(list_file)

    def _read_csv(self, root: Path) -> tuple[list[str], list[int]]:
        names_file = root / "names.csv"
        if not names_file.is_file():
            raise DatasetFormatError(f"{NAME}: the list file {names_file} is missing")
        with open(names_file, encoding="utf-8") as f:
            names = [x.strip() for x in f if x.strip()]
        paths, labels = [], []
        for split in ("train", "test"):
            anno = root / f"anno_{split}.csv"
            rows = read_table(
                anno, ("file", "x1", "y1", "x2", "y2", "class_id"), sep=",", name=NAME
            )
            for file, *_, cls in rows:
                class_id = as_int(cls, anno, "class_id", NAME)
                if not 1 <= class_id <= len(names):
                    raise DatasetFormatError(
                        f"{NAME}: {anno}: class id {class_id} has no name in {names_file} "
                        f"({len(names)} names)"
                    )
                folder = names[class_id - 1].replace("/", "-")
                paths.append(os.path.join(root, "car_data", "car_data", split, folder, file))
                labels.append(class_id)
        return paths, labels
