"""The tuned grid end to end through Snakemake: search (2 trials x 2 folds) -> report ->
retrain the best parameters -> fold ensemble -> tables, on the embedded data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.workflow.test_workflow import SNAKEFILE, run_snakemake, write_grid


def tiny_tuned_grid(path: Path) -> Path:
    """test_workflow's tiny grid, smaller still (batches of 2 digits: a training fold may
    hold only 2), one size and one seed, with a search block."""
    path = write_grid(
        path,
        losses={
            "Contrastive": {"loss": {"ContrastiveLoss": {"pos_margin": 0, "neg_margin": 1}}},
            "NRA": {"loss": {"NRALoss": {"alpha": 4}}},
        },
        embedding_sizes=[8],
        search={
            "spaces": {
                "ContrastiveLoss": {"neg_margin": {"float": [0.5, 1.5]}},
                "NRALoss": {"alpha": {"float": [1, 16], "log": True}},
            },
            "folds": 2,
            "trials": 2,
            "startup_trials": 2,
            "pruner": None,
        },
    )
    grid = yaml.safe_load(path.read_text())
    grid["base"].update(
        batch_size=8,
        epochs=1,
        iterations_per_epoch=10,
        dataset={"limit_per_class": 16},
        evaluation={"k_values": [1, 2]},
    )
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_a_tiny_tuned_grid_runs_search_retrain_and_test(tmp_path):
    config = tiny_tuned_grid(tmp_path / "tuned.yaml")
    args = ("--snakefile", SNAKEFILE, "--cores", "2", "--configfile", config)
    proc = run_snakemake(*args, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]

    for label, param in (("Contrastive", "neg_margin"), ("NRA", "alpha")):
        report = tmp_path / "results" / "mnist_subset" / "search" / label / "8"
        best = json.loads((report / "best.json").read_text())
        assert best["budget"] == 2 and best["complete"] == 2 and best["folds"] == 2
        # the folds partition the 5 training digits
        assert sorted(sum(best["fold_classes"], [])) == [0, 1, 2, 3, 4]
        lines = (report / "trials.csv").read_text().splitlines()
        assert len(lines) == 3 and lines[0].startswith("number,state,value,fold0,fold1")
        for png in ("optimization_history.png", "param_importances.png"):
            with Image.open(report / png) as img:
                assert img.size[0] > 400 and img.size[1] > 100

        # every fold of every trial trained and validated without a test split
        folds = sorted((tmp_path / "runs").glob(f"mnist_subset/{label}/8/search/trials/*/fold*"))
        assert len(folds) == 4
        for fold in folds:
            manifest = json.loads((fold / "manifest.json").read_text())
            assert set(manifest["data_sizes"]) == {"train", "val"}
            metrics = json.loads((fold / "metrics.json").read_text())
            assert set(metrics["trained"]) == {"val"}

        # the tuned cell trains the best parameters on all training classes, tested once
        tuned = tmp_path / "runs" / "mnist_subset" / f"{label}+tuned" / "8" / "seed0"
        cfg = yaml.safe_load((tuned / "config.yaml").read_text())
        ((key, value),) = best["params"].items()
        assert key.endswith(param)
        assert next(iter(cfg["loss"].values()))[param] == value
        assert cfg["tuning"]["study"] == f"mnist_subset/{label}/8"
        assert "cross_validation" not in cfg["dataset"]
        assert "test" in json.loads((tuned / "metrics.json").read_text())["trained"]

        ensemble = tmp_path / "runs" / "mnist_subset" / f"{label}+ensemble" / "16" / "seed0"
        metrics = json.loads((ensemble / "metrics.json").read_text())
        assert metrics["embedding_size"] == 16 and len(metrics["members"]) == 2
        assert 0 < metrics["trained"]["test"]["mean_average_precision_at_r"] <= 1

    table = (tmp_path / "results" / "mnist_subset" / "table.md").read_text()
    for row in ("| Contrastive ", "| Contrastive+tuned ", "| NRA+ensemble "):
        assert row in table, table
    # an ensemble of 2 fold models of 8 dimensions is a row of its own size, 16
    assert table.index("embedding size 16") < table.index("| NRA+ensemble ")
    assert "| NRA+ensemble " not in table[: table.index("embedding size 16")]
    assert "How the tuned rows were chosen" in table
    assert "2 trials (2 complete, 0 pruned)" in table
    # the folds of the search are not rows of the table
    assert "ContrastiveLoss" not in table.split("## How")[0]

    again = run_snakemake(*args, "-n", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr
