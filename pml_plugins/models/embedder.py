"""The embedder: ``embedder(trunk features) -> (B, embedding_size)``."""

from __future__ import annotations

import torch
from torch import nn


class Embedder(nn.Module):
    """Linear (or two-layer MLP) map from trunk features to the embedding."""

    def __init__(self, in_features: int, embedding_size: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_features, embedding_size)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_features, in_features),
                nn.ReLU(inplace=True),
                nn.Linear(in_features, embedding_size),
            )
        else:
            raise ValueError(f"model.embedder: {kind!r} is not 'linear' or 'mlp'")
        self.output_size = embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
