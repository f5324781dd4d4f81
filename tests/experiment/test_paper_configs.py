"""The paper grids under config/: every cell validates, every component, trunk,
optimizer, scheduler and trainer builds without data, the papers' recipes are the ones
docs/methods/ states, and workflow/resources/paper_numbers.csv is well-formed and matches the grids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import grid
import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

from pml_plugins import registry
from pml_plugins.experiment import config as cfg_mod
from pml_plugins.experiment import data, run
from pml_plugins.experiment.datasets import _val_classes
from pml_plugins.models.backbones import POOLINGS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "config"
PAPER_GRIDS = [
    "fair",
    "gradml",
    "nra",
    "loop",
    "ap",
    "metrix_cub200",
    "metrix_cars196",
    "metrix_sop",
    "metrix_inshop",
]
#: training classes of the official splits (docs/datasets.md)
TRAIN_CLASSES = {"cub200": 100, "cars196": 98, "sop": 11318, "inshop": 3997}
WEIGHTS = {
    "ResNet50": torchvision.models.ResNet50_Weights,
    "GoogLeNet": torchvision.models.GoogLeNet_Weights,
}


def _load(name: str) -> dict:
    with open(CONFIGS / f"{name}.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def cells() -> dict[str, dict[str, dict]]:
    """name -> {cell path: validated experiment config}."""
    out = {}
    for name in PAPER_GRIDS:
        expanded = grid.validate_grid(_load(name), check_data=False)  # the workflow's check
        validated: dict[str, dict] = {}  # defaults filled in, once per cell up to seed
        out[name] = {}
        for path, cell in expanded.items():
            key = _key({k: v for k, v in cell.items() if k not in ("seed", "output")})
            if key not in validated:
                validated[key] = cfg_mod.validate(cell, check_data=False)
            out[name][path] = {**validated[key], "seed": cell["seed"], "output": cell["output"]}
    return out


def _key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _n_train(cfg: dict) -> int:
    classes = np.arange(TRAIN_CLASSES[cfg["dataset"]["name"]])
    return len(classes) - len(_val_classes(classes, cfg["dataset"].get("val_classes", 0.0)))


def test_every_paper_grid_is_present_and_expands(cells):
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(PAPER_GRIDS)
    for name, grid_cells in cells.items():
        assert grid_cells, name
        for cfg in grid_cells.values():
            assert cfg["dataset"]["name"] in TRAIN_CLASSES
            root = cfg["dataset"]["root"]
            assert root and not Path(root).is_absolute() and root.startswith("data/")
            assert cfg["device"] == "cuda"


def test_runs_and_results_folders_do_not_collide():
    seen: dict[str, str] = {}
    for name in PAPER_GRIDS:
        g = _load(name)
        assert g["results_dir"] not in seen.values(), name
        seen[name] = g["results_dir"]
    runs = {}
    for name in PAPER_GRIDS:  # one run folder, one config: no two grids share a cell path
        g = _load(name)
        for path in grid.expand(g):
            full = f"{g['runs_dir']}/{path}"
            assert full not in runs, (name, runs.get(full))
            runs[full] = name


def test_components_trunks_optimizers_and_trainers_build_without_data(cells):
    built: set[str] = set()
    trunks: dict[str, dict] = {}  # one build per trunk class, the others' arguments checked
    for grid_cells in cells.values():
        for path, cfg in grid_cells.items():
            name, kwargs = registry.parse_spec(cfg["model"]["trunk"])
            WEIGHTS[name].verify(kwargs["weights"])  # a torchvision weights name
            assert kwargs.get("pooling", "avg") in POOLINGS
            assert isinstance(kwargs.get("freeze_bn", False), bool)
            trunks.setdefault(name, {**kwargs, "weights": None})
            dim = cfg["model"]["embedding_size"]
            key = _key(
                cfg["loss"],
                cfg.get("miner"),
                cfg.get("sampler"),
                cfg["trainer"],
                cfg.get("optimizers"),
                cfg.get("lr_schedulers"),
                cfg["batch_size"],
                cfg["dataset"]["name"],
                dim,
                _n_train(cfg),
            )
            if key in built:
                continue
            built.add(key)
            n = _n_train(cfg)
            labels = np.repeat(np.arange(n), 4)
            dataset = data.ArrayDataset(torch.zeros(len(labels), 4), labels)
            parts = run.build_components(cfg, {"train": dataset})
            models = {"trunk": nn.Linear(4, 4), "embedder": nn.Linear(4, dim)}
            optimizers = run.build_optimizers(cfg, models, parts["loss"])
            schedulers = run.build_schedulers(cfg, optimizers)
            trainer_name, trainer_kwargs = registry.parse_spec(cfg["trainer"])
            registry.build(
                {trainer_name: trainer_kwargs},
                "trainers",
                models=models,
                optimizers=optimizers,
                batch_size=cfg["batch_size"],
                loss_funcs={"metric_loss": parts["loss"]},
                mining_funcs={"tuple_miner": parts["miner"]} if parts["miner"] else {},
                dataset=dataset,
                sampler=parts["sampler"],
                lr_schedulers=schedulers,
            )
            proxies = [p for p in parts["loss"].parameters() if p.requires_grad]
            if proxies:  # proxy losses: one proxy per training class, in the embedding size
                assert proxies[0].shape == (n, dim), path
                assert "metric_loss_optimizer" in optimizers, path
    assert set(trunks) == {"ResNet50", "GoogLeNet"}
    for name, kwargs in trunks.items():
        trunk = registry.build({name: kwargs}, "models")
        with torch.no_grad():
            out = trunk.eval()(torch.zeros(1, 3, 64, 64))
        assert out.shape == (1, trunk.output_size)


def _only(values) -> object:
    values = {json.dumps(v, sort_keys=True) for v in values}
    assert len(values) == 1, values
    return json.loads(values.pop())


def _by(cells: dict, dataset: str | None = None, label: str | None = None) -> list[dict]:
    return [
        c
        for c in cells.values()
        if (dataset is None or c["dataset"]["name"] == dataset)
        and (label is None or c["name"] == label)
    ]


def _lr(cfg: dict, part: str = "trunk") -> float:
    ((_, kwargs),) = cfg["optimizers"][part].items()
    return kwargs["lr"]


def test_fair_grid_is_one_recipe_for_every_loss(cells):
    fair = cells["fair"]
    labels = {c["name"] for c in fair.values()}
    assert labels == {
        "Contrastive",
        "TripletMargin",
        "MultiSimilarity",
        "ProxyAnchor",
        "GradML",
        "NRA",
        "LoOp",
        "Metrix",
        "AlternatingProjections",
    }
    classes = {registry.parse_spec(c["loss"])[0] for c in fair.values()}
    assert {
        "ContrastiveLoss",
        "TripletMarginLoss",
        "MultiSimilarityLoss",
        "ProxyAnchorLoss",
        "GradMLLoss",
        "NRALoss",
        "LoOpLoss",
        "MetrixLoss",
    } <= classes
    assert {c["dataset"]["name"] for c in fair.values()} == set(TRAIN_CLASSES)
    for field in ("model", "batch_size", "epochs", "seed"):
        assert (
            len(
                {
                    _key(c[field])
                    for c in fair.values()
                    if c["seed"] == 0 and c["model"]["embedding_size"] == 512
                }
            )
            == 1
        ), field
    _only(c["optimizers"]["trunk"] for c in fair.values())
    _only((c["dataset"]["image_size"], c["dataset"]["val_classes"]) for c in fair.values())
    assert _only(c["sampler"] for c in fair.values() if c["name"] != "AlternatingProjections") == {
        "MPerClassSampler": {"m": 4}
    }
    ap = _by(fair, label="AlternatingProjections")[0]
    assert registry.parse_spec(ap["trainer"])[0] == "AlternatingProjections"
    assert _by(fair, label="Metrix")[0]["trainer"] == "MetrixTrainer"


def test_nra_recipe(cells):
    nra = cells["nra"]
    assert {c["model"]["embedding_size"] for c in nra.values()} == {64, 512}
    assert {c["name"] for c in nra.values()} == {"NRA", "Triplet", "Lifted", "NPair"}
    for dataset, lr, m in (("cub200", 1e-4, 8), ("cars196", 5e-4, 8), ("sop", 1e-3, 4)):
        for cfg in _by(nra, dataset):
            assert registry.parse_spec(cfg["model"]["trunk"])[0] == "GoogLeNet"
            assert cfg["batch_size"] == 128
            ((opt, kwargs),) = cfg["optimizers"]["trunk"].items()
            assert opt == "SGD" and kwargs["momentum"] == 0.9 and kwargs["lr"] == lr
            assert _lr(cfg, "embedder") == lr
            expected_m = 2 if cfg["name"] == "NPair" else m  # 64 pairs for N-pair
            assert cfg["sampler"] == {"MPerClassSampler": {"m": expected_m}}
    assert _only(c["loss"] for c in _by(nra, label="NRA")) == {
        "NRALoss": {"alpha": 4, "eps": 0.0001}
    }


def test_gradml_recipe(cells):
    for cfg in cells["gradml"].values():
        assert cfg["model"]["trunk"]["ResNet50"]["freeze_bn"] is True
        assert cfg["model"]["embedding_size"] == 512 and cfg["batch_size"] == 32
        assert cfg["optimizers"]["trunk"] == {"Adam": {"lr": 1e-7, "weight_decay": 4e-4}}
        assert cfg["loss"] == {"GradMLLoss": {"k": 2, "w": 1}}
        assert cfg["miner"] == "DisjointQuadrupleMiner"
        assert cfg["sampler"] == {"MPerClassSampler": {"m": 2}}  # 16 classes x 2 = quadruples


def test_loop_recipe(cells):
    loop = cells["loop"]
    bases = {c["loss"]["LoOpLoss"]["base"] for c in loop.values()}
    assert bases == {"hphn_triplet", "triplet", "lifted", "multi_similarity", "npair"}
    for cfg in loop.values():
        assert registry.parse_spec(cfg["model"]["trunk"])[0] == "GoogLeNet"
        assert cfg["optimizers"]["trunk"] == {"Adam": {"lr": 1e-4, "weight_decay": 5e-4}}
        assert cfg["batch_size"] == 128 and cfg["dataset"]["image_size"] == 227
        assert cfg["model"]["embedding_size"] == 512
        assert cfg["lr_schedulers"]["trunk"] == {
            "MultiStepLR": {"milestones": [10, 20, 40, 80], "gamma": 0.5}
        }


def test_ap_recipe(cells):
    ap = cells["ap"]
    assert {c["dataset"]["name"] for c in ap.values()} == {"cub200", "cars196", "sop"}
    for cfg in ap.values():
        with_ap = cfg["name"].endswith("+AP")
        assert (registry.parse_spec(cfg["trainer"])[0] == "AlternatingProjections") == with_ap
        assert (registry.parse_spec(cfg["sampler"])[0] == "RepresentativeSampler") == with_ap
        base = cfg["name"].removesuffix("+AP")
        assert _by(ap, cfg["dataset"]["name"], base)[0]["loss"] == cfg["loss"]


METRIX_LR = {  # (data set, loss family) -> trunk lr, README commands (docs/methods/metrix.md)
    ("cub200", "Contrastive"): 1e-4,
    ("cars196", "Contrastive"): 1e-4,
    ("sop", "Contrastive"): 3e-5,
    ("inshop", "Contrastive"): 3e-5,
    ("cub200", "MS/PA"): 1e-4,
    ("cars196", "MS/PA"): 1e-4,
    ("sop", "MS/PA"): 6e-4,
    ("inshop", "MS/PA"): 6e-4,
}


@pytest.mark.parametrize("dataset", list(TRAIN_CLASSES))
def test_metrix_recipe(cells, dataset):
    metrix = cells[f"metrix_{dataset}"]
    assert {c["dataset"]["name"] for c in metrix.values()} == {dataset}
    assert len(metrix) == 12
    large = dataset in ("sop", "inshop")
    for cfg in metrix.values():
        label = cfg["name"]
        trunk = cfg["model"]["trunk"]["ResNet50"]
        assert trunk["pooling"] == "avg+max" and trunk["freeze_bn"] is (not large)
        assert cfg["batch_size"] == 100 and cfg["model"]["embedding_size"] == 512
        assert cfg["sampler"] == ({"MPerClassSampler": {"m": 5}} if large else None)
        family = "Contrastive" if label.startswith("Contrastive") else "MS/PA"
        lr = METRIX_LR[(dataset, family)]
        if dataset == "inshop" and label == "Contrastive+Metrix":
            lr = 1e-4
        assert _lr(cfg) == lr, label
        if label.startswith("ProxyAnchor"):
            assert _lr(cfg, "loss") == pytest.approx(100 * _lr(cfg))
        epochs = (
            100
            if dataset == "cub200" and label in ("MultiSimilarity+Metrix", "ProxyAnchor+Metrix")
            else 60
        )
        assert cfg["epochs"] == epochs, label
        if "+Metrix" in label:
            spec = cfg["loss"]["MetrixLoss"]
            mode = {"+Metrix": "feature", "+Metrix-input": "input", "+Metrix-embed": "embed"}[
                label[label.index("+") :]
            ]
            assert spec["mode"] == mode and spec["alpha"] == 2 and spec["weight"] == 0.4
            trainer = registry.parse_spec(cfg["trainer"])[0]
            assert trainer == ("MetricLossOnly" if mode == "embed" else "MetrixTrainer")
            inner = spec.get("loss", {})
            if "SoftProxyAnchorLoss" in inner:
                assert inner["SoftProxyAnchorLoss"]["num_classes"] == TRAIN_CLASSES[dataset]


# ------------------------------------------------------------------ paper numbers

PAPER_NUMBERS = ROOT / "workflow" / "resources" / "paper_numbers.csv"
METRICS = {"NMI", "F1"} | {
    f"recall_at_{k}" for k in (1, 2, 4, 8, 10, 16, 20, 30, 32, 40, 50, 100, 1000)
}


def _paper_rows() -> list[dict]:
    with open(PAPER_NUMBERS, newline="") as f:
        return list(csv.DictReader(f))


def test_paper_numbers_are_well_formed():
    with open(PAPER_NUMBERS, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["method", "dataset", "embedding_size", "metric", "value", "source"]
    rows = _paper_rows()
    assert len(rows) > 100
    keys = set()
    for r in rows:
        key = (r["method"], r["dataset"], r["embedding_size"], r["metric"])
        assert key not in keys, key
        keys.add(key)
        assert r["dataset"] in TRAIN_CLASSES and r["metric"] in METRICS
        assert int(r["embedding_size"]) in (64, 512)
        assert 0 < float(r["value"]) < 1  # fractions, as metrics.json
        assert r["source"].split(" (")[0] in ("GradML", "NRA", "Metrix")


def test_paper_numbers_sit_beside_a_grid_that_runs_them(cells):
    runs = set()
    for name in PAPER_GRIDS:
        if _load(name).get("paper_numbers") == "workflow/resources/paper_numbers.csv":
            for cfg in cells[name].values():
                runs.add((cfg["name"], cfg["dataset"]["name"], cfg["model"]["embedding_size"]))
    for r in _paper_rows():
        if r["method"].startswith("GradML_k"):  # GradML's Table 6 sweep: not in a grid
            continue
        assert (r["method"], r["dataset"], int(r["embedding_size"])) in runs, r
    # the k values a grid evaluates cover the paper's metrics
    for name in PAPER_GRIDS:
        for cfg in cells[name].values():
            wanted = {
                int(r["metric"].removeprefix("recall_at_"))
                for r in _paper_rows()
                if r["method"] == cfg["name"]
                and r["dataset"] == cfg["dataset"]["name"]
                and r["metric"].startswith("recall_at_")
            }
            assert wanted <= set(cfg["evaluation"]["k_values"]), (name, cfg["name"])
