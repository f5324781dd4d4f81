"""A job with the small CNN does not pay for the ImageNet backbones' imports.

``import torchvision`` costs about a second (it pulls in ``torch._dynamo``); a workflow job
of the default grid trains ``SmallCNN`` and never needs it. The backbones import it when
one is built."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_training_the_small_cnn_never_imports_torchvision(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from pml_plugins.cli import main
        code = main([
            "train", {str(REPO / "examples" / "default.yaml")!r}, "--out", {str(tmp_path / "run")!r},
            "--set", "epochs=1", "--set", "dataset.limit_per_class=20", "--set", "batch_size=32",
            "--set", "device=cpu",
        ])
        assert code == 0
        print("torchvision imported:", "torchvision" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert "torchvision imported: False" in done.stdout, done.stdout[-2000:]


def test_the_backbones_still_build_with_torchvision(tmp_path):
    from pml_plugins.models.backbones import GoogLeNet, ResNet50

    assert ResNet50(weights=None).output_size == 2048
    assert GoogLeNet(weights=None).output_size == 1024
    assert "torchvision" in sys.modules
