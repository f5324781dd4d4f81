"""Stanford Online Products (Oh Song et al., "Deep Metric Learning via Lifted Structured
Feature Embedding", CVPR 2016): 120,053 images of 22,634 products.

Official split (docs/datasets.md, "Data sets"): ``Ebay_train.txt`` 11,318 classes
(59,551 images), ``Ebay_test.txt`` 11,316 classes (60,502 images), as in PML's
``StanfordOnlineProducts``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_metric_learning.datasets import StanfordOnlineProducts

from .common import (
    RGBImages,
    as_int,
    check_archive_root,
    find_data_dir,
    layout_error,
    read_table,
)

NAME = "sop"
FOLDER = "Stanford_Online_Products"
SOURCE = "https://cvgl.stanford.edu/projects/lifted_struct/"
SPLITS = ("train", "test")
OFFICIAL_SIZES = {"train": 59551, "test": 60502}
LAYOUT = (
    "<root>/Stanford_Online_Products/Ebay_train.txt and Ebay_test.txt (a header line, then "
    '"<image_id> <class_id> <super_class_id> <path>" per line), '
    "<root>/Stanford_Online_Products/<category>_final/<image>.JPG (the official "
    "Stanford_Online_Products.zip, extracted; dataset.root may also be the "
    "Stanford_Online_Products folder itself)"
)
REQUIRED = ("Ebay_train.txt", "Ebay_test.txt")
COLUMNS = ("image_id", "class_id", "super_class_id", "path")


def check_root(root: str | Path | None, download: bool = False) -> None:
    check_archive_root(
        root, download, name=NAME, folder=FOLDER, required=REQUIRED, layout=LAYOUT, source=SOURCE
    )


class StanfordOnlineProductsRGB(RGBImages, StanfordOnlineProducts):
    """PML's ``StanfordOnlineProducts`` with RGB images, numpy ``labels``, checked files.

    Fixes over PML 2.9: images are converted to RGB; ``root`` may be the
    ``Stanford_Online_Products`` folder itself or its parent; malformed lines and missing
    images raise :class:`DatasetFormatError`. ``download=True`` uses PML's download.
    Labels are the official class ids (1-22,634).
    """

    NAME = NAME

    def generate_split(self) -> None:
        data_dir = find_data_dir(self.root, FOLDER, "Ebay_train.txt")
        if data_dir is None:
            raise layout_error(NAME, self.root, ["Ebay_train.txt"], LAYOUT, SOURCE, True)
        self.data_dir = data_dir
        splits = ["train", "test"] if self.split == "train+test" else [self.split]
        self.paths, self.labels = [], []
        for split in splits:
            list_file = data_dir / f"Ebay_{split}.txt"
            for row in read_table(list_file, COLUMNS, skip=1, name=NAME):
                self.labels.append(as_int(row[1], list_file, "class_id", NAME))
                self.paths.append(os.path.join(data_dir, row[3]))
        self._finish_split(data_dir / f"Ebay_{splits[0]}.txt")
