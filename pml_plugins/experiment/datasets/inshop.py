"""In-Shop Clothes Retrieval (Liu et al., "DeepFashion", CVPR 2016): 52,712 images of
7,982 clothing items.

Official split (docs/datasets.md, "Data sets"), from ``list_eval_partition.txt``: 3,997
training items (25,882 images); 3,985 test items, seen as 14,218 query and 12,612 gallery
images.
PML has no loader for it; :class:`InShop` is a PML ``BaseDataset`` like the others.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_metric_learning.datasets.base_dataset import BaseDataset

from .common import DatasetFormatError, RGBImages, layout_error, read_table

NAME = "inshop"
SOURCE = (
    "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html (the "
    "'In-shop Clothes Retrieval Benchmark' folder: Eval/list_eval_partition.txt and "
    "Img/img.zip, extracted; it cannot be downloaded automatically)"
)
SPLITS = ("train", "query", "gallery")
OFFICIAL_SIZES = {"train": 25882, "query": 14218, "gallery": 12612}
LAYOUT = (
    "<root>/Eval/list_eval_partition.txt (a count line, a header line, then "
    '"<image_name> <item_id> <train|query|gallery>" per line), '
    "<root>/Img/img/<GENDER>/<category>/<item_id>/<image>.jpg (list_eval_partition.txt and "
    "img/ directly under <root> work as well)"
)
LIST_NAME = "list_eval_partition.txt"
COLUMNS = ("image_name", "item_id", "evaluation_status")


def find_list_file(root: Path) -> Path | None:
    for candidate in (root / "Eval" / LIST_NAME, root / LIST_NAME):
        if candidate.is_file():
            return candidate
    return None


def find_image_dir(root: Path) -> Path | None:
    for candidate in (root / "Img", root):
        if (candidate / "img").is_dir():
            return candidate
    return None


def check_root(root: str | Path | None, download: bool = False) -> None:
    missing = []
    if root is None or find_list_file(Path(root)) is None:
        missing.append(f"Eval/{LIST_NAME}")
    if root is None or find_image_dir(Path(root)) is None:
        missing.append("Img/img/")
    if missing:
        err = layout_error(NAME, root, missing, LAYOUT, SOURCE, download_hint=False)
        if download:
            err.args = (err.args[0] + " (dataset.download: true does not apply to inshop)",)
        raise err


def item_number(item_id: str) -> int:
    """``id_00000123`` -> 123, the class id."""
    digits = item_id.rsplit("_", 1)[-1]
    if not digits.isdigit():
        raise DatasetFormatError(f"{NAME}: item id {item_id!r} is not of the form id_<number>")
    return int(digits)


class InShop(RGBImages, BaseDataset):
    """In-Shop Clothes Retrieval as a PML ``BaseDataset``: splits train, query, gallery.

    Labels are the item numbers (``id_00000123`` -> 123); query and gallery share them.
    ``download=True`` raises: the data set is distributed by its authors only.
    """

    NAME = NAME

    def get_available_splits(self) -> list[str]:
        return list(SPLITS)

    def download_and_remove(self) -> None:
        raise FileNotFoundError(
            f"{NAME}: cannot be downloaded automatically. Get it from {SOURCE}, "
            f"extract it into {self.root}, and set dataset.download: false."
        )

    def generate_split(self) -> None:
        root = Path(self.root)
        list_file = find_list_file(root)
        image_dir = find_image_dir(root)
        if list_file is None or image_dir is None:
            check_root(root)
        self.data_dir = image_dir
        rows = read_table(list_file, COLUMNS, skip=2, name=NAME)
        statuses = {r[2] for r in rows}
        unknown = statuses - set(SPLITS)
        if unknown:
            raise DatasetFormatError(
                f"{NAME}: {list_file}: evaluation_status must be one of {', '.join(SPLITS)}, "
                f"got {', '.join(sorted(unknown))}"
            )
        rows = [r for r in rows if r[2] == self.split]
        self.paths = [os.path.join(image_dir, r[0]) for r in rows]
        self.labels = [item_number(r[1]) for r in rows]
        self._finish_split(list_file)
