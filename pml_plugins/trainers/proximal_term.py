"""The proximal term of one alternating-projection step, and the step's saved state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords


class ProximalTerm(ModuleWithRecords):
    """``lambda / 2 * ||theta - theta_k||^2`` over a fixed set of parameters.

    The squared distance is a plain sum over every entry of every parameter, with no
    normalisation by the number of parameters, the batch size or the data set size; the
    forward returns the term as a differentiable scalar, whose gradient with respect to each
    parameter is ``lambda * (theta - theta_k)``. This is the convention of the same authors'
    follow-up code (CCP, github.com/yetigurbuz/ccp-dml, ``DistanceRegularizer`` in
    ``framework/solvers/gradient_transformers.py``), which adds ``lambda * (v - v_prev)`` to
    the gradient of every trainable weight of the model (not of its proxies) once per step,
    beside a base loss that is a per-batch mean. So ``lambda`` is comparable across batch
    sizes but not across models or optimiser settings: the term's size depends on how far
    ``theta`` moves during one projection.

    ``theta_k`` (the anchor of the current projection) is taken by :meth:`snapshot`, with
    the index of the projection (:attr:`projection`, -1 before the first snapshot). Both
    are saved and loaded with ``state_dict()`` / ``load_state_dict()`` (as the module's
    extra state, not as buffers, so that record-keeper, which walks the buffers of the
    trainer's ``loss_funcs``, does not copy a whole parameter set at every log step).
    Where a ``sampler`` with ``state_dict()`` is given, its state is saved with them, so
    one ``state_dict()`` holds all a resumed run needs to continue the same projection:
    ``theta_k`` and the representatives.

    Recorded attributes (record-keeper), all of the last call:

    - ``weight``: lambda;
    - ``proximal_value``: the term, ``lambda / 2 * squared_distance``;
    - ``squared_distance``: ``||theta - theta_k||^2`` (also with ``lambda = 0``);
    - ``proximal_share``: the term's share of the total loss, set by :meth:`record_share`
      (the trainer calls it with the other weighted losses of the batch);
    - ``projection``: the index of the projection.

    Args:
        named_parameters: ``(name, parameter)`` pairs; a parameter seen twice is used once.
        weight: lambda (>= 0).
        sampler: optional object with ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        weight: float,
        sampler: Any = None,
    ) -> None:
        super().__init__(collect_stats=False)
        if weight < 0:
            raise ValueError(f"the proximal weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.sampler = sampler
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        seen: set[int] = set()
        for name, p in named_parameters:
            if id(p) not in seen:
                seen.add(id(p))
                self._names.append(name)
                self._params.append(p)
        self.snapshot(-1)  # theta_k = theta, projection -1
        self.proximal_value = 0.0
        self.squared_distance = 0.0
        self.proximal_share = 0.0
        self.add_to_recordable_attributes(
            list_of_names=[
                "weight",
                "proximal_value",
                "squared_distance",
                "proximal_share",
                "projection",
            ],
            is_stat=False,
        )

    def anchors(self) -> list[torch.Tensor]:
        """``theta_k``, one tensor per parameter (in the order of ``named_parameters``)."""
        return list(self._anchors)

    def tracked_parameters(self) -> list[torch.nn.Parameter]:
        """``theta``, one tensor per parameter (in the order of ``named_parameters``)."""
        return list(self._params)

    @torch.no_grad()
    def gradient(self) -> list[torch.Tensor]:
        """The term's gradient ``lambda * (theta - theta_k)``, one tensor per parameter."""
        return [
            self.weight * (p.detach() - a.to(p.device))
            for p, a in zip(self._params, self._anchors, strict=True)
        ]

    @torch.no_grad()
    def snapshot(self, projection: int) -> None:
        """``theta_k <- theta`` (on the parameters' current devices)."""
        self._anchors: list[torch.Tensor] = [p.detach().clone() for p in self._params]
        self.projection = int(projection)

    def forward(self) -> torch.Tensor:
        if not self._params:
            self.proximal_value = self.squared_distance = 0.0
            return torch.zeros(())
        device = self._params[0].device
        if self.weight == 0:
            with torch.no_grad():
                self.squared_distance = float(self._squared_distance(device))
            self.proximal_value = 0.0
            return torch.zeros((), device=device)
        squared = self._squared_distance(device)
        term = 0.5 * self.weight * squared
        self.squared_distance = float(squared.detach())
        self.proximal_value = float(term.detach())
        return term

    def _squared_distance(self, device: torch.device) -> torch.Tensor:
        """``||theta - theta_k||^2``, summed over every entry of every parameter."""
        total = torch.zeros((), device=device)
        for i, p in enumerate(self._params):
            if self._anchors[i].device != p.device:  # the model was moved after the snapshot
                self._anchors[i] = self._anchors[i].to(p.device)
            total = total + (p - self._anchors[i]).pow(2).sum().to(device)
        return total

    def record_share(self, other_losses: float, loss_weight: float = 1.0) -> float:
        """Sets and returns :attr:`proximal_share`, the term's share of the total loss.

        ``share = w P / (|other_losses| + w P)``, with ``P`` the term's last value
        (:attr:`proximal_value`), ``w`` the trainer's ``loss_weight`` for the term and
        ``other_losses`` the sum of the batch's other weighted losses (its absolute value,
        as some losses are negative), so the share is in ``[0, 1]``; 0 where both are 0.
        """
        value = float(loss_weight) * self.proximal_value
        denominator = abs(float(other_losses)) + abs(value)
        self.proximal_share = abs(value) / denominator if denominator > 0 else 0.0
        return self.proximal_share

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "theta_k": {
                n: a.detach().clone() for n, a in zip(self._names, self._anchors, strict=True)
            },
            "projection": self.projection,
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        theta_k = state["theta_k"]
        if sorted(theta_k) != sorted(self._names):
            missing = sorted(set(self._names) - set(theta_k))
            unexpected = sorted(set(theta_k) - set(self._names))
            raise ValueError(
                f"theta_k does not match the parameters: missing {missing}, unexpected {unexpected}"
            )
        anchors = []
        for name, p in zip(self._names, self._params, strict=True):
            anchor = torch.as_tensor(theta_k[name])
            if anchor.shape != p.shape:
                raise ValueError(
                    f"theta_k[{name!r}] has shape {tuple(anchor.shape)}, "
                    f"the parameter {tuple(p.shape)}"
                )
            anchors.append(anchor.detach().to(p.device, p.dtype).clone())
        self._anchors = anchors
        self.projection = int(state["projection"])
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
