"""Miniature data sets in the official layouts of CUB-200-2011, Cars196, SOP and In-Shop.

Each ``make_*`` writes a few tiny JPEGs per class (some of them grayscale, as in the real
CUB and Cars196) and the list files of the official release into a folder, and returns a
:class:`Tree` with the folder to give as ``dataset.root`` and the expected number of
classes and images per split. Class ids straddle the official class split (e.g. CUB ids
1-3 train, 101-103 test), so the loaders' split rules are exercised as they are.

    tree = make_tree("cub200", tmp_path)
    load_splits({"name": "cub200", "root": str(tree.root), "image_size": 32})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Tree:
    name: str
    #: the folder to give as ``dataset.root``
    root: Path
    #: the folder PML's own class takes as ``root`` (the parent of the archive's folder)
    pml_root: Path
    #: split -> (number of classes, number of images)
    splits: dict[str, tuple[int, int]]
    #: split -> the data set's own class ids in that split
    classes: dict[str, set[int]] = field(default_factory=dict)
    #: every image written, and the grayscale ones
    images: list[Path] = field(default_factory=list)
    gray: list[Path] = field(default_factory=list)

    def config(self, **extra) -> dict:
        return {"name": self.name, "root": str(self.root), **extra}

    def expect_train_test(self, train_classes, test_classes, per_class: int) -> None:
        """Record the expected class-disjoint train / test splits, ``per_class`` images each."""
        self.splits = {
            "train": (len(train_classes), len(train_classes) * per_class),
            "test": (len(test_classes), len(test_classes) * per_class),
        }
        self.classes = {"train": set(train_classes), "test": set(test_classes)}


def write_image(path: Path, seed: int, gray: bool = False) -> Path:
    """A small JPEG (non-square, 10-17 px wide) with random pixels."""
    rng = np.random.default_rng(seed)
    w, h = 10 + seed % 8, 12
    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB").save(path)
    return path


def _is_gray(class_index: int, image_index: int) -> bool:
    return (class_index + image_index) % 3 == 1


def make_cub(
    folder: Path,
    train_classes: tuple[int, ...] = (1, 2, 3, 4),
    test_classes: tuple[int, ...] = (101, 102, 103),
    per_class: int = 3,
) -> Tree:
    """``folder/CUB_200_2011/{images.txt, image_class_labels.txt, images/...}``."""
    base = Path(folder) / "CUB_200_2011"
    tree = Tree("cub200", base, Path(folder), {})
    images_txt, labels_txt, split_txt, classes = [], [], [], []
    image_id = 0
    for ci, c in enumerate(sorted(train_classes + test_classes)):
        class_dir = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {class_dir}")
        for j in range(per_class):
            image_id += 1
            rel = f"{class_dir}/Bird_{c}_{j:04d}_{image_id}.jpg"
            gray = _is_gray(ci, j)
            p = write_image(base / "images" / rel, image_id, gray)
            tree.images.append(p)
            if gray:
                tree.gray.append(p)
            images_txt.append(f"{image_id} {rel}")
            labels_txt.append(f"{image_id} {c}")
            split_txt.append(f"{image_id} {j % 2}")
    (base / "images.txt").write_text("\n".join(images_txt) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels_txt) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split_txt) + "\n")
    (base / "classes.txt").write_text("\n".join(classes) + "\n")
    tree.expect_train_test(train_classes, test_classes, per_class)
    return tree


def make_cars(
    folder: Path,
    layout: str = "mat",
    train_classes: tuple[int, ...] = (1, 2, 98),
    test_classes: tuple[int, ...] = (99, 150, 196),
    per_class: int = 3,
) -> Tree:
    """The original release (``layout="mat"``: ``cars_annos.mat`` + ``car_ims/``) or the
    Kaggle class-folder mirror that PML downloads (``layout="csv"``)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    tree = Tree("cars196", root, root, {})
    classes = sorted(train_classes + test_classes)
    records = []  # (relative path, class, is_test)
    n = 0
    for ci, c in enumerate(classes):
        for j in range(per_class):
            n += 1
            records.append((n, c, j % 2 == 1, _is_gray(ci, j)))
    if layout == "mat":
        from scipy.io import savemat

        fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
        ann = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
        for i, (k, c, is_test, gray) in enumerate(records):
            rel = f"car_ims/{k:06d}.jpg"
            p = write_image(root / rel, k, gray)
            tree.images.append(p)
            if gray:
                tree.gray.append(p)
            ann[0, i] = (rel, 1, 1, 8, 8, np.uint8(c), np.uint8(is_test))
        names = np.array([f"Car model {c}" for c in range(1, 197)], dtype=object)
        savemat(str(root / "cars_annos.mat"), {"annotations": ann, "class_names": names[None]})
    elif layout == "csv":
        # class 3's name holds a "/", which the mirror's folder names replace by "-"
        names = [f"Car {c}/V {2000 + c}" if c % 2 else f"Car model {c}" for c in range(1, 197)]
        (root / "names.csv").write_text("\n".join(names) + "\n")
        for split in ("train", "test"):
            lines = []
            for k, c, is_test, gray in records:
                if is_test != (split == "test"):
                    continue
                file = f"{k:05d}.jpg"
                folder_name = names[c - 1].replace("/", "-")
                p = write_image(
                    root / "car_data" / "car_data" / split / folder_name / file, k, gray
                )
                tree.images.append(p)
                if gray:
                    tree.gray.append(p)
                lines.append(f"{file},1,1,8,8,{c}")
            (root / f"anno_{split}.csv").write_text("\n".join(lines) + "\n")
    else:
        raise ValueError(f"layout must be 'mat' or 'csv', got {layout!r}")
    tree.expect_train_test(train_classes, test_classes, per_class)
    return tree


def make_sop(
    folder: Path,
    train_classes: tuple[int, ...] = (1, 2, 3, 4),
    test_classes: tuple[int, ...] = (11319, 11320, 11321),
    per_class: int = 2,
) -> Tree:
    """``folder/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <cat>_final/...}``."""
    base = Path(folder) / "Stanford_Online_Products"
    tree = Tree("sop", base, Path(folder), {})
    image_id = 0
    for split, classes in (("train", train_classes), ("test", test_classes)):
        lines = ["image_id class_id super_class_id path"]
        for ci, c in enumerate(classes):
            super_id = 1 + c % 12
            for j in range(per_class):
                image_id += 1
                rel = f"cat{super_id}_final/{c}_{j}.JPG"
                gray = _is_gray(ci, j)
                p = write_image(base / rel, image_id, gray)
                tree.images.append(p)
                if gray:
                    tree.gray.append(p)
                lines.append(f"{image_id} {c} {super_id} {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    tree.expect_train_test(train_classes, test_classes, per_class)
    return tree


def make_inshop(
    folder: Path,
    train_items: int = 4,
    test_items: int = 3,
    per_train_item: int = 3,
    per_query: int = 1,
    per_gallery: int = 2,
) -> Tree:
    """``folder/Eval/list_eval_partition.txt`` + ``folder/Img/img/<GENDER>/<cat>/<id>/...``."""
    root = Path(folder)
    tree = Tree("inshop", root, root, {})
    lines = []
    k = 0

    def add(item: int, status: str, count: int) -> None:
        nonlocal k
        for j in range(count):
            k += 1
            rel = f"img/{'WOMEN' if item % 2 else 'MEN'}/Tees/id_{item:08d}/{j:02d}_{status}.jpg"
            gray = _is_gray(item, j)
            p = write_image(root / "Img" / rel, k, gray)
            tree.images.append(p)
            if gray:
                tree.gray.append(p)
            lines.append(f"{rel}    id_{item:08d} {status}")

    for item in range(1, train_items + 1):
        add(item, "train", per_train_item)
    for item in range(train_items + 1, train_items + test_items + 1):
        add(item, "query", per_query)
        add(item, "gallery", per_gallery)
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    header = [str(len(lines)), "image_name item_id evaluation_status"]
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(header + lines) + "\n")
    tree.splits = {
        "train": (train_items, train_items * per_train_item),
        "query": (test_items, test_items * per_query),
        "gallery": (test_items, test_items * per_gallery),
    }
    test_ids = set(range(train_items + 1, train_items + test_items + 1))
    tree.classes = {
        "train": set(range(1, train_items + 1)),
        "query": test_ids,
        "gallery": test_ids,
    }
    return tree


MAKERS = {"cub200": make_cub, "cars196": make_cars, "sop": make_sop, "inshop": make_inshop}


def make_tree(name: str, folder: Path, **kwargs) -> Tree:
    """The miniature tree of the data set ``name`` (``cub200``, ``cars196``, ``sop``,
    ``inshop``) in ``folder``."""
    return MAKERS[name](Path(folder), **kwargs)
