"""The papers' ImageNet backbones as PML trunks: ``trunk(images) -> (B, output_size)``.

- :class:`ResNet50` (GradML §3.5, Metrix §4.5): torchvision ResNet-50, classifier removed,
  global average pooling (``pooling="avg+max"``: GAP + GMP summed, as Metrix's code), 2048-d.
- :class:`GoogLeNet` (NRA §5.7, LoOp §1.10): torchvision GoogLeNet (Inception-v1), classifier,
  dropout and auxiliary heads removed, global average pooling, 1024-d.

Both, and ``SmallCNN``, follow :class:`MapTrunk`: ``feature_maps(x)`` returns the last
convolutional maps, ``pool(maps)`` the (B, output_size) vector, and ``forward(x)`` is
``pool(feature_maps(x))`` (``forward(x, pooled=False)``: the maps), so that Metrix/feature
can mix the maps before pooling, as its authors do.

Both take torchvision's weight names (``weights: IMAGENET1K_V2`` / ``IMAGENET1K_V1``, or
``null`` for random initialisation) and ``freeze_bn`` (every BatchNorm layer in eval mode with
``requires_grad=False``, kept so across ``train()`` calls: PML trainers call ``.train()`` on
the trunk each epoch). The embedder is :class:`~pml_plugins.models.embedder.Embedder`.

Paper vs project: NRA used TF-Slim Inception-v1 weights and LoOp GluonCV's ``googlenet``;
torchvision's ``IMAGENET1K_V1`` GoogLeNet (ported from the TF weights) stands in for both.
Weights are fetched by torchvision into ``torch.hub.get_dir()/checkpoints``; offline, a
:class:`WeightsNotFoundError` says which file to put there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["GoogLeNet", "GlobalPool", "MapTrunk", "ResNet50", "WeightsNotFoundError"]

POOLINGS = ("avg", "max", "avg+max")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights that are neither in the torch hub cache nor downloadable."""


class GlobalPool(nn.Module):
    """Global average (``"avg"``), max (``"max"``) or summed average + max (``"avg+max"``)
    pooling of a (B, C, H, W) map to (B, C, 1, 1)."""

    def __init__(self, mode: str = "avg"):
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            return nn.functional.adaptive_avg_pool2d(x, 1)
        if self.mode == "max":
            return nn.functional.adaptive_max_pool2d(x, 1)
        return nn.functional.adaptive_avg_pool2d(x, 1) + nn.functional.adaptive_max_pool2d(x, 1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


@runtime_checkable
class MapTrunk(Protocol):
    """A trunk whose output is a pooling of feature maps: ``forward(x) = pool(feature_maps(x))``
    and ``forward(x, pooled=False) = feature_maps(x)`` (the form a ``DistributedDataParallel``
    wrapper passes on). ``pool`` has no parameters."""

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor: ...

    def pool(self, maps: torch.Tensor) -> torch.Tensor: ...


def load_torchvision(
    builder: Callable[..., nn.Module], enum: Any, weights: str | None, trunk: str, **kwargs: Any
) -> nn.Module:
    """``builder(weights=..., **kwargs)``, with a download failure turned into a
    :class:`WeightsNotFoundError` naming the file and the cache folder."""
    try:
        resolved = enum.verify(weights)  # None stays None: random initialisation
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            f"{trunk}: weights={weights!r} is not one of torchvision's {[w.name for w in enum]} "
            f"(or null for random initialisation)"
        ) from None
    try:
        return builder(weights=resolved, **kwargs)
    except OSError as exc:  # urllib's URLError / HTTPError, socket errors, a read-only cache
        if resolved is None:
            raise
        file = Path(resolved.url).name
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsNotFoundError(
            f"{trunk}: the ImageNet weights {resolved.name} could not be loaded: {exc}.\n"
            f"Offline, download {resolved.url} elsewhere and put it at {cache / file} "
            f"(the torch hub cache, torch.hub.get_dir() / 'checkpoints'; $TORCH_HOME moves it), "
            f"or set weights: null in the trunk for a random initialisation."
        ) from exc


class _Backbone(nn.Module):
    """A torchvision classifier with its head replaced by pooling; optional frozen BN."""

    output_size: int

    def __init__(self, net: nn.Module, output_size: int, freeze_bn: bool):
        super().__init__()
        self.net = net
        self.output_size = output_size
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            for m in self.batchnorms():
                for p in m.parameters():
                    p.requires_grad_(False)
            self.train(self.training)

    def batchnorms(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> _Backbone:
        """``nn.Module.train``, keeping BatchNorm in eval mode where ``freeze_bn``."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.batchnorms():
                m.eval()
        return self

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional maps (B, output_size, H, W), before pooling."""
        raise NotImplementedError

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """The torchvision head after the maps: pooling, flattening, the removed classifier."""
        return self.net.fc(torch.flatten(self.net.avgpool(maps), 1))

    def forward(self, x: torch.Tensor, pooled: bool = True) -> torch.Tensor:
        maps = self.feature_maps(x)
        return self.pool(maps) if pooled else maps


class ResNet50(_Backbone):
    """torchvision ResNet-50 without its classifier: (B, 3, H, W) -> (B, 2048).

    Args:
        weights: ``"IMAGENET1K_V2"`` (default), ``"IMAGENET1K_V1"`` or ``None`` (random).
        pooling: ``"avg"`` (default), ``"max"`` or ``"avg+max"`` (GAP + GMP summed, Metrix).
        freeze_bn: BatchNorm layers in eval mode and not trained (GradML, Metrix on CUB/Cars).
    """

    def __init__(
        self, weights: str | None = "IMAGENET1K_V2", pooling: str = "avg", freeze_bn: bool = False
    ):
        import torchvision  # here, not at the top: jobs with another trunk skip its 1 s import

        net = load_torchvision(
            torchvision.models.resnet50, torchvision.models.ResNet50_Weights, weights, "ResNet50"
        )
        net.avgpool = GlobalPool(pooling)
        net.fc = nn.Identity()
        super().__init__(net, 2048, freeze_bn)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``layer4``'s output (B, 2048, H/32, W/32), as torchvision's ``ResNet.forward``."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class GoogLeNet(_Backbone):
    """torchvision GoogLeNet (Inception-v1) without classifier, dropout and auxiliary heads:
    (B, 3, H, W) -> (B, 1024).

    Args:
        weights: ``"IMAGENET1K_V1"`` (default) or ``None`` (random). With the ImageNet
            weights torchvision re-normalises ImageNet-normalised input to the range the
            ported TF weights expect (``transform_input=True``).
        pooling: ``"avg"`` (default, NRA / LoOp), ``"max"`` or ``"avg+max"``.
        freeze_bn: BatchNorm layers in eval mode and not trained.
    """

    def __init__(
        self, weights: str | None = "IMAGENET1K_V1", pooling: str = "avg", freeze_bn: bool = False
    ):
        kwargs: dict[str, Any] = {} if weights else {"aux_logits": False, "init_weights": True}
        import torchvision  # here, not at the top: jobs with another trunk skip its 1 s import

        net = load_torchvision(
            torchvision.models.googlenet,
            torchvision.models.GoogLeNet_Weights,
            weights,
            "GoogLeNet",
            **kwargs,
        )
        net.avgpool = GlobalPool(pooling)
        net.dropout = nn.Identity()
        net.fc = nn.Identity()
        super().__init__(net, 1024, freeze_bn)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``inception5b``'s output (B, 1024, H/32, W/32), as torchvision's
        ``GoogLeNet.forward`` without the auxiliary heads (removed)."""
        n = self.net
        x = n._transform_input(x)
        for name in ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a"):
            x = getattr(n, name)(x)
        for name in ("inception3b", "maxpool3", "inception4a", "inception4b", "inception4c"):
            x = getattr(n, name)(x)
        for name in ("inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"):
            x = getattr(n, name)(x)
        return x
