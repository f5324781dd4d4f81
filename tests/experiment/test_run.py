"""One experiment end to end on the embedded data set, through PML's trainer and tester."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pml_plugins.cli import main
from pml_plugins.experiment import run as run_mod

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "examples" / "default.yaml"
QUICK = {"dataset.limit_per_class": 60, "epochs": 1, "batch_size": 32}


def test_default_config_trains_better_than_untrained(tmp_path, capsys):
    """The README's main job: the trained model beats the untrained one on MAP@R."""
    out = tmp_path / "default"
    assert main(["train", str(DEFAULT), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean_average_precision_at_r" in printed and "untrained" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    before = metrics["untrained"]["test"]["mean_average_precision_at_r"]
    after = metrics["trained"]["test"]["mean_average_precision_at_r"]
    assert after > before + 0.1, (before, after)
    for key in ("recall_at_1", "recall_at_8", "NMI", "AMI", "F1", "precision_at_1", "r_precision"):
        assert key in metrics["trained"]["test"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["device"] == "cpu"
    assert manifest["packages"]["pytorch-metric-learning"].startswith("2.9")
    assert set(manifest["data_fingerprint"]) == {"train", "test"}
    # record-keeper wrote its logs; the last epoch's checkpoint exists
    with open(out / "logs" / "loss_histories.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 0 and "total_loss" in rows[0]
    assert (out / "logs" / "logs.db").stat().st_size > 0
    assert (out / "checkpoints" / "trunk_5.pth").exists()
    assert (out / "checkpoints" / "state_5.pth").exists()
    assert (out / "config.yaml").exists()


def test_two_seeded_runs_give_the_same_metrics(tmp_path):
    sets = [f"{k}={v}" for k, v in QUICK.items()]
    args = sum((["--set", s] for s in sets), [])
    assert main(["train", str(DEFAULT), "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["train", str(DEFAULT), "--out", str(tmp_path / "b"), *args]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["trained"] == b["trained"]
    assert (
        main(["train", str(DEFAULT), "--out", str(tmp_path / "c"), *args, "--set", "seed=1"]) == 0
    )
    c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert c["trained"] != a["trained"]


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    args = sum((["--set", f"{k}={v}"] for k, v in QUICK.items()), [])
    out = tmp_path / "r"
    assert main(["train", str(DEFAULT), "--out", str(out), *args]) == 0
    before = (out / "metrics.json").read_bytes()
    assert main(["train", str(DEFAULT), "--out", str(out), *args]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before
    # --resume on a finished run keeps its epochs and rewrites the same numbers
    assert main(["train", str(DEFAULT), "--out", str(out), "--resume", *args]) == 0


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path):
    out = tmp_path / "resumed"
    epochs = 4
    cmd = [
        sys.executable,
        "-m",
        "pml_plugins.cli",
        "train",
        str(DEFAULT),
        "--out",
        str(out),
        "--set",
        f"epochs={epochs}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "state_1.pth").exists():
        assert proc.poll() is None, "training ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    done = run_mod.latest_checkpoint(out / "checkpoints")
    assert 1 <= done < epochs

    # without --resume it refuses and touches nothing
    with pytest.raises(run_mod.RunError, match="--resume"):
        run_mod.run(DEFAULT, out=out, overrides={"epochs": epochs})

    _, metrics = run_mod.run(DEFAULT, out=out, resume=True, overrides={"epochs": epochs})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from_epoch"] == done
    assert manifest["epochs_run_this_call"] == epochs - done
    assert metrics["epochs"] == epochs
    assert run_mod.latest_checkpoint(out / "checkpoints") == epochs
    # the loss history spans the epochs before and after the interruption
    with open(out / "logs" / "loss_histories.csv") as f:
        iterations = [int(r["~iteration~"]) for r in csv.DictReader(f)]
    per_epoch = 2500 // 80 + 1
    assert min(iterations) < per_epoch and max(iterations) >= (epochs - 1) * per_epoch - 1
