"""Utilization (Metrix, ICLR 2022): how close test points lie to training examples."""

from __future__ import annotations

import torch


def _min_sq_dist(query: torch.Tensor, ref: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per query row, the smallest squared Euclidean distance to a row of ``ref``.

    Chunked over both sets, so at most ``chunk_size`` x ``chunk_size`` distances exist at
    once.
    """
    best = torch.full((len(query),), float("inf"), dtype=query.dtype, device=query.device)
    for i in range(0, len(query), chunk_size):
        q = query[i : i + chunk_size]
        q_sq = (q * q).sum(dim=1, keepdim=True)
        for j in range(0, len(ref), chunk_size):
            r = ref[j : j + chunk_size]
            d = q_sq + (r * r).sum(dim=1).unsqueeze(0) - 2 * q @ r.T
            best[i : i + chunk_size] = torch.minimum(
                best[i : i + chunk_size], d.clamp_min(0).min(dim=1).values
            )
    return best


@torch.no_grad()
def utilization(
    query_emb: torch.Tensor,
    train_emb: torch.Tensor,
    mixed_emb: torch.Tensor | None = None,
    normalize: bool = True,
    chunk_size: int = 4096,
) -> dict[str, float | None]:
    r"""Utilization :math:`u(Q, X) = \frac{1}{|Q|} \sum_{q \in Q} \min_{x \in X} \|f(q) - f(x)\|^2`.

    Paper: S. Venkataramanan et al., "It Takes Two to Tango: Mixup for Deep Metric
    Learning", ICLR 2022, https://arxiv.org/abs/2106.04990 (poster/slides). Lower means the
    test embeddings lie closer to training examples. A diagnostic, not a training signal.

    Args:
        query_emb: (Q, d) embeddings of the test set.
        train_emb: (N, d) embeddings of the training set.
        mixed_emb: (M, d) embeddings of mixed training examples, or None.
        normalize: L2-normalise all embeddings first (Metrix compares normalised
            embeddings, as PML's default distances do).
        chunk_size: rows per block; no Q x N matrix is built for large sets.

    Returns:
        ``{"clean": u(Q, X), "with_mixed": u(Q, X ∪ mixed)}``; ``with_mixed`` is None when
        ``mixed_emb`` is None. Whether the paper's numbers count the mixed examples is not
        known, so both are reported (project decision).
    """
    if len(query_emb) == 0 or len(train_emb) == 0:
        raise ValueError("utilization needs a non-empty query set and a non-empty training set")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(query_emb.dtype, torch.float32)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=query_emb.device, dtype=dtype)
        return torch.nn.functional.normalize(x, dim=1) if normalize else x

    query = prep(query_emb)
    clean = _min_sq_dist(query, prep(train_emb), chunk_size)
    out: dict[str, float | None] = {"clean": float(clean.mean()), "with_mixed": None}
    if mixed_emb is not None and len(mixed_emb) > 0:
        mixed = _min_sq_dist(query, prep(mixed_emb), chunk_size)
        out["with_mixed"] = float(torch.minimum(clean, mixed).mean())
    elif mixed_emb is not None:
        out["with_mixed"] = out["clean"]
    return out
