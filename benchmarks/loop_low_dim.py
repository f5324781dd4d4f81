"""How often LoOp's optimal hard negative is at distance 0, by embedding size.

LoOp's hard negative of a positive pair i is d*(i, j), the distance between the closest
points of the arc of pair i and the arc of pair j (another class). On the unit circle
(d = 2) two arcs overlap often; where they do, d* = 0 with a zero gradient, and the
HPHN-triplet term [d_ap - min_j d*(i, j) + m]_+ becomes d_ap + m: it pulls the positives
together and pushes no other class away. On random unit embeddings laid out as the default
grid's batches (5 classes x 16, the pairs formed as LoOpLoss forms them), this prints per
embedding size: the share of pairs whose hardest optimal negative is at distance 0, and the
share of the loss gradient's squared norm that flows through the negative distances
(repulsion), for LoOp's d* and for plain HPHN's endpoint negatives.

    python benchmarks/loop_low_dim.py [--batches 100] [--dims 2 3 8 64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pml_plugins.geometry import closest_points_on_arcs
from pml_plugins.losses.loop import form_positive_pairs

MARGIN = 1e-5  # LoOpLoss's HPHN default, the official --margin


def hphn_parts(
    emb: torch.Tensor, labels: torch.Tensor, optimal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_ap, d_an) per positive pair: hardest positive of the two members; hardest
    negative = min over other-class pairs of d* (``optimal``) or of the four endpoint
    distances (plain HPHN)."""
    first, second = form_positive_pairs(labels)
    x1, x2 = emb[first], emb[second]
    if optimal:
        _, _, dist = closest_points_on_arcs(x1[:, None], x2[:, None], x1[None], x2[None])
    else:
        ends = torch.stack([x1, x2], 1)  # (n_p, 2, d)
        dist = torch.cdist(ends[:, None], ends[None].expand(len(first), -1, -1, -1))
        dist = dist.amin((-2, -1))
    other = labels[first][:, None] != labels[first][None]
    d_an = dist.masked_fill(~other, float("inf")).amin(1)
    full = torch.cdist(emb, emb)
    same = labels[:, None] == labels[None]
    d1 = full[first].masked_fill(~same[first], 0).amax(1)
    d2 = full[second].masked_fill(~same[second], 0).amax(1)
    return torch.maximum(d1, d2), d_an


def repulsion_share(emb: torch.Tensor, labels: torch.Tensor, optimal: bool) -> tuple[float, float]:
    """(squared gradient norm through d_an, through d_ap) of the mean HPHN loss."""
    norms = []
    for detach_ap in (True, False):
        e = emb.clone().requires_grad_()
        d_ap, d_an = hphn_parts(e, labels, optimal)
        d_ap, d_an = (d_ap.detach(), d_an) if detach_ap else (d_ap, d_an.detach())
        torch.relu(d_ap - d_an + MARGIN).mean().backward()
        norms.append(float(e.grad.pow(2).sum()))
    return norms[0], norms[1]


def measure(dim: int, batches: int, classes: int = 5, per_class: int = 16) -> dict[str, float]:
    g = torch.Generator().manual_seed(dim)
    labels = torch.arange(classes).repeat_interleave(per_class)
    zero = pairs = 0
    rep = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for _ in range(batches):
        emb = F.normalize(torch.randn(len(labels), dim, generator=g, dtype=torch.float64))
        _, d_an = hphn_parts(emb, labels, optimal=True)
        zero += int((d_an == 0).sum())
        pairs += d_an.numel()
        for optimal in (True, False):
            r, a = repulsion_share(emb, labels, optimal)
            rep[optimal][0] += r
            rep[optimal][1] += a
    return {
        "zero": zero / pairs,
        "loop": rep[True][0] / sum(rep[True]),
        "hphn": rep[False][0] / sum(rep[False]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3, 8, 64])
    args = parser.parse_args()
    print("| d | pairs with hardest d* = 0 | repulsion share, LoOp | repulsion share, HPHN |")
    print("|---:|---:|---:|---:|")
    for dim in args.dims:
        r = measure(dim, args.batches)
        print(f"| {dim} | {r['zero']:.3f} | {r['loop']:.3f} | {r['hphn']:.3f} |")


if __name__ == "__main__":
    main()
