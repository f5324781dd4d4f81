"""What the four image data sets share: RGB loading, checks of the data folder, class subsets.

PML's data sets (``pytorch_metric_learning.datasets``) open each image with
``PIL.Image.open`` and hand it to the transform as it is: CUB-200-2011 and Cars196 hold
grayscale JPEGs, which become 1-channel tensors, so a batch that holds one of them does
not stack. :class:`RGBImages` converts every image to RGB (and closes the file); it is
mixed into thin subclasses of PML's classes in ``cub.py``, ``cars.py``, ``sop.py`` and
``inshop.py``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

LOG = logging.getLogger("pml_plugins")


class DatasetFormatError(FileNotFoundError, ValueError):
    """A data folder that exists but does not hold the data set in its official layout.

    A ``FileNotFoundError`` (the data set is not there in usable form, so the runner and
    the CLI report it like a missing folder) and a ``ValueError`` (the content is wrong).
    """


def check_images_exist(name: str, paths: Sequence[str], list_file: str | Path) -> None:
    """Every image named by the list files must be on disk; name the first few that are not."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetFormatError(
            f"{name}: {len(missing)} of the {len(paths)} images listed in {list_file} are "
            f"missing:\n  {shown}{more}\nThe data folder is incomplete: extract the official "
            f"archive again."
        )


def read_table(
    path: str | Path,
    columns: Sequence[str],
    *,
    skip: int = 0,
    sep: str | None = None,
    name: str,
) -> list[list[str]]:
    """Rows of a whitespace- (or ``sep``-) separated list file, each with ``len(columns)``
    fields; a malformed line raises :class:`DatasetFormatError` naming the file, the line
    and the expected columns."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{name}: the list file {path} is missing")
    rows = []
    want = len(columns)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= skip or not line.strip():
                continue
            fields = [x.strip() for x in line.strip().split(sep)]
            if len(fields) != want:
                raise DatasetFormatError(
                    f"{name}: {path}, line {lineno}: expected {want} columns "
                    f"({' '.join(columns)}), got {len(fields)}: {line.strip()!r}"
                )
            rows.append(fields)
    if not rows:
        raise DatasetFormatError(f"{name}: the list file {path} has no entries")
    return rows


def as_int(value: str, path: str | Path, column: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetFormatError(
            f"{name}: {path}: column {column!r} must be an integer, got {value!r}"
        ) from None


class RGBImages:
    """Mixin for PML's ``BaseDataset`` subclasses: RGB images, ``labels`` as a numpy array.

    Subclasses fill ``self.paths`` (absolute image paths) and ``self.labels`` (the data
    set's own class ids) in ``generate_split``. ``__getitem__`` returns
    ``(transform(RGB image), int label)``.
    """

    paths: list[str]
    labels: np.ndarray
    transform: Callable | None
    target_transform: Callable | None
    #: the original class id of every sample (``labels`` may be remapped to 0..C-1)
    class_ids: np.ndarray
    #: the folder the image paths are relative to (set in ``generate_split``)
    data_dir: Path
    #: a short name of the data set, used in messages
    NAME = "dataset"

    def _finish_split(self, list_file: str | Path) -> None:
        """Numpy labels, a check that every listed image exists."""
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.class_ids = self.labels.copy()
        check_images_exist(self.NAME, self.paths, list_file)

    def __getitem__(self, idx: int) -> tuple[Any, int]:
        with Image.open(self.paths[idx]) as img:
            img = img.convert("RGB")
        label = int(self.labels[idx])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return img, label

    def subset(self, keep: np.ndarray) -> RGBImages:
        """A shallow copy that holds only the samples where ``keep`` (bool mask) is True."""
        keep = np.asarray(keep, dtype=bool)
        new = copy.copy(self)
        new.paths = [p for p, k in zip(self.paths, keep, strict=True) if k]
        new.labels = self.labels[keep].copy()
        new.class_ids = self.class_ids[keep].copy()
        return new

    def fingerprint(self) -> str:
        """A hash of the image paths (relative to the data folder) and the class ids."""
        h = hashlib.sha256()
        for p in self.paths:
            h.update(os.path.relpath(p, self.data_dir).encode())
            h.update(b"\0")
        h.update(self.class_ids.tobytes())
        return h.hexdigest()[:16]


def find_data_dir(root: str | Path, folder: str, marker: str) -> Path | None:
    """``root/folder`` if it holds ``marker``, else ``root`` if it does, else None.

    The official archives extract into one folder (``CUB_200_2011``,
    ``Stanford_Online_Products``); ``dataset.root`` may name that folder or its parent.
    """
    root = Path(root)
    for candidate in (root / folder, root):
        if (candidate / marker).exists():
            return candidate
    return None


def layout_error(
    name: str,
    root: str | Path | None,
    missing: Iterable[str],
    layout: str,
    source: str,
    download_hint: bool,
) -> FileNotFoundError:
    """The FileNotFoundError of a missing or incomplete data folder, in one line: what is
    missing where, the expected ``layout`` (one line), and where to get the data."""
    where = "dataset.root is not set" if root is None else f"looked in {Path(root).resolve()}"
    missing = list(missing)
    what = f" (missing: {', '.join(missing)})" if missing else ""
    how = " or set dataset.download: true" if download_hint else ""
    return FileNotFoundError(
        f"{name}: the data set was not found; {where}{what}. Expected layout: {layout}. "
        f"Get it from {source}{how}, and set dataset.root to its folder."
    )


def is_empty_or_missing(root: str | Path) -> bool:
    root = Path(root)
    return not root.exists() or (root.is_dir() and not any(root.iterdir()))


def check_archive_root(
    root: str | Path | None,
    download: bool,
    *,
    name: str,
    folder: str,
    required: Sequence[str],
    layout: str,
    source: str,
) -> None:
    """Check a data set that extracts into one ``folder`` holding ``required`` files.

    ``dataset.root`` may name that folder or its parent (see :func:`find_data_dir`); an
    empty or missing root is fine when ``download`` is on (PML downloads into it).
    """
    if root is not None and download and is_empty_or_missing(root):
        return
    data_dir = find_data_dir(root, folder, required[0]) if root is not None else None
    base = data_dir if data_dir is not None else (Path(root) / folder if root else None)
    missing = [r for r in required if base is None or not (base / r).exists()]
    if missing:
        raise layout_error(name, root, missing, layout, source, download_hint=not download)
