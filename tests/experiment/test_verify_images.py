"""Damaged images are found before training, on the miniature trees of the four image data
sets: named with their path, all counted, nothing written; a verified image list is
remembered in the user's cache folder (never the data folder) and not decoded again."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from pml_plugins.cli import main
from pml_plugins.experiment.datasets import CorruptImagesError, load_splits, verify
from tests.datatrees import Tree, make_tree

SIZE = 16
DATASETS = ("cub200", "cars196", "sop", "inshop")


def _random(data: bytes) -> bytes:
    return np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "random-bytes": _random,
    "zero-bytes": lambda data: bytes(len(data)),
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
}


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own (``$XDG_CACHE_HOME``)."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The paths decoded, in the order decoded (the pool is used: 3 images per task)."""
    seen: list[str] = []
    decode = verify.decode_error

    def counting(path: str) -> str | None:
        seen.append(path)
        return decode(path)

    monkeypatch.setattr(verify, "decode_error", counting)
    monkeypatch.setattr(verify, "CHUNK", 3)
    return seen


def _corrupt(path: Path, how: str) -> None:
    path.write_bytes(CORRUPTIONS[how](path.read_bytes()))


def _tree(name: str, folder: Path) -> Tree:
    return make_tree(name, folder / name)


@pytest.mark.parametrize("how", list(CORRUPTIONS))
@pytest.mark.parametrize("name", DATASETS)
def test_a_damaged_image_is_named(tmp_path, name, how):
    tree = _tree(name, tmp_path)
    bad = tree.images[-1]  # an evaluation image: every split is checked, not only train
    _corrupt(bad, how)
    with pytest.raises(CorruptImagesError) as err:
        load_splits(tree.config(image_size=SIZE))
    message = str(err.value)
    assert message.startswith(f"{bad}: cannot decode image (")
    assert message.endswith("; replace the file or re-extract the archive")
    assert "\n" not in message


def test_every_bad_image_is_counted(tmp_path):
    tree = _tree("cub200", tmp_path)
    bad = [tree.images[i] for i in (0, 5, 9)]
    for path, how in zip(bad, ("random-bytes", "zero-bytes", "truncated"), strict=True):
        _corrupt(path, how)
    with pytest.raises(CorruptImagesError) as err:
        load_splits(tree.config(image_size=SIZE))
    message = str(err.value)
    n = len(tree.images)
    assert message.startswith(f"{bad[0]}: cannot decode image")
    assert f"(3 of the {n} cub200 images cannot be decoded; the others: {bad[1]}, {bad[2]})" in (
        message
    )


def test_more_bad_images_than_shown_are_counted():
    bad = [(f"/data/{i}.jpg", "cannot identify image file") for i in range(9)]
    message = verify.error_message("sop", bad, 100)
    assert "(9 of the 100 sop images cannot be decoded; the others: /data/1.jpg" in message
    assert "/data/5.jpg and 3 more)" in message and "/data/6.jpg" not in message


def test_a_verified_list_is_not_decoded_again(tmp_path, decodes, cache_home):
    tree = _tree("sop", tmp_path)
    config = tree.config(image_size=SIZE)
    load_splits(config)
    assert sorted(decodes) == sorted(map(str, tree.images))
    entries = list((cache_home / "pml-plugins" / "verified-images").iterdir())
    assert len(entries) == 1

    decodes.clear()
    load_splits(config)
    assert decodes == []

    # a file changed in place (new modification time) makes the list new: decoded again
    os.utime(tree.images[0], ns=(1, 1))
    load_splits(config)
    assert len(decodes) == len(tree.images)


def test_a_failed_check_is_not_remembered(tmp_path, decodes):
    tree = _tree("inshop", tmp_path)
    good = tree.images[2].read_bytes()
    _corrupt(tree.images[2], "truncated")
    with pytest.raises(CorruptImagesError):
        load_splits(tree.config(image_size=SIZE))
    tree.images[2].write_bytes(good)  # the file replaced, as the message says
    decodes.clear()
    load_splits(tree.config(image_size=SIZE))
    assert len(decodes) == len(tree.images)


def _read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_a_read_only_data_folder_is_verified_and_left_as_it_was(tmp_path, decodes, cache_home):
    """The cache lives outside the data folder. (As root, the write bits do not stop a
    write; the listing before and after is what shows that nothing was added.)"""
    tree = _tree("cars196", tmp_path)
    before = sorted(p.relative_to(tree.root) for p in tree.root.rglob("*"))
    _read_only(tree.root)
    try:
        load_splits(tree.config(image_size=SIZE))
        decodes.clear()
        load_splits(tree.config(image_size=SIZE))
        assert decodes == []  # remembered, though nothing could be written beside the data
    finally:
        _writable(tree.root)
    assert sorted(p.relative_to(tree.root) for p in tree.root.rglob("*")) == before
    assert list((cache_home / "pml-plugins" / "verified-images").iterdir())


def test_train_on_a_damaged_tree_fails_before_anything_is_written(tmp_path, capsys):
    tree = _tree("cub200", tmp_path)
    _corrupt(tree.images[3], "random-bytes")
    config = {
        "dataset": tree.config(image_size=SIZE),
        "model": {"trunk": {"SmallCNN": {"width": 4}}, "embedding_size": 4},
        "loss": "ContrastiveLoss",
        "batch_size": 4,
        "epochs": 1,
        "device": "cpu",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"pml-plugins: error: dataset.root: {tree.images[3]}: cannot decode image "
        f"(cannot identify image file); replace the file or re-extract the archive"
    ]
    assert not out.exists()
