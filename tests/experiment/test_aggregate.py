"""Aggregation: tidy CSV, mean ± t-CI over seeds, tables with paper numbers, plots."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pml_plugins.experiment import aggregate as agg
from pml_plugins.experiment import config as cfg_mod
from pml_plugins.experiment import data as data_mod
from pml_plugins.experiment import figure_points
from pml_plugins.experiment import run as run_mod

#: two-sided 95% quantiles of Student's t (statistical tables), by degrees of freedom
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}


def write_run(
    root: Path,
    label: str,
    dim: int,
    seed: int,
    trained: dict[str, float],
    untrained: dict[str, float],
    loss: object = "NRALoss",
    dataset: str = "digits",
    layout: bool = True,
    history: list[tuple[int, float]] | None = None,
) -> Path:
    folder = root / dataset / label / str(dim) / f"seed{seed}" if layout else root / label
    folder.mkdir(parents=True)
    config = cfg_mod.validate(
        {
            "loss": loss,
            "dataset": {"name": dataset},
            "model": {"embedding_size": dim},
            "seed": seed,
            "epochs": 1,
        }
    )
    cfg_mod.dump(config, folder / "config.yaml")
    metrics = {"untrained": {"test": untrained}, "trained": {"test": trained}, "epochs": 1}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if history:
        (folder / "logs").mkdir()
        with open(folder / "logs" / "loss_histories.csv", "w") as f:
            f.write("~iteration~,metric_loss,total_loss\n")
            for it, value in history:
                f.write(f"{it},{value},{value}\n")
    return folder


def metrics_of(r1: float, map_r: float) -> dict[str, float]:
    return {
        "recall_at_1": r1,
        "recall_at_2": min(1.0, r1 + 0.1),
        "mean_average_precision_at_r": map_r,
        "NMI": 0.5,
    }


@pytest.fixture
def runs(tmp_path) -> Path:
    root = tmp_path / "runs"
    # NRA: three seeds at 64-D; MS: two seeds; untrained values differ per seed only
    for seed, (r1, mapr) in enumerate([(0.5, 0.20), (0.6, 0.30), (0.7, 0.40)]):
        write_run(
            root,
            "NRA",
            64,
            seed,
            metrics_of(r1, mapr),
            metrics_of(0.1 * (seed + 1), 0.01),
            history=[(0, 2.0), (50, 1.5), (100, 1.0 + seed / 10)],
        )
    for seed, (r1, mapr) in enumerate([(0.8, 0.25), (0.9, 0.35)]):
        write_run(
            root,
            "MS",
            64,
            seed,
            metrics_of(r1, mapr),
            metrics_of(0.1 * (seed + 1), 0.01),
            loss={"MultiSimilarityLoss": {"alpha": 2}},
            history=[(0, 3.0), (50, 2.0)],
        )
    write_run(root, "NRA", 2, 0, metrics_of(0.3, 0.1), metrics_of(0.1, 0.01))
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tidy_csv_holds_every_run_split_stage_and_metric(runs, tmp_path):
    out = tmp_path / "results"
    written = agg.aggregate(runs, out, tables=False)
    assert written == [out / "runs.csv", out / "summary.csv", out / "comparisons.csv"]
    rows = read_csv(out / "runs.csv")
    assert list(rows[0]) == list(agg.RUN_COLUMNS)
    assert len(rows) == 6 * 2 * 4  # runs x stages x metrics (one split)
    for folder in runs.rglob("metrics.json"):
        metrics = json.loads(folder.read_text())
        _, label, dim, seed = folder.parent.relative_to(runs).parts
        for stage in ("untrained", "trained"):
            for metric, value in metrics[stage]["test"].items():
                match = [
                    r
                    for r in rows
                    if (r["loss"], r["embedding_size"], r["seed"], r["stage"], r["metric"])
                    == (label, dim, seed[4:], stage, metric)
                ]
                assert len(match) == 1
                assert float(match[0]["value"]) == pytest.approx(value)
                assert match[0]["dataset"] == "digits" and match[0]["split"] == "test"


def test_summary_mean_and_t_interval_over_seeds(runs, tmp_path):
    agg.aggregate(runs, tmp_path / "r", tables=False)
    rows = read_csv(tmp_path / "r" / "summary.csv")

    def get(loss, dim, stage, metric):
        (row,) = [
            r
            for r in rows
            if (r["loss"], r["embedding_size"], r["stage"], r["metric"])
            == (loss, str(dim), stage, metric)
        ]
        return row

    values = [0.5, 0.6, 0.7]
    row = get("NRA", 64, "trained", "recall_at_1")
    assert int(row["n"]) == 3
    assert float(row["mean"]) == pytest.approx(statistics.mean(values))
    half = T975[2] * statistics.stdev(values) / math.sqrt(3)
    assert float(row["ci95"]) == pytest.approx(half, rel=1e-6)
    row = get("MS", 64, "trained", "mean_average_precision_at_r")
    half = T975[1] * statistics.stdev([0.25, 0.35]) / math.sqrt(2)
    assert float(row["ci95"]) == pytest.approx(half, rel=1e-6)
    row = get("NRA", 2, "trained", "recall_at_1")  # one seed: no interval
    assert int(row["n"]) == 1 and math.isnan(float(row["ci95"]))
    # untrained baseline: per seed the mean over that seed's runs, then over seeds 0, 1, 2
    row = get(agg.UNTRAINED, 64, "untrained", "recall_at_1")
    per_seed = [0.1, 0.2, 0.3]
    assert int(row["n"]) == 3
    assert float(row["mean"]) == pytest.approx(statistics.mean(per_seed))
    assert float(row["ci95"]) == pytest.approx(
        T975[2] * statistics.stdev(per_seed) / math.sqrt(3), rel=1e-6
    )


def test_table_marks_the_best_and_shows_untrained_and_paper_numbers(runs, tmp_path):
    paper = tmp_path / "paper.csv"
    paper.write_text(
        "method,dataset,embedding_size,metric,value,source\n"
        "NRA,digits,64,R@1,57.6,Schall et al. 2019 (Table I)\n"
        "NRALoss,digits,64,MAP@R,12.3,Someone 2020\n"
        "Other,digits,64,recall_at_2,80.0,Other 2021\n"
        "NRA,cub200,64,R@1,99.0,not this data set\n"
    )
    agg.aggregate(runs, tmp_path / "r", paper_numbers=paper)
    text = (tmp_path / "r" / "digits" / "table.md").read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert header.split(" | ")[1:4] == ["R@1", "R@2", "MAP@R"]

    def row(prefix: str, section: str) -> list[str]:
        start = lines.index(section)
        line = next(x for x in lines[start:] if x.startswith(f"| {prefix}"))
        return [c.strip() for c in line.strip("|").split("|")]

    sec64 = "## test split, embedding size 64"
    nra = row("NRA |", sec64)
    half = T975[2] * statistics.stdev([0.5, 0.6, 0.7]) / math.sqrt(3)
    assert nra[1] == f"{60.0:.2f} ± {100 * half:.2f}"
    ms = row("MS |", sec64)
    # MS has the best R@1 (85 vs 60, 30 points above NRA in both shared seeds: NRA not
    # bold); MAP@R: equal means (30 vs 30): both bold
    assert ms[1].startswith("**85.00 ±") and not nra[1].startswith("**")
    assert nra[3].startswith("**30.00 ±") and ms[3].startswith("**30.00 ±")
    untrained = row(agg.UNTRAINED, sec64)
    assert untrained[1].startswith("20.00 ±") and "**" not in " ".join(untrained)
    # papers' numbers: by label or by class name, with their source, in %
    schall = row("*paper*: NRA (Schall", sec64)
    assert schall[1] == "57.6" and schall[3] == "–"
    someone = row("*paper*: NRALoss (Someone", sec64)
    assert someone[3] == "12.3"
    assert row("*paper*: Other", sec64)[2] == "80.0"
    assert "not this data set" not in text
    # the paper rows follow the NRA row
    assert lines.index("| " + " | ".join(schall) + " |") > lines.index(
        "| " + " | ".join(nra) + " |"
    )
    sec2 = "## test split, embedding size 2"
    assert row("NRA |", sec2)[1] == "**30.00**"


def test_plots_are_valid_images(runs, tmp_path):
    out = tmp_path / "r"
    written = agg.aggregate(runs, out)
    for name in ("recall_at_k", "heatmap_map_at_r", "heatmap_recall_at_1", "training_curves"):
        path = out / "digits" / f"{name}.png"
        assert path in written
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size[0] >= 300 and img.size[1] >= 150
            # not a blank canvas
            assert len(np.unique(np.asarray(img.convert("L")))) > 10
        assert path.stat().st_size > 5000
    # a 2-D run without checkpoints: the scatter file says so (the workflow declares it)
    with Image.open(out / "digits" / "scatter_2d.png") as img:
        assert img.format == "PNG"


def test_loss_label_falls_back_to_the_class_name_outside_the_layout(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "somewhere", 8, 0, metrics_of(0.5, 0.2), metrics_of(0.1, 0.1), layout=False)
    runs = agg.find_runs(root)
    assert [(r.loss, r.embedding_size, r.seed) for r in runs] == [("NRALoss", 8, 0)]


def test_no_runs_is_an_error_that_the_cli_reports(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished runs") as info:
        agg.aggregate(tmp_path / "empty", tmp_path / "out")
    assert str(info.value).endswith(f"in {tmp_path / 'empty'}")  # the folder, named
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pml_plugins.cli",
            "aggregate",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("pml-plugins: error:") and "no finished runs" in proc.stderr


def test_malformed_paper_numbers_name_the_problem(runs, tmp_path):
    bad = tmp_path / "paper.csv"
    bad.write_text("method,dataset,metric,value\nNRA,digits,R@1,50\n")
    with pytest.raises(cfg_mod.ConfigError, match="embedding_size"):
        agg.aggregate(runs, tmp_path / "r", paper_numbers=bad)
    bad.write_text("method,dataset,embedding_size,metric,value,source\nNRA,digits,64,R@1,high,x\n")
    with pytest.raises(cfg_mod.ConfigError, match="line 2"):
        agg.aggregate(runs, tmp_path / "r", paper_numbers=bad)


def test_paper_numbers_given_as_fractions_are_read_as_percentages(tmp_path):
    path = tmp_path / "paper.csv"
    path.write_text(
        "method,dataset,embedding_size,metric,value,source\n"
        "GradML,CUB200,512,recall_at_1,0.547,Table 3\n"
        "GradML,cub200,512,NMI,1.0,Table 3\n"
    )
    rows = agg.read_paper_numbers(path)
    assert [(r["dataset"], r["metric"], r["value"]) for r in rows] == [
        ("cub200", "recall_at_1", pytest.approx(54.7)),
        ("cub200", "NMI", pytest.approx(100.0)),
    ]


@pytest.mark.parametrize(
    "name, ours",
    [
        ("R@1", "recall_at_1"),
        ("Recall@16", "recall_at_16"),
        ("recall_at_4", "recall_at_4"),
        ("MAP@R", "mean_average_precision_at_r"),
        ("NMI", "NMI"),
        ("f1", "F1"),
        ("P@1", "precision_at_1"),
    ],
)
def test_paper_metric_names(name, ours):
    assert agg.canonical_metric(name) == ours


def test_scatter_draws_the_embeddings_the_run_wrote(tmp_path):
    """A 2-D run folder with the trained model's embeddings of the query split (what
    ``train`` writes, :mod:`pml_plugins.experiment.figure_points`): the scatter draws
    exactly those, without a checkpoint or the data."""
    root = tmp_path / "runs"
    folder = write_run(root, "NRA", 2, 0, metrics_of(0.5, 0.2), metrics_of(0.1, 0.1))
    (run,) = agg.find_runs(root)
    splits = data_mod.load_splits(run.config["dataset"])
    torch.manual_seed(3)
    models = run_mod.build_models(run.config, splits["train"][0][0])
    figure_points.write(folder, *figure_points.embed(models, splits["test"], "cpu"), "test")

    emb, labels = agg.embed_test_split(run)
    test = splits["test"]
    for model in models.values():
        model.eval()
    with torch.no_grad():
        expected = models["embedder"](models["trunk"](test.images)).numpy()
    assert emb.shape == (len(test), 2)
    np.testing.assert_array_equal(labels, test.labels)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    # the scatter plots these embeddings as the evaluation sees them: L2-normalised
    (panel,) = agg.scatter_panels([run], "digits", "test")
    np.testing.assert_allclose(np.linalg.norm(panel.xy, axis=1), 1.0, rtol=1e-6)
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(panel.xy, unit, rtol=1e-4, atol=1e-5)
    assert panel.seed == 0 and panel.recall_at_1 == 0.5

    written = agg.aggregate(root, tmp_path / "r")
    scatter = tmp_path / "r" / "digits" / "scatter_2d.png"
    assert scatter in written
    with Image.open(scatter) as img:
        assert img.size[0] >= 300 and len(np.unique(np.asarray(img.convert("L")))) > 10


def test_each_runs_config_is_copied_beside_the_tables(runs, tmp_path):
    out = tmp_path / "r"
    written = agg.aggregate(runs, out)
    copied = out / "digits" / "runs" / "NRA" / "64" / "seed2" / "config.yaml"
    assert copied in written
    assert (
        copied.read_bytes()
        == (runs / "digits" / "NRA" / "64" / "seed2" / "config.yaml").read_bytes()
    )
    assert len(list((out / "digits" / "runs").rglob("config.yaml"))) == 6
