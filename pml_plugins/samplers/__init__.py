"""pml-plugins samplers: PML-compatible components, each importable by name."""

from .representative_sampler import RepresentativeSampler

__all__: list[str] = ["RepresentativeSampler"]
