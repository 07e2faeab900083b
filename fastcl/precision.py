"""Input gradients in bfloat16: learning's backward at the CPU's bf16 rate, serving untouched.

Learning backpropagates dX through every layer down to the first patched one. On a CPU that is
about one forward's worth of fp32 GEMMs, most of what learning costs (bench/RESULTS.md). dX only
carries the learning signal down to the fast weights, so `backward_dtype="bfloat16"` runs its
products in bf16 and rounds back to the activations' dtype:

- each patched layer's dY W + c (dY B) A (fastcl.ops.reference.input_gradient), and
- the output embedding's dY W (`LowPrecisionInputGradient`, installed on that module), the
  largest single product for a small model with a large vocabulary.

What is learned is still formed in full precision: dB = c dY^T s from the fp32 dY a layer
receives, into the fp32 accumulator. The forward, and so everything served, is unchanged. Each
product's result carries bf16's relative rounding (about 2^-8); tests bound the error this puts
on the accumulated gradients.

"auto" (the default) picks bfloat16 only where it is both cheaper and a change: fp32 activations
on a CPU that multiplies bf16 natively (AVX512-BF16 or AMX), where these GEMMs run about 3-4x
faster than fp32. Elsewhere (a GPU, half-precision models, older CPUs, which would emulate bf16)
the backward runs in the activations' own dtype.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# Read once: a plain value, so torch.compile traces the lookups below (it warns on lru_cache).
_NATIVE_BF16 = any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                           "_is_amx_tile_supported"))


def cpu_has_native_bf16() -> bool:
    return _NATIVE_BF16


def input_gradient_dtype(setting: Optional[str], dtype: torch.dtype, device_type: str) -> Optional[torch.dtype]:
    """The dtype dX's products run in for activations of `dtype` on `device_type`, or None for
    the activations' own dtype."""
    if setting == "bfloat16":
        return torch.bfloat16 if dtype != torch.bfloat16 else None
    if setting == "auto":
        native = device_type == "cpu" and dtype == torch.float32 and cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    return None


class LowPrecisionInputGradient(torch.autograd.Function):
    """y = x W^T + b for a frozen linear layer; backward returns dX = dY W computed in `dtype`,
    a block of rows at a time so the low-precision copy of dY stays bounded."""

    ROWS = 1024  # each block reads all of W: few blocks, while a block's copy of dY stays small

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        low = weight.to(ctx.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dy2.new_empty(dy2.shape[0], weight.shape[1])
        for start in range(0, dy2.shape[0], LowPrecisionInputGradient.ROWS):
            rows = slice(start, start + LowPrecisionInputGradient.ROWS)
            dx[rows] = torch.mm(dy2[rows].to(ctx.dtype), low)
        return dx.view(*dy.shape[:-1], weight.shape[1]), None, None, None


def _output_forward(self, x):
    dtype = input_gradient_dtype(self._fastcl_backward_dtype, x.dtype, x.device.type)
    if dtype is None or not torch.is_grad_enabled() or not x.requires_grad or self.weight.requires_grad:
        return F.linear(x, self.weight, self.bias)
    return LowPrecisionInputGradient.apply(x, self.weight, self.bias, dtype)


def describe(setting: Optional[str], dtype: torch.dtype, device_type: str) -> str:
    """One line for the patch report: which dtype the input gradients run in, and why."""
    low = input_gradient_dtype(setting, dtype, device_type)
    if low is not None:
        text = f"input gradients (dX) run in {str(low).replace('torch.', '')} (backward_dtype={setting!r})"
        if device_type == "cpu" and not cpu_has_native_bf16():
            # Measured on an AVX2 EPYC: a 256 x 576 x 1536 bf16 GEMM took 40x its fp32 time.
            text += "; this CPU has no native bf16, so they are emulated, many times slower than in float32"
        return text
    why = ""
    if setting == "auto":
        name = str(dtype).replace("torch.", "")
        why = (f": {name} weights" if dtype != torch.float32 else f": on {device_type}" if device_type != "cpu"
               else ": this CPU has no native bf16")
    return f"input gradients (dX) run in the model's dtype (backward_dtype={setting!r}{why})"


def install(model: nn.Module, setting: Optional[str]) -> None:
    """Give the output embedding (a frozen nn.Linear, not patched) the low-precision input
    gradient when `setting` asks for one (resolved per call, so it follows model.to())."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if setting is None or type(head) is not nn.Linear or "forward" in head.__dict__:
        return
    head._fastcl_backward_dtype = setting
    head.forward = types.MethodType(_output_forward, head)


def remove(model: nn.Module) -> None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    forward = None if head is None else head.__dict__.get("forward")
    if isinstance(forward, types.MethodType) and forward.__func__ is _output_forward:
        del head.forward, head._fastcl_backward_dtype
