"""Which implementation of the op runs where, and why the others were passed over.

Three backends implement `lowrank_linear_fwd` / `lowrank_linear_bwd` with one signature:
"torch" (fastcl.ops.reference), "triton" (fastcl.kernels) and "cuda" (fastcl._C). Each module
exposes the two functions; this file only decides which module to use.
"""

from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache
from types import ModuleType

import torch

from ..errors import BackendUnavailable

log = logging.getLogger("fastcl")

BACKENDS = ("torch", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS
# On a GPU too, the PyTorch implementation first: on an H200 (bench/RESULTS.md, "GPU run") it
# served-and-learned faster than both fused backends (observe, SmolLM2-135M shapes, 8x512
# tokens, bf16: torch 169 ms, triton 195, cuda 232), and the Triton forward was 1.7-3.9x
# nn.Linear at prefill. The fused backends stay available by name until a GPU run shows them
# ahead.
_AUTO_ORDER_CUDA = ("torch", "triton", "cuda")


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str]:
    """Import a backend's module once; return (module, "") or (None, why it is missing)."""
    if name == "torch":
        from . import reference

        return reference, ""
    module_name = {"triton": "fastcl.ops.triton_backend", "cuda": "fastcl.ops.cuda_backend"}[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the backend's own dependency is missing
        return None, f"cannot import {module_name}: {exc}"
    reason = getattr(module, "UNAVAILABLE_REASON", "")
    return (None, reason) if reason else (module, "")


def status(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """(available, reason) for one backend, for tensors on `device` (default: CUDA if present)."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {CHOICES}")
    module, reason = _load(name)
    if module is None:
        return False, reason
    device = torch.device(device) if device is not None else None
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if name == "triton" and not on_cuda and not _interpreting_triton():
        return False, "tensors are not on a CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU)"
    if name == "cuda" and not on_cuda:
        return False, "tensors are not on a CUDA device"
    return True, "available"


def resolve(backend: str, device: torch.device | str) -> str:
    """Turn "auto" (or a name) into the backend that will run on `device`, or raise why not."""
    device = torch.device(device)
    if backend == "auto":
        return _resolve_auto(device.type)
    ok, reason = status(backend, device)
    if not ok:
        raise BackendUnavailable(f"backend {backend!r} is unavailable: {reason}")
    return backend


@lru_cache(maxsize=None)
def _resolve_auto(device_type: str) -> str:
    if device_type != "cuda":
        log.info("fastcl backend auto -> torch: tensors are on %s; the fused kernels need CUDA", device_type)
        return "torch"
    passed_over = []
    for name in _AUTO_ORDER_CUDA:
        ok, reason = status(name, device_type)
        if ok:
            why = f"first available on {device_type} in the order {', '.join(_AUTO_ORDER_CUDA)}"
            if passed_over:
                why += f"; passed over: {'; '.join(passed_over)}"
            log.info("fastcl backend auto -> %s (%s)", name, why)
            return name
        passed_over.append(f"{name}: {reason}")
    raise AssertionError("the torch backend is always available")


def check_rank(backend: str, device: torch.device | str, rank: int) -> None:
    """Raise (RuntimeError) where `backend` cannot run A with `rank` rows (the CUDA kernels keep
    the sketch in shared memory, up to a fixed rank); a no-op for backends without a limit."""
    check = getattr(implementation(backend, device), "check_rank", None)
    if check is not None:
        check(rank)


def implementation(backend: str, device: torch.device | str) -> ModuleType:
    """The module whose lowrank_linear_fwd/bwd run `backend` on `device`."""
    module, _ = _load(resolve(backend, device))
    return module


def serving_forward(impl: ModuleType, weight, bias, A, B, scale: float, dtype: torch.dtype):
    """(run, copy) where run(x) is impl's forward output for fixed W, b, A, B and copy is what it
    holds besides them (a re-laid-out B, or None). Backends without a serving form of their own
    call their forward with the operands bound."""
    prepare = getattr(impl, "serving_forward", None)
    if prepare is not None:
        return prepare(weight, bias, A, B, scale, dtype)
    forward = impl.lowrank_linear_fwd
    return (lambda x: forward(x, weight, bias, A, B, scale)[0]), None
