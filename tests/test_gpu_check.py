"""scripts/gpu-check.sh, the check for a lent CUDA machine, in its CPU dry-run mode: every
check runs and passes here, so the script is known to work before a GPU is at hand."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = (
    "GradML",
    "NRA",
    "LoOp",
    "Metrix embed",
    "Metrix feature",
    "Metrix input",
    "Alternating Projections",
    "AMP bf16",
    "DDP torchrun x1",
    "DDP torchrun x2",
    "default example",
)


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.count("|") > 5}
    for name in CHECKS:
        assert "| passed |" in rows[name], rows.get(name)
        assert float(rows[name].split("|")[4]) > 0  # a MAP@R was read from metrics.json
    assert "| not applicable |" in rows["AMP fp16"]
    assert "- device: cpu" in report


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full check applies")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--cpu" in proc.stdout
