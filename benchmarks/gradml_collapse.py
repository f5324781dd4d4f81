"""GradML with k = 2 lets whole classes coincide; with k = 1 they stay apart.

On unit vectors d^2 = 2 - 2 x.y, so with k = 2 GradML's loss
2 mean_P d^2 - 4w mean_N d^2 is linear in the Gram matrix: it is minimised by any layout
whose positive pairs are close and whose *mean* negative similarity is low, which a few
classes pushed far apart can pay for while others merge. This trains examples/gradml.yaml
(the embedded MNIST subset, SmallCNN, 64-d, 5 epochs) with k = 1 and k = 2 for each seed
and prints, on the training split: the largest cosine between two class centroids (1 =
two classes coincide) and MAP@R; and on the test split MAP@R.

    python benchmarks/gradml_collapse.py [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pml_plugins.experiment import checkpoint
from pml_plugins.experiment import config as cfg_mod
from pml_plugins.experiment import run as run_mod
from pml_plugins.experiment.evaluate import Calculator

os.environ.setdefault("TQDM_DISABLE", "1")  # PML's trainers and testers print progress bars
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gradml.yaml"


@torch.no_grad()
def embed(models: dict[str, torch.nn.Module], dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=500)
    out, labels = [], []
    for x, y in loader:
        out.append(models["embedder"](models["trunk"](x)))
        labels.append(torch.as_tensor(y))
    return torch.cat(out), torch.cat(labels)


def largest_centroid_cosine(emb: torch.Tensor, labels: torch.Tensor) -> float:
    emb = F.normalize(emb, dim=1)
    classes = labels.unique()
    centroids = F.normalize(torch.stack([emb[labels == c].mean(0) for c in classes]), dim=1)
    cos = centroids @ centroids.t()
    cos.fill_diagonal_(-1.0)
    return float(cos.max())


def measure(k: float, seed: int, root: Path) -> dict[str, float]:
    config = cfg_mod.load(EXAMPLE, {"loss.GradMLLoss.k": k, "seed": seed, "device": "cpu"})
    out = root / f"k{k:g}_seed{seed}"
    prep = run_mod.prepare(config, out=out)
    metrics = run_mod.train_and_evaluate(prep)
    models = run_mod.build_models(prep.config, prep.splits["train"][0][0])
    ckpt = out / "checkpoints"
    epoch = checkpoint.latest(ckpt)
    for name, model in models.items():
        model.load_state_dict(checkpoint.safe_load(ckpt / f"{name}_{epoch}.pth"))
        model.eval()
    emb, labels = embed(models, prep.splits["train"])
    calc = Calculator(k_values=(1,), clustering=False, include=("mean_average_precision_at_r",))
    train = calc.get_accuracy(emb, labels, ref_includes_query=True)
    return {
        "centroid_cos": largest_centroid_cosine(emb, labels),
        "train_map_r": train["mean_average_precision_at_r"],
        "test_map_r": metrics["trained"]["test"]["mean_average_precision_at_r"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        rows = {k: [measure(k, s, root) for s in args.seeds] for k in (1.0, 2.0)}
    print(f"seeds {args.seeds}; mean (min-max) over seeds")
    print("| k | largest centroid cosine (train) | MAP@R train | MAP@R test |")
    print("|---:|---:|---:|---:|")
    for k, results in rows.items():
        cells = []
        for key in ("centroid_cos", "train_map_r", "test_map_r"):
            v = np.array([r[key] for r in results])
            cells.append(f"{v.mean():.2f} ({v.min():.2f}-{v.max():.2f})")
        print(f"| {k:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
