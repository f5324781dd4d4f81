"""Forward + backward time of each plugin loss against PML's own losses.

    python benchmarks/bench_losses.py [--device cpu|cuda] [--repeats 20] [--out benchmarks/README.md]

Median over ``--repeats`` timed calls after warm-up, for B in {32, 128, 512} and
d in {64, 512}; labels as from an m-per-class sampler (4 per class). Writes a markdown
table (milliseconds, and the ratio to PML's MultiSimilarityLoss) with the machine it ran on.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from pml_plugins import registry

LOSSES = {
    "TripletMarginLoss (PML)": "TripletMarginLoss",
    "MultiSimilarityLoss (PML)": "MultiSimilarityLoss",
    "GradMLLoss": "GradMLLoss",
    "NRALoss": "NRALoss",
    "LoOpLoss": "LoOpLoss",
    "MetrixLoss (embed, MS)": {"MetrixLoss": {"loss": "multi_similarity", "mode": "embed"}},
    # in feature/input mode the loss itself computes only the clean part (the trainer mixes)
    "MetrixLoss clean part (MS + miner)": {
        "MetrixLoss": {"loss": "multi_similarity", "mode": "feature"}
    },
    "MetrixLoss (embed, contrastive)": {"MetrixLoss": {"loss": "contrastive", "mode": "embed"}},
}
REFERENCE = "MultiSimilarityLoss (PML)"


def time_loss(loss_fn, batch: int, dim: int, device: torch.device, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, dim, generator=g).to(device).requires_grad_(True)
    labels = (torch.arange(batch) // 4).to(device)

    def step():
        loss = loss_fn(emb, labels)
        loss.backward()
        emb.grad = None

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = {}
    for label, spec in LOSSES.items():
        try:
            loss_fn = registry.build(spec).to(device)
        except registry.UnknownComponentError:
            continue
        rows[label] = {
            (b, d): time_loss(loss_fn, b, d, device, args.repeats)
            for b in args.batches
            for d in args.dims
        }
        print(label, {f"B={b},d={d}": round(v, 3) for (b, d), v in rows[label].items()})
    sizes = [(b, d) for b in args.batches for d in args.dims]
    head = "| loss | " + " | ".join(f"B={b}, d={d}" for b, d in sizes) + " |"
    lines = [
        f"Forward + backward, median of {args.repeats} calls, ms (× PML MultiSimilarityLoss); "
        f"torch {torch.__version__}, {machine(device)}.",
        "",
        head,
        "|---" * (len(sizes) + 1) + "|",
    ]
    for label, times in rows.items():
        ref = rows.get(REFERENCE, times)
        cells = [f"{times[s]:.2f} ({times[s] / ref[s]:.2f}×)" for s in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        marker = f"<!-- loss benchmark: {device.type} -->"
        text = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
        if marker in text:
            start = text.index(marker)
            end = text.find("<!-- end -->", start)
            text = text[:start] + text[end + len("<!-- end -->") :]
        text = text.rstrip() + f"\n\n{marker}\n## Losses ({device.type})\n\n{table}\n<!-- end -->\n"
        args.out.write_text(text)


if __name__ == "__main__":
    main()
