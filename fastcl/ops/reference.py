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

import functools
from typing import Optional

import torch
import torch.nn.functional as F

try:  # the decode closure below, compiled (csrc/serving): no Python between its products
    from .._serving import FUSED_MAX_ROWS as max_fused_rows
    from .._serving import serving_forward as compiled_serving_forward
except ImportError:  # a pure-Python install: the Python closure, same results
    compiled_serving_forward, max_fused_rows = None, 0


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


def serving_forward(weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
                    scale: float, dtype: torch.dtype):
    """x -> y of lowrank_linear_fwd for many no-grad forwards while W, A and B stay unchanged
    (decode): B cast to the input dtype once and laid out so the addmm_ reads it row-major (about
    twice as fast at M = 1), every operand bound, and three ATen calls a forward on 2-D views: in
    decode the adapter's two small products cost less than the Python and dispatch around them.
    Returns (run, the copy of B it holds). With fastcl._serving built, run is C++: for up to four
    fp32 rows on the CPU (decode) the adapter's two products run as one loop with no ATen call
    between them (equal within fp32 rounding); otherwise the same three calls (bit-identical)."""
    Wt, At = weight.t(), A.t()
    Bt = B.to(dtype).t().contiguous()
    if compiled_serving_forward is not None:
        return functools.partial(compiled_serving_forward, Wt, bias, At, Bt, float(scale), max_fused_rows), Bt
    d_in, d_out = weight.shape[1], weight.shape[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, d_in)
        y = torch.mm(x2, Wt) if bias is None else torch.addmm(bias, x2, Wt)
        y.addmm_(torch.mm(x2, At), Bt, alpha=scale)
        return y.view(*x.shape[:-1], d_out)

    return run, Bt


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
    return input_gradient(dy, weight, A, B, scale, dy.dtype)


def input_gradient(dy: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """dX = dY W + c (dY B) A with the products in `dtype` (dY's own, or a cheaper one:
    fastcl.precision), returned in dY's dtype; grad_B is not touched."""
    dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
    dx = torch.mm(dy2, weight.to(dtype))
    dx.addmm_(torch.mm(dy2, B.to(dtype)), A.to(dtype), alpha=scale)
    return dx.to(dy.dtype).view(*dy.shape[:-1], weight.shape[1])
