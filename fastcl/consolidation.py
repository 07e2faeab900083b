"""Folding fast weights into base weights: fp32 merge, all-or-nothing, with an exact undo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import ConsolidationError
from .layers import FastLinear


@dataclass
class ConsolidationReport:
    epoch: int  # the projection epoch after this call
    layers_merged: int
    max_abs_delta: float
    relative_delta: float  # ||delta||_F / ||W||_F over the merged layers
    discarded_tokens: int  # observed but not stepped, dropped because A was resampled
    seconds: float
    committed: bool = True
    gate: Optional[dict] = None  # filled in when a gate scored the merge

    def __str__(self) -> str:
        state = "committed" if self.committed else "rolled back"
        text = (f"consolidation {state}: epoch {self.epoch}, {self.layers_merged} layers merged, "
                f"max |dW| {self.max_abs_delta:.3g}, ||dW||/||W|| {self.relative_delta:.3g}, {self.seconds:.2f}s")
        if self.gate is not None:
            text += f", gate {self.gate}"
        return text


@dataclass
class Snapshot:
    """What rollback() restores: merged weights before the merge, B, optimizer state, epoch."""

    live: set[str]  # layers whose B was non-zero, hence merged
    weights: dict[str, torch.Tensor]
    fast_weights: dict[str, torch.Tensor]
    optimizer_state: dict
    epoch: int


def merged_weight(module: FastLinear) -> torch.Tensor:
    """W + scale B A computed in fp32, cast back to W's dtype; (d_out, d_in)."""
    W = module.weight_matrix()
    return (W.float() + module.delta_weight()).to(W.dtype)


def check_mergeable(modules: dict[str, FastLinear]) -> None:
    """Raise, naming the layer, if any merged weight would be non-finite. Writes nothing."""
    for name, module in modules.items():
        delta = module.delta_weight()
        if not torch.isfinite(delta).all():
            raise ConsolidationError(f"consolidate() refused: the update for {name} holds NaN/inf; nothing was changed")
        if not torch.isfinite(merged_weight(module)).all():
            raise ConsolidationError(
                f"consolidate() refused: merging into {name} overflows {module.weight.dtype}; nothing was changed"
            )


@torch.no_grad()
def write_merge(modules: dict[str, FastLinear]) -> tuple[float, float]:
    """Write W += scale B A into every module; return (max |delta|, relative Frobenius norm)."""
    max_abs, delta_sq, weight_sq = 0.0, 0.0, 0.0
    for module in modules.values():
        delta = module.delta_weight()
        max_abs = max(max_abs, float(delta.abs().max()))
        delta_sq += float(delta.pow(2).sum())
        W = module.weight_matrix()
        weight_sq += float(W.float().pow(2).sum())
        W.copy_(merged_weight(module))
    return max_abs, (delta_sq / weight_sq) ** 0.5 if weight_sq > 0 else 0.0
