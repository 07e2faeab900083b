"""The frozen random projection A, regenerated from (seed, layer index, epoch), never stored.

Entries are i.i.d. N(0, 1/d_in), so each row has unit norm in expectation and x A^T keeps the
scale of x. Only the CPU generator and elementwise scaling are used (no QR or other BLAS call),
so every replica and every machine regenerates the same bits; a protected basis (`avoid`) adds
two small CPU products (replicas on one kind of machine agree; Replicas.verify() checks A).
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch


def projection_seed(seed: int, layer_index: int, epoch: int) -> int:
    """A 63-bit generator seed that is distinct for every (seed, layer, epoch)."""
    digest = hashlib.sha256(f"fastcl:{seed}:{layer_index}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_projection(
    seed: int,
    layer_index: int,
    epoch: int,
    rank: int,
    d_in: int,
    dtype: torch.dtype,
    device: torch.device | str,
    avoid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A (rank x d_in) in `dtype` on `device`. With `avoid` (d_in x k, orthonormal columns), the
    rows are made orthogonal to its columns (fastcl.protection): x A^T then ignores x's
    component in those directions."""
    generator = torch.Generator(device="cpu").manual_seed(projection_seed(seed, layer_index, epoch))
    A = torch.randn(rank, d_in, generator=generator, dtype=torch.float32)
    A.mul_(d_in**-0.5)
    if avoid is not None:
        avoid = avoid.detach().to(device="cpu", dtype=torch.float32)
        A -= (A @ avoid) @ avoid.t()
    return A.to(device=device, dtype=dtype)
