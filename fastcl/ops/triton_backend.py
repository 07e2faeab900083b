"""The "triton" backend: the reference's two functions, run by the kernels in fastcl.kernels.

This adapter checks the inputs (a clear error instead of a wrong answer) and folds leading
dimensions into rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import BackendUnavailable

try:
    from ..kernels import lowrank_linear as _kernels
except ImportError as exc:  # triton missing or too old; backends.py reports the reason
    _kernels = None
    UNAVAILABLE_REASON = f"the Triton kernels cannot be imported: {exc}"
else:
    UNAVAILABLE_REASON = ""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, others=()) -> None:
    """Dtypes and devices; x stands for the activation (the input, or dY in backward)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend takes float32, float16 or bfloat16 inputs, got {x.dtype}; "
                        "use backend='torch' for other dtypes")
    for name, t in (("weight", weight), ("A", A)) + tuple(others):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but the input is {x.dtype}; they must match")
    if B.dtype != torch.float32:
        raise TypeError(f"B (the fast weights) must be float32, got {B.dtype}")
    for name, t in (("weight", weight), ("A", A), ("B", B)) + tuple(others):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if x.device.type == "cpu" and not _kernels.INTERPRETED:
        raise BackendUnavailable(
            "the Triton kernels were imported without TRITON_INTERPRET=1, so they cannot run on CPU "
            "tensors; set it before fastcl.kernels is first imported (tests/conftest.py does)")
    d_out, d_in = weight.shape
    if A.dim() != 2 or A.shape[1] != d_in or B.shape != (d_out, A.shape[0]):
        raise ValueError(f"shapes do not fit: weight {tuple(weight.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")


def lowrank_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    others = (("bias", bias),) if bias is not None else ()
    _check(x, weight, A, B, others)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    lead = x.shape[:-1]
    # reshape is a view whenever the rows can be addressed with one stride; the kernel takes
    # any strides, so only layouts that cannot be are copied.
    y, s = _kernels.lowrank_linear_fwd(x.reshape(-1, x.shape[-1]), weight, bias, A, B, scale)
    return y.view(*lead, y.shape[-1]), s.view(*lead, s.shape[-1])


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
    _check(dy, weight, A, B, (("s", s),))
    if grad_B.dtype != torch.float32 or grad_B.shape != B.shape or grad_B.device != dy.device:
        raise TypeError(f"grad_B must be a float32 {tuple(B.shape)} tensor on {dy.device}, got "
                        f"{grad_B.dtype} {tuple(grad_B.shape)} on {grad_B.device}")
    if dy.shape[:-1] != s.shape[:-1] or dy.shape[-1] != weight.shape[0] or s.shape[-1] != A.shape[0]:
        raise ValueError(f"dy {tuple(dy.shape)} and s {tuple(s.shape)} do not fit weight {tuple(weight.shape)} "
                         f"and A {tuple(A.shape)}")
    dy2 = dy.reshape(-1, dy.shape[-1])
    s2 = s.reshape(-1, s.shape[-1])
    dx = _kernels.lowrank_linear_bwd(dy2, s2, weight, A, B, grad_B, scale, needs_dx)
    return None if dx is None else dx.view(*dy.shape[:-1], weight.shape[1])
