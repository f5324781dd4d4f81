"""Evaluation time and peak memory at SOP size: our ``Calculator`` vs PML's default.

    python benchmarks/bench_eval.py [--n 5000 20000 60000] [--dim 512]
        [--variants ours-faiss ours-torch pml-default] [--timeout 900] [--mem-limit-gb 8]
        [--out benchmarks/README.md]

Data: ``N`` L2-normalised embeddings of dimension ``d`` in ``N / 7`` classes (at
N = 60,000: 8,571 classes; Stanford Online Products' test split has 60,502 images in
11,316 classes), Gaussian class centres plus 2.5 x Gaussian noise (MAP@R about 0.4 at
N = 5000), evaluated as SOP is (the query set is the reference set, the query itself
excluded).

Variants:

- ``ours-faiss``: ``pml_plugins.experiment.evaluate.Calculator(clustering=False)``, the
  runner's setting above 5000 classes: ``k = max(max_bin_count, 8)``, exact faiss index.
- ``ours-torch``: the same with :class:`ChunkedKNN` (the fallback without faiss).
- ``pml-default``: PML's ``AccuracyCalculator()``: ``k=None`` (every reference is a
  neighbour, an N x N table) and NMI/AMI (faiss k-means with one cluster per class).

Each measurement runs in its own subprocess (``--child``), so the peak resident memory
(``ru_maxrss``) is that of one evaluation; the table gives it and the part added by the
evaluation (peak minus the resident memory before it: interpreter, torch, the data). A
watchdog polls the child's resident memory (``/proc``) and stops it above
``--mem-limit-gb``, and stops it after ``--timeout`` seconds: such cells read "not run".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("ours-faiss", "ours-torch", "pml-default")
PER_CLASS = 7
#: noise scale around the class centres: MAP@R about 0.4 at N = 5000, like a trained model
NOISE = 2.5


def child(variant: str, n: int, dim: int, threads: int) -> dict:
    """One evaluation in this process; returns seconds and memory in MiB."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from pml_plugins.experiment.evaluate import Calculator, ChunkedKNN

    rng = np.random.default_rng(0)
    labels = np.arange(n) % max(1, n // PER_CLASS)
    centres = rng.standard_normal((labels.max() + 1, dim), dtype=np.float32)
    emb = centres[labels] + NOISE * rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb, labels = torch.from_numpy(emb), torch.from_numpy(labels)
    cpu = torch.device("cpu")
    if variant == "ours-faiss":
        calc = Calculator(clustering=False, device=cpu)
    elif variant == "ours-torch":
        calc = Calculator(clustering=False, device=cpu, knn_func=ChunkedKNN())
    else:
        calc = AccuracyCalculator(device=cpu)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    acc = calc.get_accuracy(emb, labels)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "peak_mib": peak,
        "added_mib": peak - before,
        "map_at_r": float(acc["mean_average_precision_at_r"]),
    }


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(variant: str, n: int, dim: int, threads: int, timeout: float, limit_gb: float):
    """Runs :func:`child` in a subprocess under the watchdog; a dict, or a reason string."""
    cmd = [sys.executable, __file__, "--child", variant, str(n), str(dim), str(threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0, top = time.time(), 0.0
    while proc.poll() is None:
        rss = _rss_mib(proc.pid)
        top = max(top, rss)
        if rss > limit_gb * 1024:
            proc.kill()
            proc.wait()
            return f"not run: > {limit_gb:g} GB after {time.time() - t0:.0f} s"
        if time.time() - t0 > timeout:
            proc.kill()
            proc.wait()
            return f"not run: > {timeout:g} s ({top / 1024:.1f} GB)"
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return f"failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
    return json.loads(out.strip().splitlines()[-1])


def machine(threads: int) -> str:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GB RAM"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import faiss
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, {threads} threads; Python "
        f"{platform.python_version()}, torch {torch.__version__}, faiss {faiss.__version__}"
    )


def table(rows: list[tuple[str, int, object]], dim: int, threads: int) -> str:
    lines = [
        f"### Evaluation at SOP size (d = {dim}, {PER_CLASS} per class, query = reference)",
        "",
        f"Machine: {machine(threads)}. `python benchmarks/bench_eval.py`; one run per cell, in "
        "its own process. Peak: resident memory of that process; added: peak minus the "
        "memory before the evaluation (interpreter, torch, the data).",
        "",
        "| variant | N | classes | seconds | peak RSS (GB) | added (GB) | MAP@R |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, n, res in rows:
        classes = n // PER_CLASS
        if isinstance(res, dict):
            lines.append(
                f"| {variant} | {n} | {classes} | {res['seconds']:.1f} | "
                f"{res['peak_mib'] / 1024:.2f} | {res['added_mib'] / 1024:.2f} | "
                f"{res['map_at_r']:.4f} |"
            )
        else:
            lines.append(f"| {variant} | {n} | {classes} | {res} | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[5000, 20000, 60000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    p.add_argument("--mem-limit-gb", type=float, default=8.0, help="resident memory cap")
    p.add_argument("--out", type=Path, help="append the markdown table to this file")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        variant, n, dim, threads = args.child
        print(json.dumps(child(variant, int(n), int(dim), int(threads))))
        return 0
    rows = []
    for n in args.n:
        for variant in args.variants:
            res = measure(variant, n, args.dim, args.threads, args.timeout, args.mem_limit_gb)
            print(variant, n, res, flush=True)
            rows.append((variant, n, res))
    text = table(rows, args.dim, args.threads)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
