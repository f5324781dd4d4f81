"""pml-plugins trainers: PML-compatible components, each importable by name."""

from .alternating_projections import AlternatingProjections
from .metrix_trainer import MetrixTrainer

__all__: list[str] = ["AlternatingProjections", "MetrixTrainer"]
