"""pml-plugins miners: PML-compatible components, each importable by name."""

from .disjoint_quadruple_miner import DisjointQuadrupleMiner
from .representative_miner import RepresentativeMiner

__all__: list[str] = ["DisjointQuadrupleMiner", "RepresentativeMiner"]
