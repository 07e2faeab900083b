"""The low-rank fast-weight linear as torch.library custom ops: the one dispatch point.

`fastcl::lowrank_linear` returns (y, s); its autograd formula saves only s (plus the weights,
which are not per token) and calls `fastcl::lowrank_linear_bwd`, which mutates the fp32
accumulator grad_B in place and returns dX. Both ops have fake implementations, so
torch.compile traces through them, forward and backward.

B takes part in autograd only so that a graph is built when everything else is frozen: its
gradient goes into grad_B, never into B.grad.

In eager mode `lowrank_linear` does not go through the registered ops. A custom op's Python
dispatch (schema defaults, redispatch, the generated autograd Function) costs about 20 us per
call on a CPU, and about 0.2 ms per forward+backward. That is a few percent of a SmolLM2 observe()
over its 210 layers, and more in decode, where caches are cold. Eager mode calls the same
backend functions through `LowRankLinearFunction`, a plain autograd.Function that saves the same
tensors. Without grad it calls the forward directly. Under torch.compile the registered op runs,
so graphs trace through its fake implementation. tests/test_op.py checks that both paths give
bit-identical results.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends, reference


@torch.library.custom_op("fastcl::lowrank_linear", mutates_args=())
def _lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    grad_B: torch.Tensor,
    scale: float,
    backend: str,
    dx_dtype: Optional[torch.dtype] = None,
    sketch_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backends.implementation(backend, x.device)
    return forward(impl, x, weight, bias, A, B, scale, sketch_mask)


@_lowrank_linear.register_fake
def _(x, weight, bias, A, B, grad_B, scale, backend, dx_dtype=None, sketch_mask=None):
    lead = x.shape[:-1]
    return x.new_empty(*lead, weight.shape[0]), x.new_empty(*lead, A.shape[0])


@torch.library.custom_op("fastcl::lowrank_linear_bwd", mutates_args=("grad_B",))
def _lowrank_linear_bwd(
    dy: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    grad_B: torch.Tensor,
    scale: float,
    needs_dx: bool,
    backend: str,
    dx_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    impl = backends.implementation(backend, dy.device)
    dx = backward(impl, dy, s, weight, A, B, grad_B, scale, needs_dx, dx_dtype)
    # A custom op must return a tensor: an empty one stands for "dX not requested".
    return dx if dx is not None else dy.new_empty(0)


@_lowrank_linear_bwd.register_fake
def _(dy, s, weight, A, B, grad_B, scale, needs_dx, backend, dx_dtype=None):
    return dy.new_empty(*dy.shape[:-1], weight.shape[1]) if needs_dx else dy.new_empty(0)


def forward(impl, x, weight, bias, A, B, scale: float,
            sketch_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """impl's forward; with sketch_mask, the sketch keeps only the rows dB learns from (dX never
    reads it, so y and dX are unchanged)."""
    y, s = impl.lowrank_linear_fwd(x, weight, bias, A, B, scale)
    if sketch_mask is not None:
        s = s * sketch_mask.unsqueeze(-1).to(s.dtype)
    return y, s


def backward(impl, dy, s, weight, A, B, grad_B, scale: float, needs_dx: bool,
             dx_dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """impl's backward; with dx_dtype (fastcl.precision), grad_B still from impl in full
    precision and dX from the reference's products in dx_dtype."""
    if dx_dtype is None or not needs_dx or dx_dtype == dy.dtype:
        return impl.lowrank_linear_bwd(dy, s, weight, A, B, grad_B, scale, needs_dx)
    impl.lowrank_linear_bwd(dy, s, weight, A, B, grad_B, scale, False)
    return reference.input_gradient(dy, weight, A, B, scale, dx_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, grad_B, scale, backend, dx_dtype, _sketch_mask = inputs
    _, s = output
    ctx.save_for_backward(s, weight, A, B)
    # The accumulator is state, not an activation: keep a reference, do not save it.
    ctx.grad_B = grad_B
    ctx.scale = scale
    ctx.backend = backend
    ctx.dx_dtype = dx_dtype
    ctx.mark_non_differentiable(s)


def _backward(ctx, dy, _ds):
    s, weight, A, B = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx = _lowrank_linear_bwd(dy.contiguous(), s, weight, A, B, ctx.grad_B, ctx.scale, needs_dx, ctx.backend,
                             ctx.dx_dtype)
    return (dx if needs_dx else None), None, None, None, None, None, None, None, None, None


_lowrank_linear.register_autograd(_backward, setup_context=_setup_context)


class LowRankLinearFunction(torch.autograd.Function):
    """The eager path: the registered op's forward and backward, without its dispatch overhead."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, grad_B, scale, impl, dx_dtype, sketch_mask=None):
        y, s = forward(impl, x, weight, bias, A, B, scale, sketch_mask)
        ctx.save_for_backward(s, weight, A, B)
        # State and constants, not activations.
        ctx.grad_B, ctx.scale, ctx.impl, ctx.dx_dtype = grad_B, scale, impl, dx_dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        s, weight, A, B = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[0]
        dx = backward(ctx.impl, dy.contiguous(), s, weight, A, B, ctx.grad_B, ctx.scale, needs_dx, ctx.dx_dtype)
        return dx, None, None, None, None, None, None, None, None, None


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    grad_B: torch.Tensor,
    scale: float,
    backend: str = "auto",
    dx_dtype: Optional[torch.dtype] = None,
    sketch_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x W^T + b + scale (x A^T) B^T; backward adds scale dY^T (x A^T) into grad_B.

    weight is (d_out, d_in) (a transposed view is fine), A is (r, d_in) in x's dtype, B and
    grad_B are (d_out, r) fp32. Leading dimensions of x are kept. dx_dtype: the dtype the input
    gradient's products run in (fastcl.precision), None for x's own. sketch_mask (x's leading
    shape): grad_B learns only from the rows it weights; y and dX are unchanged.
    """
    if torch.compiler.is_compiling():
        y, _ = _lowrank_linear(x, weight, bias, A, B, grad_B, float(scale), backend, dx_dtype, sketch_mask)
        return y
    impl = backends.implementation(backend, x.device)
    if not torch.is_grad_enabled():  # serving: no graph to build
        return impl.lowrank_linear_fwd(x, weight, bias, A, B, scale)[0]
    return LowRankLinearFunction.apply(x, weight, bias, A, B, grad_B, float(scale), impl, dx_dtype, sketch_mask)
