"""Protected input directions: where general text lives in each patched layer's input.

A fast-weight update changes a layer's output by scale * B (A x). On general text a few input
directions carry much of x's energy (in SmolLM2-135M the top direction alone holds 40-70% of
the attention and MLP-gate inputs' second moment, 4-13% of the down projection's), so through
a random A any step on B also moves every general-text token. Rows of A orthogonal to those
directions make the update nearly invisible to general text while inputs that differ from it
(a new entity, a new fact) still reach B: the null-space idea of AlphaEdit, applied to the
projection instead of to each edit.

principal_input_directions() finds them once, before the model is patched, from a forward over
shipped general text; make_projection() then removes them from every A it draws. The same
forward's moments give each layer a Whitener for projection="whitened" (fastcl.projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

ITERATIONS = 30  # subspace iterations: the top directions are well separated, 30 is plenty


def _top_eigenvectors(moment: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """The k leading eigenvectors (d x k, orthonormal columns) of a symmetric PSD matrix, by
    orthogonal iteration from a seeded start: O(d^2 k) per iteration where a full eigh of the
    1536-wide MLP inputs would cost O(d^3), and deterministic for the same input bits."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(moment.shape[0], k, generator=generator, dtype=torch.float64).to(moment.device)
    moment = moment.double()
    for _ in range(ITERATIONS):
        q, _ = torch.linalg.qr(moment @ q)
    return q.float().contiguous()  # QR returns column-major


@torch.no_grad()
def input_moments(model: nn.Module, modules: dict[str, nn.Module], token_ids: Sequence[int],
                  window: int = 256) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, int]]:
    """Per named linear, the second moment sum x x^T (fp32, d_in x d_in) of its inputs over
    `token_ids`, read in windows: (moments, owner, rows). Layers fed the same tensor (q, k and v;
    gate and up) share one matrix: owner maps each layer to the layer whose moment it uses."""
    if len(token_ids) < 2:
        raise ValueError("protection text is too short")
    moments: dict[str, torch.Tensor] = {}
    rows_seen: dict[str, int] = {}
    owner: dict[str, str] = {}  # layer -> the layer whose moment it shares
    last: list = [None, None]  # (input tensor, its owner) of the latest call

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            if x is last[0]:  # consecutive calls on one tensor: q, k, v or gate, up
                owner[name] = last[1]
                return
            rows = x.reshape(-1, x.shape[-1]).float()
            moments[name] = moments.get(name, 0) + rows.t() @ rows
            rows_seen[name] = rows_seen.get(name, 0) + rows.shape[0]
            owner[name] = name
            last[:] = [x, name]
        return record

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        for start in range(0, len(token_ids), window):
            chunk = list(token_ids[start: start + window])
            model(input_ids=torch.tensor([chunk], device=device))
    finally:
        for handle in handles:
            handle.remove()
        last[:] = [None, None]
    missing = [name for name in modules if name not in owner]
    if missing:
        raise RuntimeError(f"no input reached {missing[:3]} during the protection forward")
    return moments, owner, rows_seen


def principal_input_directions(model: nn.Module, modules: dict[str, nn.Module], token_ids: Sequence[int], k: int,
                               window: int = 256) -> dict[str, torch.Tensor]:
    """For each named linear, the k leading directions (d_in x k, orthonormal) of the second
    moment of its inputs over `token_ids`. Layers fed the same tensor share one eigen-solve."""
    moments, owner, _ = input_moments(model, modules, token_ids, window)
    return leading_directions(moments, owner, k)


def leading_directions(moments: dict[str, torch.Tensor], owner: dict[str, str], k: int) -> dict[str, torch.Tensor]:
    """principal_input_directions() from input_moments()'s results."""
    solved = {key: _top_eigenvectors(moment, k) for key, moment in moments.items()}
    return {name: solved[key] for name, key in owner.items()}


WHITENER_RANK = 384  # eigenvectors a Whitener keeps (bench/one_step.py: 384 matches the full matrix, 128 does not)


@dataclass
class Whitener:
    """C^-1/2 for C = the mean second moment of a layer's inputs on general text, plus a ridge of
    `ridge` x its mean eigenvalue, kept as the k leading eigenvectors with their scales and one
    scale for everything orthogonal to them: d x k numbers instead of d x d (SmolLM2's full
    matrices would be 400 MB), and the anchor text's few hundred tokens cannot pin down the small
    eigenvalues anyway."""

    basis: torch.Tensor  # (d, k) orthonormal: the leading eigenvectors of C
    scales: torch.Tensor  # (k,) (eigenvalue + ridge)^-1/2
    rest: float  # (mean of the other eigenvalues + ridge)^-1/2
    level: float  # sqrt(tr C / d): the general-text scale of a random row of A

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """X C^-1/2, row by row (C^-1/2 is symmetric)."""
        return X * self.rest + ((X @ self.basis) * (self.scales - self.rest)) @ self.basis.t()

    def to(self, device) -> "Whitener":
        return Whitener(self.basis.to(device), self.scales.to(device), self.rest, self.level)

    @classmethod
    def from_moment(cls, moment: torch.Tensor, rows: int, ridge: float, k: int = WHITENER_RANK) -> "Whitener":
        C = moment.double() / rows
        d = C.shape[0]
        k = min(k, d)
        values, vectors = torch.linalg.eigh(C)  # ascending
        values = values.clamp(min=0)
        level = float(values.sum()) / d
        top, rest = values[d - k:], values[: d - k]
        rest_level = float(rest.mean()) if rest.numel() else 0.0
        return cls(vectors[:, d - k:].float().contiguous(), (top + ridge * level).rsqrt().float(),
                   (rest_level + ridge * level) ** -0.5, level**0.5)


def whiteners(moments: dict[str, torch.Tensor], owner: dict[str, str], rows: dict[str, int],
              ridge: float, layers: Optional[Iterable[str]] = None) -> dict[str, Whitener]:
    """A Whitener per layer (each of `layers`, default all) from input_moments()'s results;
    layers fed the same tensor share one."""
    wanted = list(owner) if layers is None else list(layers)
    solved = {key: Whitener.from_moment(moments[key], rows[key], ridge) for key in {owner[n] for n in wanted}}
    return {name: solved[owner[name]] for name in wanted}
