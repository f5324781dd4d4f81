"""pml-plugins losses: PML-compatible components, each importable by name."""

from .gradml import GradMLLoss
from .loop import LoOpLoss
from .metrix import MetrixLoss
from .nra import NRALoss
from .plugin_cross_batch_memory import PluginCrossBatchMemory
from .plugin_self_supervised_loss import PluginSelfSupervisedLoss
from .soft_contrastive import SoftContrastiveLoss
from .soft_multi_similarity import SoftMultiSimilarityLoss
from .soft_proxy_anchor import SoftProxyAnchorLoss

__all__: list[str] = [
    "GradMLLoss",
    "LoOpLoss",
    "NRALoss",
    "PluginCrossBatchMemory",
    "PluginSelfSupervisedLoss",
    "MetrixLoss",
    "SoftContrastiveLoss",
    "SoftMultiSimilarityLoss",
    "SoftProxyAnchorLoss",
]
