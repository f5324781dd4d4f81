"""Every committed example config trains on the embedded set and beats the untrained model.

One epoch on the full MNIST subset (digits 0-4 train, 5-9 test): MAP@R on the unseen
digits must rise above the untrained model's. The configs are the ones users copy, so
each is run exactly as committed except for the number of epochs.
"""

import json
from pathlib import Path

import pytest

from pml_plugins.experiment import run as run_mod

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_every_method_has_an_example():
    names = {p.stem for p in EXAMPLES}
    for required in ("default", "gradml", "nra", "loop", "metrix", "ap_contrastive"):
        assert required in names


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_trains_better_than_untrained(path, tmp_path):
    out, metrics = run_mod.run(path, out=tmp_path / path.stem, overrides={"epochs": 1})
    before = metrics["untrained"]["test"]["mean_average_precision_at_r"]
    after = metrics["trained"]["test"]["mean_average_precision_at_r"]
    assert after > before + 0.03, (path.stem, before, after)
    assert json.loads((out / "manifest.json").read_text())["epochs"] == 1
