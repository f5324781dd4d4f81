"""Job start-up: from process start to the end of the first training batch, by phase.

Runs ``pml-plugins train`` on one cell of the default grid (config/config.yaml:
the embedded MNIST subset, SmallCNN width 16, batch 80) in a fresh process, as a workflow
job does, with one thread, and reports the wall time at which each phase ended, measured
in the child from the moment the parent started it: imports done, data loaded, untrained
network evaluated, first batch trained (forward + backward + step). Repeated ``--repeat``
times; the median is printed.

    python benchmarks/bench_startup.py [--cell MultiSimilarity/64/seed0] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
T0 = float(os.environ["BENCH_T0"])
marks = {}
def mark(name):
    marks.setdefault(name, time.time() - T0)
from pml_plugins.cli import main
from pml_plugins.experiment import data, run
from pytorch_metric_learning.trainers import BaseTrainer
mark("imports")
def timed(fn, name):
    def wrapper(*a, **k):
        out = fn(*a, **k)
        mark(name)
        return out
    return wrapper
data.load_splits = timed(data.load_splits, "data")
run.untrained_metrics = timed(run.untrained_metrics, "untrained evaluation")
step = BaseTrainer.step_optimizers
def timed_step(self):
    step(self)
    mark("first batch")
    print("BENCH " + json.dumps(marks), flush=True)
    os._exit(0)
BaseTrainer.step_optimizers = timed_step
main(sys.argv[1:])
"""


def once(cfg: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env["BENCH_T0"] = repr(time.time())
    args = [sys.executable, "-c", CHILD, "train", str(cfg), "--out", str(out)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH "))
    return json.loads(line[len("BENCH ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="MultiSimilarity/64/seed0")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "workflow" / "scripts")]
    import grid as grid_mod

    cells = grid_mod.expand(yaml.safe_load((REPO / "config/config.yaml").read_text()))
    cell = cells[f"mnist_subset/{args.cell}"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            out = Path(tmp) / f"run{i}"
            cfg = Path(tmp) / f"cell{i}.yaml"
            cfg.write_text(yaml.safe_dump({**cell, "output": str(out)}))
            results.append(once(cfg, out))
    print(f"cell {args.cell}, {args.repeat} fresh processes, median seconds since process start:")
    for phase in results[0]:
        print(f"  {phase:22s} {statistics.median(r[phase] for r in results):6.2f}")


if __name__ == "__main__":
    main()
