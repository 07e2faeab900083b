"""Backend "cuda": the fastcl._C extension (csrc/) behind the backend interface.

Same two functions and semantics as fastcl.ops.reference. This module flattens leading
dimensions, makes inputs contiguous where the kernels need it, and passes the current CUDA
stream of the tensors' device. The binding cannot take the stream from c10, since it is
compiled against torch/extension.h only (DESIGN.md). Passing the current stream keeps the
kernels ordered with torch's own work and lets CUDA graphs capture them.

UNAVAILABLE_REASON is "" when the extension imported, else why not: not built (with the
reason setup.py recorded), or built but not loadable here.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

import torch


def _not_built_reason() -> str:
    try:
        from .._build_info import BUILD_INFO
    except ImportError:
        return ("no build metadata (fastcl/_build_info.py is written by setup.py; "
                "install with `pip install --no-build-isolation .`)")
    return BUILD_INFO.get("cuda_extension_reason") or "setup.py skipped it without a reason"


def _load_extension():
    if importlib.util.find_spec("fastcl._C") is None:
        return None, f"fastcl._C was not built: {_not_built_reason()}"
    try:
        return importlib.import_module("fastcl._C"), ""
    except ImportError as exc:  # e.g. built against another torch or CUDA than the one installed
        return None, f"fastcl._C is installed but failed to import: {exc}"


_C, UNAVAILABLE_REASON = _load_extension()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def check_rank(r: int) -> None:
    """The extension checks this too. Checked here first because the rank is the one limit a
    correct call can hit (patch(rank=128, backend="cuda")), and because on the lent H200's
    image a message formatted inside _C crashed the process (bench/RESULTS.md, "GPU run")."""
    if not 1 <= r <= _C.MAX_RANK:
        raise RuntimeError(f"fastcl._C: rank {r} is outside 1..{_C.MAX_RANK} (the fused kernels keep the sketch "
                           'beside the output tile in shared memory); use backend "torch" or "triton" for larger ranks')


def _weight_for_kernels(weight: torch.Tensor) -> torch.Tensor:
    """The kernels read W row-major (nn.Linear) or column-major (Conv1D's transposed view);
    anything else is copied (rare: a sliced weight)."""
    if weight.stride(-1) == 1 or weight.stride(0) == 1:
        return weight
    return weight.contiguous()


def lowrank_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (y, s) with y = x W^T + b + scale s B^T and s = x A^T, as the reference."""
    check_rank(A.shape[0])
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y, s = _C.lowrank_linear_fwd(
        x2, _weight_for_kernels(weight), None if bias is None else bias.contiguous(), A.contiguous(),
        B.contiguous(), float(scale), _stream(x2),
    )
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
    """Add scale dY^T s into grad_B (fp32, in place) and return dX, or None if not needed."""
    check_rank(A.shape[0])
    dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
    s2 = s.reshape(-1, s.shape[-1]).contiguous()
    dx = _C.lowrank_linear_bwd(
        dy2, s2, _weight_for_kernels(weight), A.contiguous(), B.contiguous(), grad_B, float(scale),
        bool(needs_dx), _stream(dy2),
    )
    if dx is None:
        return None
    return dx.view(*dy.shape[:-1], dx.shape[-1])
