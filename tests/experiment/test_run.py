"""One experiment end to end on the embedded data set, through PML's trainer and tester."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

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
    # the figures' points: the trained model's embeddings of (up to 3000) test images
    from pml_plugins.experiment import data, figure_points

    emb, labels = figure_points.read(out)
    test = data.load_splits({"name": "mnist_subset"})["test"]
    assert emb.shape == (min(len(test), 3000), 64) and emb.dtype == np.float32
    assert set(labels.tolist()) == set(test.labels.tolist())
    assert np.isfinite(emb).all() and np.linalg.norm(emb, axis=1).min() > 0


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
    # --resume on a finished run says it is finished and keeps it (test_run_folder.py)
    assert main(["train", str(DEFAULT), "--out", str(out), "--resume", *args]) == 0


#: runs ``pml-plugins train ARGS`` and SIGKILLs itself right after the checkpoint of
#: epoch ``KILL_AFTER_EPOCH`` is written: an interruption synchronised with the checkpoint.
#: It uses the parent's number of torch threads (another count changes the sums' rounding).
KILLED_AFTER_CHECKPOINT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from pml_plugins.cli import main
    from pml_plugins.experiment import run as run_mod

    torch.set_num_threads(int(os.environ["TORCH_THREADS"]))
    save = run_mod.save_checkpoint

    def save_then_die(trainer, hooks, folder, epoch, sampler):
        save(trainer, hooks, folder, epoch, sampler)
        if epoch == int(os.environ["KILL_AFTER_EPOCH"]):
            os.kill(os.getpid(), signal.SIGKILL)

    run_mod.save_checkpoint = save_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


def train_killed_after_epoch(epoch: int, args: list[str]) -> None:
    """``pml-plugins train ARGS`` in a child process killed right after epoch ``epoch``'s
    checkpoint, with this process's number of torch threads."""
    env = {**os.environ, "KILL_AFTER_EPOCH": str(epoch)}
    env["TORCH_THREADS"] = str(torch.get_num_threads())
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_CHECKPOINT, "train", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def final_weights(folder: Path, epoch: int) -> dict[str, torch.Tensor]:
    """The trunk's and embedder's weights of ``epoch``'s checkpoint, read without
    unpickling."""
    out = {}
    for part in ("trunk", "embedder"):
        state = torch.load(folder / "checkpoints" / f"{part}_{epoch}.pth", weights_only=True)
        out.update({f"{part}.{k}": v for k, v in state.items()})
    return out


#: epochs of 4 batches in MPerClassSampler's pass of 6 (200 samples, batches of 32): the
#: checkpoint of epoch 1 falls mid-pass, and the resumed epoch 2 ends that pass and starts
#: the next one
SMALL = {"dataset.limit_per_class": 40, "batch_size": 32, "iterations_per_epoch": 4}
SMALL_EPOCHS = 3


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path, one_thread, capsys):
    """The run killed right after its epoch-1 checkpoint: refused without --resume
    (nothing touched), continued with it, and then bit for bit the uninterrupted run on the
    CPU (metrics and final weights): the resumed run continues the sampler's pass (its
    order, the labels it shuffles in place) with the RNGs of the checkpoint."""
    args = [str(DEFAULT), *sum((["--set", f"{k}={v}"] for k, v in SMALL.items()), [])]
    args += ["--set", f"epochs={SMALL_EPOCHS}"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["train", *args, "--out", str(whole)]) == 0
    train_killed_after_epoch(1, [*args, "--out", str(resumed)])
    assert run_mod.latest_checkpoint(resumed / "checkpoints") == 1
    assert not (resumed / "metrics.json").exists()

    before = snapshot(resumed)
    capsys.readouterr()
    assert main(["train", *args, "--out", str(resumed)]) == 2
    assert "pass --resume to continue" in capsys.readouterr().err
    assert snapshot(resumed) == before

    assert main(["train", *args, "--out", str(resumed), "--resume"]) == 0
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["resumed_from_epoch"] == 1
    assert manifest["epochs_run_this_call"] == SMALL_EPOCHS - 1
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((resumed / "metrics.json").read_text())
    assert a["trained"] == b["trained"] and a["untrained"] == b["untrained"]
    wa, wb = final_weights(whole, SMALL_EPOCHS), final_weights(resumed, SMALL_EPOCHS)
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    # the loss history spans the epochs before and after the interruption
    with open(resumed / "logs" / "loss_histories.csv") as f:
        iterations = [int(r["~iteration~"]) for r in csv.DictReader(f)]
    last = SMALL_EPOCHS * SMALL["iterations_per_epoch"]
    assert min(iterations) <= SMALL["iterations_per_epoch"] and max(iterations) >= last - 5
