"""The reality check's fold ensemble: the best trial's fold models, evaluated as one.

Each of the ``k`` fold models of the best trial was trained on ``k - 1`` folds of the
training classes. Their embeddings of a test image, each L2-normalised, are concatenated
(``k x d`` dimensions; Musgrave et al., ECCV 2020, §4.2, "concatenated") and evaluated on
the test split by the same tester and calculator as every run. This is the first and only
time the search's models see the test split.

``pml-plugins ensemble BEST_JSON --out RUN_DIR`` writes a run folder (``config.yaml``,
``metrics.json``, ``manifest.json``) that the tables read like any other run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, files, run_folder
from .. import config as cfg_mod
from .. import data as data_mod
from .. import run as run_mod
from . import report


class FoldEnsemble(torch.nn.Module):
    """``x -> [normalize(f_1(x)), ..., normalize(f_k(x))]``, each ``f_i`` a trunk + embedder."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nn.functional.normalize(m(x), dim=1) for m in self.members], 1)


def _member(fold_dir: Path, sample: torch.Tensor) -> torch.nn.Module:
    """A finished fold run's trunk + embedder, from its last checkpoint (``weights_only``)."""
    config = cfg_mod.load(fold_dir / "config.yaml", check_data=False)
    ckpt = fold_dir / "checkpoints"
    epoch = checkpoint.latest(ckpt) if ckpt.is_dir() else 0
    if epoch != config["epochs"] or not (fold_dir / "metrics.json").is_file():
        raise run_mod.RunError(
            f"{fold_dir}: not a finished fold run (last checkpoint: epoch {epoch} of "
            f"{config['epochs']}); finish the search first (pml-plugins search)"
        )
    models = run_mod.build_models(config, sample)
    for name, model in models.items():
        state = torch.load(ckpt / f"{name}_{epoch}.pth", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return torch.nn.Sequential(models["trunk"], models["embedder"]).eval()


def evaluate(best_json: str | Path, out: str | Path, seed: int = 0) -> dict[str, Any]:
    """Evaluate the fold ensemble of ``best_json`` (:mod:`.report`) into run folder ``out``."""
    t0 = time.time()
    best = files.read_json(Path(best_json), "run `pml-plugins search-report` again")
    fold_dirs = [Path(p) for p in best["fold_runs"]]
    config = cfg_mod.load(fold_dirs[0] / "config.yaml", check_data=False)
    config["dataset"].pop("cross_validation")
    config.update(seed=seed, output=str(out))
    # what is evaluated: k members' embeddings side by side (each member: a fold's model)
    config["model"]["embedding_size"] *= len(fold_dirs)
    config["tuning"] = {**report.tuning_record(best), "ensemble": f"{len(fold_dirs)} fold models"}
    out = Path(out)
    if run_mod.check_folder(config, out, resume=True)[1]:
        return run_mod.finished_metrics(out)
    splits = data_mod.load_splits(config["dataset"])  # the test split, read once, here
    eval_splits = {k: v for k, v in splits.items() if k not in ("train", "val")}
    sample = next(iter(eval_splits.values()))[0][0]
    members = [_member(d, sample) for d in fold_dirs]
    device = run_mod.resolve_device(config["device"])
    model = FoldEnsemble(members).to(device)
    plan = [
        (q, refs) for q, refs in data_mod.eval_plan(config["dataset"]["name"], splits) if q != "val"
    ]
    tester = run_mod.make_tester(config, eval_splits, device)
    out.mkdir(parents=True, exist_ok=True)
    with run_folder.locked(out):
        run_mod.seed_everything(seed)
        with torch.no_grad():
            tester.test(eval_splits, config["epochs"], model, torch.nn.Identity(), plan)
        metrics = {
            "trained": run_mod.clean_metrics(tester.all_accuracies),
            "epochs": config["epochs"],
            "eval_plan": [[q, refs] for q, refs in plan],
            "embedding_size": config["model"]["embedding_size"],
            "members": [str(d) for d in fold_dirs],
        }
        prep = run_mod.Prepared(config, eval_splits, out, device)
        cfg_mod.dump(config, out / "config.yaml")
        files.write_json(out / "manifest.json", run_mod.manifest(prep, time.time() - t0, 0))
        files.write_json(out / "metrics.json", metrics)
    return metrics
