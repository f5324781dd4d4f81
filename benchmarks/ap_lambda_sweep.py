"""How much the proximal term of Alternating Projections weighs, for a range of lambda.

Trains the AlternatingProjections row of the default grid (config/config.yaml:
the embedded MNIST subset, SmallCNN, MultiSimilarity, 4 classes x 20 samples, T = 10
iterations per projection, 5 epochs) once per lambda and seed, with ``proximal_weight``
replaced, and reports per lambda (mean and min-max over the seeds):

- share: the proximal term's share of the total loss over the run, ``sum P / sum (L + P)``
  over all iterations (P the term, L the base loss; a per-iteration share is 1 where the
  miner finds no pair and L = 0, so its mean would be dominated by those batches);
- median share: the median over the iterations of the recorded ``proximal_share``
  (``P / (L + P)``, 0 at the first batch of each projection);
- grad share: the median over the iterations of ``||lambda (theta - theta_k)|| / ||grad L||``,
  the term's gradient against the base loss's gradient (iterations with L = 0 left out);
- ``||theta - theta_k||^2``, averaged over the iterations;
- the test split's MAP@R and precision@1 of the trained model.

Every iteration is logged (the runner's record-keeper interval is set to 1). Each run
appends a row to ``<out>/runs.csv`` as it finishes; the table is printed as markdown and
written to ``<out>/table.md``.

    nice -n 10 python benchmarks/ap_lambda_sweep.py [--lambdas 0 2e-4 ...] [--seeds 0 1]
        [--dim 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))

import grid  # noqa: E402, the workflow's grid

from pml_plugins.experiment import config as cfg_mod  # noqa: E402
from pml_plugins.experiment import run as run_mod  # noqa: E402
from pml_plugins.trainers import AlternatingProjections

os.environ.setdefault("TQDM_DISABLE", "1")  # PML's trainers and testers print progress bars
GRID = Path(__file__).resolve().parents[1] / "config" / "config.yaml"
ROW = "AlternatingProjections"
LAMBDAS = (0.0, 2e-4, 1e-2, 1e-1, 1.0, 10.0, 100.0)
FIELDS = (
    "lambda",
    "seed",
    "dim",
    "share",
    "median_share",
    "grad_share",
    "squared_distance",
    "map_at_r",
    "precision_at_1",
)


class GradientShare:
    """Measures ``||lambda (theta - theta_k)|| / ||grad L||`` after each backward pass.

    Wraps ``AlternatingProjections.clip_gradients`` (called between ``backward`` and the
    optimiser step, where the parameters still are those of the forward pass): the
    parameters' gradients are ``grad L + lambda (theta - theta_k)``.
    """

    def __init__(self) -> None:
        self.values: list[float] = []
        self._original = AlternatingProjections.clip_gradients

    def __enter__(self) -> GradientShare:
        original, values = self._original, self.values

        def clip_gradients(trainer: AlternatingProjections) -> None:
            term = trainer.proximal_term
            base, prox = 0.0, 0.0
            for p, g in zip(term.tracked_parameters(), term.gradient(), strict=True):
                total = torch.zeros_like(p) if p.grad is None else p.grad.detach()
                base += float((total - g).pow(2).sum())
                prox += float(g.pow(2).sum())
            values.append((prox / base) ** 0.5 if base > 0 else float("nan"))
            original(trainer)

        AlternatingProjections.clip_gradients = clip_gradients
        return self

    def __exit__(self, *exc: object) -> None:
        AlternatingProjections.clip_gradients = self._original


def cell(seed: int, dim: int) -> dict:
    """The grid row's cell of size ``dim`` (its first seed's), with ``seed``."""
    spec = yaml.safe_load(GRID.read_text())
    cells = grid.expand(spec)
    raw = cells[grid.cell_path("mnist_subset", ROW, dim, spec["seeds"][0])]
    return {**raw, "seed": seed}


def read_column(path: Path, column: str) -> np.ndarray:
    with path.open() as f:
        return np.array([float(row[column]) for row in csv.DictReader(f)])


def measure(lam: float, seed: int, dim: int, root: Path) -> dict[str, float]:
    raw = cell(seed, dim)
    raw["trainer"] = {ROW: {**raw["trainer"][ROW], "proximal_weight": lam}}
    out = root / f"lambda{lam:g}_dim{dim}_seed{seed}"
    raw["output"] = str(out)
    prep = run_mod.prepare(cfg_mod.validate(raw), out=out)
    with GradientShare() as grads:
        metrics = run_mod.train_and_evaluate(prep)
    np.savetxt(out / "grad_share.txt", grads.values)
    log = out / "logs" / "proximal_loss_ProximalTerm.csv"
    history = out / "logs" / "loss_histories.csv"
    proximal = read_column(history, "proximal_loss")
    base = np.abs(read_column(history, "metric_loss"))
    test = metrics["trained"]["test"]
    return {
        "lambda": lam,
        "seed": seed,
        "dim": dim,
        "share": float(proximal.sum() / (base + proximal).sum()),
        "median_share": float(np.median(read_column(log, "proximal_share"))),
        "grad_share": float(np.nanmedian(grads.values)),
        "squared_distance": float(read_column(log, "squared_distance").mean()),
        "map_at_r": test["mean_average_precision_at_r"],
        "precision_at_1": test["precision_at_1"],
    }


def table(rows: Sequence[dict[str, float]]) -> str:
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [
        f"seeds {seeds}; mean (min-max) over each row's seeds",
        "",
        "| λ | seeds | share of loss | median share | grad share | mean ‖θ−θ_k‖² "
        "| MAP@R test | P@1 test |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lam in sorted({r["lambda"] for r in rows}):
        group = [r for r in rows if r["lambda"] == lam]
        cells = []
        for key, fmt in (
            ("share", ".2e"),
            ("median_share", ".2e"),
            ("grad_share", ".2e"),
            ("squared_distance", ".3f"),
            ("map_at_r", ".4f"),
            ("precision_at_1", ".4f"),
        ):
            v = np.array([r[key] for r in group])
            cells.append(f"{v.mean():{fmt}} ({v.min():{fmt}}-{v.max():{fmt}})")
        lines.append(f"| {lam:g} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="results (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the grid's `threads: 1`
    run_mod.LOG_FREQ = 1
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = []
        with (root / "runs.csv").open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if f.tell() == 0:
                writer.writeheader()
            for lam in args.lambdas:
                for seed in args.seeds:
                    rows.append(measure(lam, seed, args.dim, root / "runs"))
                    writer.writerow(rows[-1])
                    f.flush()
        text = table(rows)
        (root / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
