"""Trunks and the embedder: ``trunk(images) -> (B, F)``, ``embedder(features) -> (B, d)``.

PML trainers take ``models={"trunk": ..., "embedder": ...}``; every trunk here has an
``output_size`` attribute so the embedder can be sized from it. Trunks are registered
by name (kind ``models``): ``SmallCNN`` for the embedded data sets on the CPU, and the
papers' torchvision backbones (``ResNet50``, ``GoogLeNet``) from ``backbones``, which
import torchvision only when one is built.
"""

from .backbones import GoogLeNet, ResNet50
from .small_cnn import SmallCNN

__all__ = ["SmallCNN", "ResNet50", "GoogLeNet"]
