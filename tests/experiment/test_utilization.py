"""Utilization (Metrix) against a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from pml_plugins.experiment.utilization import utilization


def naive_u(query, ref, normalize=True):
    def prep(v):
        if not normalize:
            return v
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    total = 0.0
    for q in query.tolist():
        q = prep(q)
        total += min(
            sum((a - b) ** 2 for a, b in zip(q, prep(r), strict=True)) for r in ref.tolist()
        )
    return total / len(query)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 4096])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_naive_any_chunking(chunk_size, normalize):
    g = torch.Generator().manual_seed(0)
    q, x, m = (torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (11, 17, 9))
    out = utilization(q, x, m, normalize=normalize, chunk_size=chunk_size)
    assert out["clean"] == pytest.approx(naive_u(q, x, normalize), rel=1e-9)
    assert out["with_mixed"] == pytest.approx(naive_u(q, torch.cat([x, m]), normalize), rel=1e-9)
    assert out["with_mixed"] <= out["clean"]


def test_without_mixed_and_edge_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g)
    out = utilization(x, x)
    assert out["clean"] == pytest.approx(0.0, abs=1e-6) and out["with_mixed"] is None
    assert utilization(x, x, x[:0])["with_mixed"] == out["clean"]
    # a mixed point on top of every query brings with_mixed to 0
    q = torch.randn(5, 4, generator=g)
    far = utilization(q, -q, q.clone())
    assert far["clean"] > 1.0 and far["with_mixed"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        utilization(q[:0], x)
    with pytest.raises(ValueError):
        utilization(q, x, chunk_size=0)
