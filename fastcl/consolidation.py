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
    delta_norm: float  # ||delta||_F over the merged layers
    relative_delta: float  # delta_norm / ||W||_F of the patched weights as they were at the first merge
    discarded_tokens: int  # observed but not stepped, dropped because A was resampled
    seconds: float
    committed: bool = True
    gate: Optional[dict] = None  # filled in when a gate scored the merge
    repairs: int = 0  # gate_repair steps taken on the update after the gate refused it
    halvings: int = 0  # the update was merged at 2**-halvings of its strength to pass the gate
    undone: int = 0  # refused with gate_every > 1: earlier unchecked merges undone with this one

    def __str__(self) -> str:
        state = "committed" if self.committed else "rolled back"
        text = (f"consolidation {state}: epoch {self.epoch}, {self.layers_merged} layers merged, "
                f"||dW|| {self.delta_norm:.3g} ({self.relative_delta:.2e} of ||W||), {self.seconds:.2f}s")
        if self.repairs:
            text += f", after {self.repairs} repair step{'s' if self.repairs > 1 else ''} toward the reference"
        if self.halvings:
            text += f", at 1/{2 ** self.halvings} strength to pass the gate"
        if self.undone:
            text += f", {self.undone} unchecked merges before it undone"
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
    fitted: dict[str, torch.Tensor]  # A of the layers whose projection was fitted, not drawn from the seed


def delta_norm_sq(module: FastLinear) -> float:
    """||scale B A||_F^2 without forming B A: scale^2 trace(B (A A^T) B^T), all r x r work."""
    A = module.A.float()
    gram = A @ A.t()
    return float((module.B @ gram * module.B).sum()) * module.scale**2


def delta_abs_bound(module: FastLinear) -> float:
    """An upper bound of max |scale B A|: scale * max_i sum_k |B_ik| * max |A|."""
    return float(module.B.detach().abs().sum(1).max()) * float(module.A.abs().max()) * abs(module.scale)


def merged_weight(module: FastLinear) -> torch.Tensor:
    """W + scale B A computed in fp32, cast back to W's dtype; (d_out, d_in)."""
    W = module.weight_matrix()
    return W.float().addmm(module.B, module.A.float(), alpha=module.scale).to(W.dtype)


class MergeChecker:
    """Proves, before anything is written, that no merged weight can be non-finite.

    Exact checking would form every merged weight twice. Instead each layer keeps an upper bound
    of max |W| (measured once, then raised by each merge's bound); while bound + bound(B A) stays
    well inside the dtype's range the merge cannot overflow, and only layers near the limit are
    checked exactly (and their bound refreshed).
    """

    def __init__(self):
        self.weight_bound: dict[str, float] = {}

    def check(self, modules: dict[str, FastLinear]) -> dict[str, float]:
        """Raise, naming the layer, if a merge would be non-finite; return each delta's bound."""
        bounds = {}
        for name, module in modules.items():
            if not torch.isfinite(module.B).all():
                raise ConsolidationError(f"consolidate() refused: the update for {name} holds NaN/inf; nothing was changed")
            W = module.weight_matrix()
            if name not in self.weight_bound:
                self.weight_bound[name] = float(W.abs().max())
            bounds[name] = delta_abs_bound(module)
            if self.weight_bound[name] + bounds[name] < 0.5 * torch.finfo(W.dtype).max:
                continue
            merged = merged_weight(module)
            if not torch.isfinite(merged).all():
                raise ConsolidationError(
                    f"consolidate() refused: merging into {name} overflows {W.dtype}; nothing was changed")
            self.weight_bound[name] = float(W.abs().max())  # exact, so the bound stays tight near the limit
        return bounds

    def committed(self, bounds: dict[str, float]) -> None:
        for name, bound in bounds.items():
            self.weight_bound[name] += bound

    def forget(self) -> None:
        """Weights were overwritten (rollback, load): measure again on the next merge."""
        self.weight_bound.clear()


@torch.no_grad()
def write_merge(modules: dict[str, FastLinear]) -> float:
    """W += scale B A in every module, in fp32 (in place for fp32 weights); return ||delta||_F."""
    delta_sq = 0.0
    for module in modules.values():
        delta_sq += delta_norm_sq(module)
        W = module.weight_matrix()
        if W.dtype == torch.float32:
            W.addmm_(module.B, module.A, alpha=module.scale)
        else:
            W.copy_(merged_weight(module))
    return delta_sq**0.5


@torch.no_grad()
def copy_into(buffers: dict[str, torch.Tensor], name: str, W: torch.Tensor) -> torch.Tensor:
    """W copied into buffers[name], allocated only when missing or of another shape, dtype or
    device: snapshots taken merge after merge reuse their memory."""
    buffer = buffers.get(name)
    if buffer is None or buffer.shape != W.shape or buffer.dtype != W.dtype or buffer.device != W.device:
        buffer = buffers[name] = torch.empty_like(W, memory_format=torch.contiguous_format)
    return buffer.copy_(W)


class GateWindow:
    """Merges committed since the gate last passed, when it checks only every `gate_every`-th
    merge, and the weights as they were before the first of them, so that a refusal can undo
    them all. One copy of each layer merged in the window, in buffers reused window after window."""

    def __init__(self):
        self.merges = 0
        self.before: dict[str, torch.Tensor] = {}  # name -> W before the window's first merge of it
        self._buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def cover(self, live: dict[str, FastLinear]) -> None:
        """Called before an unchecked merge is written: keep what it will overwrite."""
        for name, module in live.items():
            if name in self.before:
                continue
            self.before[name] = copy_into(self._buffers, name, module.weight_matrix())
        self.merges += 1

    @torch.no_grad()
    def undo(self, modules: dict[str, FastLinear]) -> int:
        """Put back the weights from before the window (bit-exact); return the merges undone."""
        for name, weight in self.before.items():
            modules[name].weight_matrix().copy_(weight)
        undone = self.merges
        self.close()
        return undone

    def close(self) -> None:
        self.merges = 0
        self.before.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())
