"""pml-plugins: deep-metric-learning methods as pytorch-metric-learning components.

``from pml_plugins.losses import NRALoss`` gives a loss that drops into any PML code;
``pml_plugins.registry`` finds every component, PML's and ours, by name.
"""

from . import registry
from .registry import build, get, names

__version__ = "0.1.0"

__all__ = ["__version__", "build", "get", "names", "registry"]
