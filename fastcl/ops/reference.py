"""PyTorch implementation of the low-rank fast-weight linear: the CPU backend and the oracle.

Forward, for x (..., d_in), W (d_out, d_in), A (r, d_in) frozen, B (d_out, r) fp32, c the scale:

    s = x A^T                       (..., r)      the only tensor saved for backward
    y = x W^T + b + c s B^T         (..., d_out)

Backward, given dY = dL/dy:

    dB += c dY^T s                  added into the caller's fp32 accumulator, never a full dW
    dX  = dY W + c (dY B) A         since y depends on x through W and through A then B

The Triton and CUDA backends implement the same two functions with the same signatures and are
tested against these.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def lowrank_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (y, s). The base product uses F.linear on x's own shape, exactly as nn.Linear
    does, so that with B = 0 the output is bit-identical to the unpatched layer."""
    y = F.linear(x, weight, bias)
    s = F.linear(x, A)
    Bt = B.t() if B.dtype == y.dtype else B.t().to(y.dtype)
    y.view(-1, y.shape[-1]).addmm_(s.view(-1, s.shape[-1]), Bt, alpha=scale)
    return y, s


def serving_fast_weights(B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B as lowrank_linear_fwd reads it fastest over many no-grad forwards: cast to the input
    dtype once, and laid out so that B.t() is row-major (the addmm_ at M = 1 runs about twice as
    fast on a contiguous right operand). The caller keeps it while B is unchanged."""
    return B.to(dtype).t().contiguous().t()


def lowrank_linear_bwd(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    grad_B: torch.Tensor,
    scale: float,
    needs_dx: bool,
) -> Optional[torch.Tensor]:
    """Add c dY^T s into grad_B (fp32, in place) and return dX, or None if not needed."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    s2 = s.reshape(-1, s.shape[-1])
    # fp32 accumulation whatever the input dtype; for fp32 inputs .float() is free.
    grad_B.addmm_(dy2.t().float(), s2.float(), alpha=scale)
    if not needs_dx:
        return None
    dx = torch.matmul(dy2, weight)
    dx.addmm_(torch.matmul(dy2, B.to(dy.dtype)), A, alpha=scale)
    return dx.view(*dy.shape[:-1], weight.shape[1])
