"""The fast-weight linear op: one reference, one Triton and one CUDA implementation behind one
dispatch point (lowrank_linear)."""

from . import backends, reference
from .lowrank_linear import lowrank_linear

__all__ = ["backends", "lowrank_linear", "reference"]
