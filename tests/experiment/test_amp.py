"""Mixed precision through the runner: bf16 autocast on the CPU trains and stays finite."""

from pathlib import Path

import torch
import yaml

from pml_plugins.experiment import run as run_mod
from pml_plugins.experiment.amp import enable_amp

ROOT = Path(__file__).resolve().parents[2]


def test_bf16_run_on_cpu_is_finite(tmp_path):
    overrides = {"amp": "bf16", "epochs": 1, "dataset.limit_per_class": 40, "batch_size": 32}
    out, metrics = run_mod.run(
        ROOT / "examples" / "default.yaml", out=tmp_path / "r", overrides=overrides
    )
    with open(out / "logs" / "loss_histories.csv") as f:
        losses = [float(line.split(",")[-1]) for line in f.readlines()[1:]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert yaml.safe_load((out / "config.yaml").read_text())["amp"] == "bf16"
    assert 0 <= metrics["trained"]["test"]["mean_average_precision_at_r"] <= 1


def test_enable_amp_runs_the_loss_under_autocast():
    seen = {}

    class Trainer:
        losses = {}
        optimizers = {}

        def calculate_loss(self, batch):
            seen["dtype"] = (
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            )

    trainer = Trainer()
    enable_amp(trainer, torch.device("cpu"), "bf16")
    trainer.calculate_loss(None)
    assert seen["dtype"] == torch.bfloat16
    plain = Trainer()
    enable_amp(plain, torch.device("cpu"), "off")
    plain.calculate_loss(None)
    assert seen["dtype"] is None
