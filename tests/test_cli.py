"""The CLI's list, validate and evaluate commands (train is covered by tests/experiment)."""

import json
from pathlib import Path

from pml_plugins import registry
from pml_plugins.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_list_prints_every_kind_and_marks_plugins(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("losses:", "miners:", "samplers:", "trainers:", "optimizers:", "models:"):
        assert kind in out
    lines = {line.strip() for line in out.splitlines()}
    assert "TripletMarginLoss" in lines  # PML built-in, unmarked
    for name in ("GradMLLoss", "NRALoss", "LoOpLoss", "MetrixLoss", "RepresentativeSampler"):
        assert f"{name}  [plugin: pml_plugins]" in lines
    assert len(lines) > len(registry.names("losses"))


def test_list_plugins_only(capsys):
    assert main(["list", "--kind", "losses", "--plugins"]) == 0
    out = capsys.readouterr().out
    assert "NRALoss" in out and "TripletMarginLoss" not in out


def test_validate_reports_each_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: NoSuchLoss\n")
    assert main(["validate", str(ROOT / "examples" / "nra.yaml")]) == 0
    assert "nra.yaml: ok" in capsys.readouterr().out
    assert main(["validate", str(bad)]) == 2
    assert "unknown loss 'NoSuchLoss'" in capsys.readouterr().err


def test_evaluate_prints_a_finished_runs_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    metrics = {
        "untrained": {"test": {"mean_average_precision_at_r": 0.125}},
        "trained": {"test": {"mean_average_precision_at_r": 0.5}},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "0.1250" in out and "0.5000" in out
    assert main(["evaluate", str(tmp_path / "none")]) == 2
    assert "not a finished run folder" in capsys.readouterr().err
