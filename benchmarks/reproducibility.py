"""How far the default grid's numbers move between runs, thread counts and machines.

Runs cells of the default grid (config/config.yaml) through ``pml-plugins train``,
as the workflow does, three times each: with 1 thread, again with 1 thread (a rerun on the
same machine), and with 2 threads. For each cell it prints the largest absolute difference
over the trained test metrics (MAP@R, R@1, ..., NMI, F1; in points, i.e. x100) between the
rerun and the first run, between 2 threads and 1, and between this machine and the
committed reference output (results/reference/runs.csv, made on another machine with
1 thread).

    python benchmarks/reproducibility.py [--losses Contrastive ...] [--dims 2 64] [--seeds 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))  # the workflow's grid

import grid as grid_mod  # noqa: E402

BASELINES = ["Contrastive", "TripletMargin", "MultiSimilarity", "ProxyAnchor"]


def train(cell: dict, out: Path, threads: int) -> dict[str, float]:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump({**cell, "output": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["TQDM_DISABLE"] = "1"
    cmd = [sys.executable, "-m", "pml_plugins.cli", "train", str(cfg), "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())["trained"]["test"]
    return {k: float(v) for k, v in metrics.items()}


def reference(path: Path) -> dict[tuple[str, int, int], dict[str, float]]:
    table: dict[tuple[str, int, int], dict[str, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["stage"] == "trained" and row["split"] == "test":
                key = (row["loss"], int(row["embedding_size"]), int(row["seed"]))
                table.setdefault(key, {})[row["metric"]] = float(row["value"])
    return table


def largest_gap(a: dict[str, float], b: dict[str, float]) -> tuple[float, str]:
    gaps = {k: abs(a[k] - b[k]) * 100 for k in a.keys() & b.keys()}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", nargs="+", default=BASELINES)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    grid = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cells = grid_mod.expand(grid)
    ref = reference(REPO / "results/reference/runs.csv")
    print("| cell | rerun, 1 thread | 2 threads vs 1 | vs reference machine |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses:
            for dim in args.dims:
                for seed in args.seeds:
                    path = grid_mod.cell_path("mnist_subset", loss, dim, seed)
                    runs = [
                        train(cells[path], Path(tmp) / f"{loss}_{dim}_{seed}_{tag}", threads)
                        for tag, threads in (("a", 1), ("b", 1), ("c", 2))
                    ]
                    cols = [largest_gap(runs[1], runs[0]), largest_gap(runs[2], runs[0])]
                    if (loss, dim, seed) in ref:
                        cols.append(largest_gap(runs[0], ref[(loss, dim, seed)]))
                    text = [
                        f"{gap:.2f} ({metric})" if gap else "0 (bit-identical)"
                        for gap, metric in cols
                    ]
                    print(f"| {loss} d={dim} seed {seed} | " + " | ".join(text) + " |", flush=True)


if __name__ == "__main__":
    main()
