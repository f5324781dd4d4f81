"""CUB-200-2011 (Wah et al., Caltech, 2011): 11,788 bird images of 200 species.

Standard deep-metric-learning split (docs/datasets.md, "Data sets"): classes 1-100 train
(5,864 images), classes 101-200 test (5,924 images), as in PML's ``CUB``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_metric_learning.datasets import CUB

from .common import (
    DatasetFormatError,
    RGBImages,
    as_int,
    check_archive_root,
    find_data_dir,
    layout_error,
    read_table,
)

NAME = "cub200"
FOLDER = "CUB_200_2011"
SOURCE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
SPLITS = ("train", "test")
OFFICIAL_SIZES = {"train": 5864, "test": 5924}
LAYOUT = (
    '<root>/CUB_200_2011/images.txt ("<image_id> <relative path>" per line), '
    '<root>/CUB_200_2011/image_class_labels.txt ("<image_id> <class_id 1..200>" per line), '
    "<root>/CUB_200_2011/images/<class folder>/<image>.jpg (the official CUB_200_2011.tgz, "
    "extracted; dataset.root may also be the CUB_200_2011 folder itself)"
)
REQUIRED = ("images.txt", "image_class_labels.txt", "images")


def check_root(root: str | Path | None, download: bool = False) -> None:
    check_archive_root(
        root, download, name=NAME, folder=FOLDER, required=REQUIRED, layout=LAYOUT, source=SOURCE
    )


class CUB200(RGBImages, CUB):
    """PML's ``CUB`` with RGB images, numpy ``labels``, and a checked data folder.

    Fixes over PML 2.9's ``CUB``: grayscale images are converted to RGB (PML's batches
    do not stack when one is drawn); ``root`` may be the ``CUB_200_2011`` folder itself or
    its parent; a malformed list file, a mismatch between ``images.txt`` and
    ``image_class_labels.txt`` or a missing image raises :class:`DatasetFormatError`
    instead of being skipped. ``download=True`` uses PML's download code.
    Labels are the official class ids (1-200).
    """

    NAME = NAME

    def generate_split(self) -> None:
        data_dir = find_data_dir(self.root, FOLDER, "images.txt")
        if data_dir is None:
            raise layout_error(NAME, self.root, ["images.txt"], LAYOUT, SOURCE, True)
        self.data_dir = data_dir
        images_file = data_dir / "images.txt"
        labels_file = data_dir / "image_class_labels.txt"
        images = read_table(images_file, ("image_id", "path"), name=NAME)
        labels = read_table(labels_file, ("image_id", "class_id"), name=NAME)
        if len(images) != len(labels):
            raise DatasetFormatError(
                f"{NAME}: {images_file} lists {len(images)} images but {labels_file} "
                f"labels {len(labels)}"
            )
        classes = {"train": range(1, 101), "test": range(101, 201)}.get(self.split, range(1, 201))
        self.paths, self.labels = [], []
        for (id1, rel), (id2, cls) in zip(images, labels, strict=True):
            if id1 != id2:
                raise DatasetFormatError(
                    f"{NAME}: image id {id1!r} in {images_file} and {id2!r} in {labels_file} "
                    f"are on the same line; the two files must list the same ids in order"
                )
            class_id = as_int(cls, labels_file, "class_id", NAME)
            if not 1 <= class_id <= 200:
                raise DatasetFormatError(
                    f"{NAME}: {labels_file}: class id {class_id} of image {id1} is not in 1..200"
                )
            if class_id in classes:
                self.paths.append(os.path.join(data_dir, "images", rel))
                self.labels.append(class_id)
        self._finish_split(images_file)
