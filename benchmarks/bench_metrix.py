"""MetrixLoss: pair counts, the pair choice's effect, pooled vs map mixing, and speed.

    python benchmarks/bench_metrix.py [--device cpu|cuda] [--repeats 30] [--threads 1]

Prints, for the authors' pair choice (each anchor's first positive, ``positives="first"``)
and for every positive (``"all"``):

- the (anchor, mixed point) pairs and the distinct mixed points, on 5 classes x 16 and on
  32 classes x 4;
- the unweighted mixed soft-MS term at lambda = 0.5 on 5 classes x 16 (random embeddings);
- how far mixing ResNet-50's pooled GAP+GMP vectors is from pooling its mixed layer4 maps
  (random weights, 224 px, lambda = 0.5), as a relative norm;
- forward + backward time (median, ms) of MetrixLoss (embed, MS, default miner) against
  PML's MultiSimilarityLoss alone and with its MultiSimilarityMiner(0.39), B = 128,
  d = 512, and of the mixed term through the Gram-matrix paths against building the mixed
  points (the generic path).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from pml_plugins.losses import MetrixLoss
from pml_plugins.models.backbones import ResNet50

MS = {"alpha": 17.97, "beta": 75.66, "base": 0.77}


def median_ms(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    emb: torch.Tensor,
    labels: torch.Tensor,
    repeats: int,
) -> float:
    """Median forward + backward time of ``loss(emb, labels)``, in milliseconds."""

    def step() -> None:
        loss(emb, labels).backward()
        emb.grad = None

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if emb.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if emb.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def batch(n_classes: int, per_class: int, dim: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_classes * per_class, dim, generator=g).to(device).requires_grad_(True)
    labels = (torch.arange(n_classes * per_class) // per_class).to(device)
    return emb, labels


def pair_choice(device: torch.device) -> None:
    print("## Pair choice\n")
    print("| batch | positives | pairs | mixed points | mixed soft-MS at lambda 0.5 |")
    print("|---|---|---|---|---|")
    for n_classes, per_class in ((5, 16), (32, 4)):
        emb, labels = batch(n_classes, per_class, 64, device)
        for positives in ("first", "all"):
            loss = MetrixLoss(lam=0.5, miner=None, positives=positives, collect_stats=True)
            loss(emb, labels)
            print(
                f"| {n_classes} x {per_class} | {positives} | {loss.num_mixed_pairs} | "
                f"{loss.num_mixed} | {loss.mixed_loss:.3f} |"
            )
    print()


def map_vs_pooled(device: torch.device) -> None:
    torch.manual_seed(0)
    trunk = ResNet50(weights=None, pooling="avg+max").to(device).eval()
    x = torch.randn(2, 3, 224, 224, device=device)
    with torch.no_grad():
        maps = trunk.feature_maps(x)
        mixed_maps = trunk.pool(0.5 * maps[:1] + 0.5 * maps[1:])
        pooled = trunk.pool(maps)
        mixed_pooled = 0.5 * pooled[:1] + 0.5 * pooled[1:]
    rel = (mixed_maps - mixed_pooled).norm() / mixed_maps.norm()
    print("## Feature mode: mixing layer4 maps vs mixing the pooled vectors\n")
    print(
        f"ResNet-50 (random weights), GAP+GMP, 224 px, lambda 0.5: relative difference {rel:.3f}\n"
    )


def speed(device: torch.device, repeats: int) -> None:
    print(f"## Speed, forward + backward, B = 128, d = 512 ({device}, median of {repeats})\n")
    print("| labels | PML MS | PML MS + miner | MetrixLoss | ratio to MS | ratio to MS + miner |")
    print("|---|---|---|---|---|---|")
    miner = MultiSimilarityMiner(epsilon=0.39)
    for n_classes, per_class in ((32, 4), (8, 16)):
        emb, labels = batch(n_classes, per_class, 512, device)
        ms_loss = MultiSimilarityLoss(**MS)
        metrix = MetrixLoss().to(device)
        ms = median_ms(ms_loss, emb, labels, repeats)
        mined = median_ms(lambda e, y, f=ms_loss: f(e, y, miner(e, y)), emb, labels, repeats)
        mx = median_ms(metrix, emb, labels, repeats)
        print(
            f"| {n_classes} x {per_class} | {ms:.2f} | {mined:.2f} | {mx:.2f} | "
            f"{mx / ms:.2f} | {mx / mined:.2f} |"
        )
    print("\nMixed term alone: Gram-matrix path vs building the mixed points (generic path)\n")
    print("| inner loss | labels | positives | mixed points | Gram path | generic path |")
    print("|---|---|---|---|---|---|")
    for name in ("multi_similarity", "contrastive", "proxy_anchor"):
        for n_classes, per_class in ((32, 4), (128, 1)):
            emb, labels = batch(n_classes, per_class, 512, device)
            for positives in ("first", "all"):
                if per_class == 1 and positives == "all":
                    continue  # no positives: the same pairs as "first"
                loss = MetrixLoss(
                    name, positives=positives, num_classes=n_classes, embedding_size=512
                ).to(device)
                pairs = loss.mixing_pairs(labels, emb)

                def gram(e, y, loss=loss, pairs=pairs) -> torch.Tensor:
                    return loss.compute_embed_mixed_loss(e, y, pairs, 0.4)

                def generic(e, y, loss=loss, pairs=pairs) -> torch.Tensor:
                    mixed = loss.build_mixed_embeddings(e, pairs, 0.4)
                    return loss.compute_mixed_loss(e, y, mixed, pairs, 0.4)

                fast = median_ms(gram, emb, labels, repeats)
                slow = median_ms(generic, emb, labels, repeats)
                print(
                    f"| {name} | {n_classes} x {per_class} | {positives} | {pairs.num_points} "
                    f"| {fast:.2f} | {slow:.2f} |"
                )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, ", end="")
    print(f"{args.threads} thread(s)\n")
    pair_choice(device)
    map_vs_pooled(device)
    speed(device, args.repeats)


if __name__ == "__main__":
    main()
