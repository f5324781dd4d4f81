"""`pml-plugins train` under torchrun (2 CPU processes, gloo) with `distributed: true`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pml_plugins.models import SmallCNN

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "examples" / "default.yaml"


@pytest.mark.slow
def test_torchrun_two_processes_train_and_only_rank_0_evaluates_and_writes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pml_plugins.cli",
        "train",
        str(DEFAULT),
        "--out",
        str(out),
        *("--set", "distributed=true", "--set", "device=cpu", "--set", "epochs=2"),
        *("--set", "dataset.limit_per_class=60", "--set", "batch_size=32"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one evaluation table: rank 1 neither evaluates nor prints metrics
    assert proc.stdout.count("mean_average_precision_at_r") == 1, proc.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    trained = metrics["trained"]["test"]
    assert {"mean_average_precision_at_r", "recall_at_1", "NMI"} <= set(trained)
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    # checkpoints hold the plain state dicts (no DDP "module." prefix): a single-process
    # run or a resume loads them as they are
    state = torch.load(out / "checkpoints" / "trunk_2.pth", weights_only=True)
    assert set(state) == set(SmallCNN(width=32).state_dict())
    # 300 training samples, 2 ranks x 32 per batch: 4 iterations per epoch and rank, so
    # record-keeper (every 5th iteration) logs iteration 0 of each of the 2 epochs
    with open(out / "logs" / "loss_histories.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 2
