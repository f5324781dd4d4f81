"""Checks of PML's loss contract, shared by the tests of every plugin loss.

Each function takes a zero-argument ``make_loss`` factory (a fresh loss per call, so
that stateful losses do not leak between checks) and asserts one part of the contract
that PML's own losses keep:

- ``check_labels_vs_indices_tuple``: a miner's tuples given as ``indices_tuple`` give the
  same loss as the same pairs reached through labels where the loss is all-pairs;
- ``check_empty_and_single_class``: a batch with nothing to learn from gives a finite
  zero (or the documented constant), never NaN;
- ``check_finite_edge_cases``: coincident / collapsed / tiny batches have finite loss and
  finite gradients;
- ``check_gradcheck``: ``torch.autograd.gradcheck`` in float64, at an input that
  ``kink_free`` finds away from every branch switch of the loss;
- ``check_ref_emb``: ``ref_emb``/``ref_labels`` equal to the batch itself give the same
  loss as no ``ref_emb`` where the loss treats self-pairs the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction

LossFactory = Callable[[], BaseMetricLossFunction]


def random_batch(
    batch_size: int = 16,
    dim: int = 8,
    n_classes: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    requires_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and labels with every class present at least twice where possible."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch_size, dim, generator=g, dtype=dtype)
    labels = torch.arange(batch_size) % n_classes
    labels = labels[torch.randperm(batch_size, generator=g)]
    return emb.requires_grad_(requires_grad), labels


def assert_finite_loss_and_grad(
    loss_fn: BaseMetricLossFunction, emb: torch.Tensor, labels: torch.Tensor, **kwargs
) -> torch.Tensor:
    emb = emb.detach().clone().requires_grad_(True)
    loss = loss_fn(emb, labels, **kwargs)
    assert loss.dim() == 0, f"loss must be a scalar, got shape {tuple(loss.shape)}"
    assert torch.isfinite(loss), f"non-finite loss {loss}"
    loss.backward()
    if emb.grad is not None:
        assert torch.isfinite(emb.grad).all(), "non-finite gradient"
    return loss.detach()


def check_empty_and_single_class(make_loss: LossFactory, dim: int = 8) -> None:
    """Empty batch -> 0; one class only -> finite, and 0 where no negative exists."""
    empty = torch.zeros(0, dim, dtype=torch.float64, requires_grad=True)
    loss = make_loss()(empty, torch.zeros(0, dtype=torch.long))
    assert torch.isfinite(loss) and loss.item() == 0.0
    emb, _ = random_batch(8, dim)
    assert_finite_loss_and_grad(make_loss(), emb, torch.zeros(8, dtype=torch.long))


def check_finite_edge_cases(make_loss: LossFactory, dim: int = 8) -> None:
    """All equal, two coincident samples, one-sample class, batch of two, float32."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    same = torch.ones(7, dim, dtype=torch.float64)
    assert_finite_loss_and_grad(make_loss(), same, labels)
    emb, _ = random_batch(7, dim)
    emb = emb.detach().clone()
    emb[1] = emb[0]
    assert_finite_loss_and_grad(make_loss(), emb, labels)
    assert_finite_loss_and_grad(make_loss(), emb[:2], torch.tensor([0, 1]))
    assert_finite_loss_and_grad(make_loss(), emb.float(), labels)


def kink_free(
    f: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    radius: float = 1e-5,
    rtol: float = 1e-2,
) -> bool:
    """Whether ``f`` (float64) is smooth within ``radius`` of ``inputs`` along every coordinate.

    The losses are piecewise smooth: hinges, hardest-example choices, mining thresholds and
    the closest-point solvers' choice between candidates switch branch at some inputs.
    Where such a switch lies within gradcheck's step (1e-6) of the input, the numerical
    derivative mixes two slopes, and which branch the analytical one takes is decided by
    the CPU's rounding. ``radius`` is ten times that step.

    The test compares the second difference quotient
    ``S(h) = (f(x + h) - 2 f(x) + f(x - h)) / h**2`` at ``h = radius`` and ``10 * radius``.
    Where ``f`` is smooth both are ``f''(x) + O(h**2)``, however large ``f''`` is (the
    multi-similarity terms have ``beta = 50``); a slope jump ``J`` at a distance
    ``delta < h`` adds ``J (1 - delta / h) / h``, which differs between the two steps by a
    factor of ten, and a jump of the value more. The tolerance
    ``rtol * (|S| + |f| + 1)`` is a thousand times float64 rounding (``4 eps |f| / h**2``,
    about ``1e-5 |f|`` at ``h = 1e-5``), and a slope jump is caught from
    ``J = 1e-7 (|S| + |f| + 1)``, far below gradcheck's tolerance.
    """
    inputs = [t.detach().double() for t in inputs]
    with torch.no_grad():
        f0 = f(*inputs)
        for k, t in enumerate(inputs):
            flat = t.reshape(-1)
            for i in range(flat.numel()):

                def at(step: float, i: int = i, k: int = k, flat: torch.Tensor = flat):
                    moved = flat.clone()
                    moved[i] += step
                    return f(*inputs[:k], moved.reshape(inputs[k].shape), *inputs[k + 1 :])

                near, far = ((at(h) - 2.0 * f0 + at(-h)) / h**2 for h in (radius, 10 * radius))
                if not torch.all((near - far).abs() <= rtol * (far.abs() + f0.abs() + 1.0)):
                    return False
    return True


def check_gradcheck(make_loss: LossFactory, emb: torch.Tensor, labels: torch.Tensor, **kw) -> None:
    """gradcheck at ``emb``, which must be a smooth point of the loss (``kink_free``)."""
    loss_fn = make_loss()
    emb = emb.detach().clone().double().requires_grad_(True)
    assert kink_free(lambda e: loss_fn(e, labels, **kw), [emb]), (
        "the loss has a kink within 1e-5 of this input: the gradcheck would depend on rounding"
    )
    assert torch.autograd.gradcheck(lambda e: loss_fn(e, labels, **kw), (emb,), eps=1e-6, atol=1e-5)


def check_labels_vs_indices_tuple(
    make_loss: LossFactory, emb: torch.Tensor, labels: torch.Tensor, indices_tuple: tuple
) -> None:
    """Passing the loss's own all-pairs tuples as ``indices_tuple`` changes nothing."""
    a = make_loss()(emb, labels)
    b = make_loss()(emb, labels, indices_tuple)
    torch.testing.assert_close(a, b)


def check_autocast_finite(make_loss: LossFactory, dtype: torch.dtype = torch.bfloat16) -> None:
    """Forward and backward under CPU autocast stay finite."""
    emb, labels = random_batch(16, 8, dtype=torch.float32)
    lin = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=dtype):
        loss = make_loss()(lin(emb), labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in lin.parameters() if p.grad is not None)
