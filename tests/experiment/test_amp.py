"""Mixed precision through the runner: bf16 autocast on the CPU trains and stays finite."""

from pathlib import Path

import torch
import yaml

from pml_plugins.experiment import run as run_mod
from pml_plugins.experiment.amp import AmpMixin, with_amp

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


def test_with_amp_runs_the_loss_under_autocast():
    seen = {}

    class Trainer:
        data_device = torch.device("cpu")
        losses = {}
        optimizers = {}

        def calculate_loss(self, batch):
            seen["dtype"] = (
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            )

    trainer = with_amp(Trainer, "bf16")()
    assert isinstance(trainer, AmpMixin) and isinstance(trainer, Trainer)
    assert trainer.grad_scaler is None  # a scaler for fp16 only
    trainer.calculate_loss(None)
    assert seen["dtype"] == torch.bfloat16
    assert with_amp(Trainer, "off") is Trainer
    Trainer().calculate_loss(None)
    assert seen["dtype"] is None
    # the class is composed, never an instance's methods rebound
    assert "calculate_loss" not in vars(trainer)


def test_fp16_scales_the_loss_and_steps_through_the_scaler():
    """fp16 (CUDA only in a config; the scaler works on the CPU too): ``backward`` and
    ``step_optimizers`` go through the trainer's ``GradScaler``, composed before any
    data-parallel mixin so that gradients are synced after the scaled backward."""
    from pytorch_metric_learning.trainers import MetricLossOnly

    from pml_plugins.experiment import distributed

    param = torch.nn.Parameter(torch.ones(2))

    class Trainer:
        data_device = "cpu"
        optimizers = {"trunk_optimizer": torch.optim.SGD([param], lr=0.5)}

    trainer = with_amp(Trainer, "fp16")()
    scale = trainer.grad_scaler.get_scale()
    trainer.losses = {"total_loss": param.sum()}
    trainer.backward()
    assert torch.equal(param.grad, torch.full((2,), scale))  # scaled
    trainer.step_optimizers()
    assert torch.equal(param.detach(), torch.full((2,), 0.5))  # unscaled step
    ctx = distributed.Context(world_size=2)
    both = distributed.with_ddp(with_amp(MetricLossOnly, "fp16"), ctx)
    mro = both.__mro__
    assert mro.index(distributed.DistributedMixin) < mro.index(AmpMixin) < mro.index(MetricLossOnly)
