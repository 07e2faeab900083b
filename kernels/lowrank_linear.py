"""Triton kernels for the low-rank fast-weight linear, and their launchers.

Forward, for x (M, K), W (N, K), A (R, K) frozen, B (N, R) fp32, c the scale:

    s = x A^T                      (M, R)  written for backward, in x's dtype
    y = x W^T + b + c s B^T        (M, N)

Backward, given dY (M, N):

    dX  = dY W + c (dY B) A        (M, K)
    dB += c dY^T s                 (N, R)  added into the caller's fp32 accumulator

Kernels (STYLE.md: one name across languages):

    _lowrank_linear_fwd_kernel      y, and s in the same K loop (x tiles read once for both)
    _lowrank_shrink_kernel          s alone, for the split forward (see `shrink_plan`)
    _lowrank_linear_bwd_kernel      dX
    _lowrank_grad_b_kernel          dB, one writer per element (bitwise repeatable)

Launchers `lowrank_linear_fwd` / `lowrank_linear_bwd` take 2-D tensors with any strides; the
adapter in fastcl/ops/triton_backend.py handles leading dimensions and checks the inputs.

All products accumulate in fp32. Half-precision operands go to the tensor cores as they are;
fp32 operands use IEEE fp32 unless torch allows TF32 for matmuls, so the kernels round like
torch.matmul on the same inputs.

TRITON_INTERPRET=1 is read when this module is imported (`triton.jit` returns an interpreted
function then), so it must be set before the first import; the test suite's conftest does that
on machines without CUDA. Under the interpreter every kernel gets one small config.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Map a 1-D program id to (row tile, column tile), walking GROUP row tiles per column
    sweep so that consecutive programs share the same weight tiles in L2."""
    in_group = GROUP * num_cols
    group = pid // in_group
    first_row = group * GROUP
    rows_here = tl.minimum(num_rows - first_row, GROUP)
    row = first_row + (pid % in_group) % rows_here
    col = (pid % in_group) // rows_here
    return row, col


@triton.jit
def _lowrank_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, s_ptr,
    M, N, K, R, M_BUCKET, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_sm, stride_sr,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y.

    FUSE_SHRINK: the K loop that reads x for x W^T also feeds x A^T (R_PAD extra columns), so x
    is read once; every N tile recomputes its rows' sketch and the first N tile stores it.
    Otherwise s was written by _lowrank_shrink_kernel and is loaded in the epilogue.
    M_BUCKET is unused in the body: it is part of the autotuning key.
    """
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    # int64 row offsets: M * stride overflows int32 at long prefills.
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # W^T tile
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # A^T tile

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if FUSE_SHRINK:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            s_acc = tl.dot(x, a, s_acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    s_ptrs = s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
    mask_s = mask_m[:, None] & mask_r[None, :]
    if FUSE_SHRINK:
        # s is rounded to x's dtype, as the reference's x @ A^T is, before it meets B.
        s = s_acc.to(y_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(s_ptrs, s, mask=mask_s)
    else:
        s = tl.load(s_ptrs, mask=mask_s, other=0.0)
    bt_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # B^T tile
    bt = tl.load(bt_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(y_ptr.dtype.element_ty)
    adapter = tl.dot(s, bt, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = acc + scale * adapter
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lowrank_shrink_kernel(
    x_ptr, a_ptr, s_ptr, M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """s = x A^T for one BLOCK_M row tile: the split forward's one extra read of x."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    s_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        s_acc = tl.dot(x, a, s_acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    s_ptrs = s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, s_acc.to(s_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lowrank_linear_bwd_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, dx_ptr,
    M, N, K, R, M_BUCKET, scale,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_K) tile of dX = dY W + c (dY B) A, in one sweep over N.

    dB is not computed here. An earlier version added c dY^T s from the same dY tiles, in a
    branch taken by one K-tile program per N tile; on an H200 (triton 3.6) the software
    pipeliner got that branch wrong (dB wrong in fp32 whenever num_stages > 1, right with 1).
    _lowrank_grad_b_kernel computes dB instead, at the price of one more read of dY and s
    (bench/RESULTS.md, "GPU run").
    """
    pid = tl.program_id(0)
    pid_m, pid_k = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < R
    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)  # dY B for this row tile
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(dy_ptr.dtype.element_ty)
        t_acc = tl.dot(dy, b, t_acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
        b_ptrs += BLOCK_N * stride_bn

    t = t_acc.to(dy_ptr.dtype.element_ty)  # rounded like the reference's dY @ B
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    dx = acc + scale * tl.dot(t, a, input_precision=PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _lowrank_grad_b_kernel(
    dy_ptr, s_ptr, gb_ptr, M, N, R, M_BUCKET, scale,
    stride_dym, stride_dyn, stride_sm, stride_sr, stride_gbn, stride_gbr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad_B[n tile] += c dY[:, n tile]^T s, looping over all rows: one writer per element and
    a fixed order, so the same inputs give the same bits without a workspace or atomics."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < N
    mask_r = offs_r < R
    dyt_ptrs = dy_ptr + offs_m[None, :].to(tl.int64) * stride_dym + offs_n[:, None] * stride_dyn  # dY^T tile
    s_ptrs = s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mask_m = offs_m < M - m0
        dyt = tl.load(dyt_ptrs, mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        s = tl.load(s_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(dyt, s, acc, input_precision=PRECISION)
        dyt_ptrs += BLOCK_M * stride_dym
        s_ptrs += BLOCK_M * stride_sm
    gb_ptrs = gb_ptr + offs_n[:, None] * stride_gbn + offs_r[None, :] * stride_gbr
    mask = mask_n[:, None] & mask_r[None, :]
    tl.store(gb_ptrs, tl.load(gb_ptrs, mask=mask, other=0.0) + scale * acc, mask=mask)


# ----------------------------------------------------------------------------- autotuning
#
# BLOCK_M is set by the launcher from the M bucket (it decides the decode path and the size of
# the backward's workspace); the autotuner picks the rest. Keys: (M_BUCKET, N, K, R) plus the
# dtypes of the tensor arguments, which triton's autotuner appends to every key. The GPU sets
# are small on purpose (each new key benchmarks all of them once). Under the interpreter every
# kernel has one config, so nothing is benchmarked and the tests stay fast.

_TUNE_KEY = ["M_BUCKET", "N", "K", "R"]


def _configs(gpu: list[dict], interpreted: dict) -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config(interpreted, num_warps=4, num_stages=1)]
    return [triton.Config({k: v for k, v in c.items() if k not in ("warps", "stages")},
                          num_warps=c["warps"], num_stages=c["stages"]) for c in gpu]


# Prefill: square-ish tiles for the tensor cores, grouped launch order for L2 reuse of W.
_FWD_PREFILL = _configs(
    [dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, warps=8, stages=3),
     dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=8, warps=4, stages=4),
     dict(BLOCK_N=128, BLOCK_K=32, GROUP_M=8, warps=4, stages=4),
     dict(BLOCK_N=256, BLOCK_K=64, GROUP_M=8, warps=8, stages=3)],
    dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4))
# Decode (M <= 16, one row tile): memory-bound on W. Narrow N tiles spread W over many SMs, long
# K tiles keep enough bytes in flight per program.
_FWD_DECODE = _configs(
    [dict(BLOCK_N=32, BLOCK_K=128, GROUP_M=1, warps=4, stages=4),
     dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, warps=4, stages=4),
     dict(BLOCK_N=64, BLOCK_K=256, GROUP_M=1, warps=4, stages=3),
     dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=1, warps=4, stages=3)],
    dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=1))
_SHRINK = _configs(
    [dict(BLOCK_K=128, warps=4, stages=4), dict(BLOCK_K=256, warps=4, stages=3), dict(BLOCK_K=64, warps=2, stages=4)],
    dict(BLOCK_K=32))
# (BLOCK_N=64, BLOCK_K=64, 4 warps, 4 stages) is left out: on an H200 (triton 3.6) it gave
# NaN dX in fp16 and bf16 at 64-row tiles and an illegal address inside the autotuner, with
# these three configs right on the same inputs (bench/RESULTS.md, "GPU run").
_BWD = _configs(
    [dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=8, warps=8, stages=3),
     dict(BLOCK_N=32, BLOCK_K=128, GROUP_M=8, warps=4, stages=4),
     dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, warps=8, stages=3)],
    dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=4))
_GRAD_B = _configs(
    [dict(BLOCK_N=64, warps=4, stages=4), dict(BLOCK_N=128, warps=4, stages=3), dict(BLOCK_N=32, warps=2, stages=4)],
    dict(BLOCK_N=32))

_fwd_prefill = triton.autotune(_FWD_PREFILL, key=_TUNE_KEY)(_lowrank_linear_fwd_kernel)
_fwd_decode = triton.autotune(_FWD_DECODE, key=_TUNE_KEY)(_lowrank_linear_fwd_kernel)
_shrink = triton.autotune(_SHRINK, key=["M_BUCKET", "K", "R"])(_lowrank_shrink_kernel)
_bwd = triton.autotune(_BWD, key=_TUNE_KEY)(_lowrank_linear_bwd_kernel)
# Benchmarking runs the kernel several times: the accumulator it adds into must be restored.
_grad_b = triton.autotune(_GRAD_B, key=["M_BUCKET", "N", "R"], restore_value=["gb_ptr"])(_lowrank_grad_b_kernel)

DECODE_MAX_M = 16


def m_bucket(M: int) -> int:
    """The autotuning bucket of a row count: a power of two from 16 to 8192."""
    return min(max(16, triton.next_power_of_2(M)), 8192)


def block_m(M: int) -> int:
    """Rows per tile. 16 for decode (all rows in one tile). Larger tiles at prefill cut the
    re-reads of W."""
    if M <= DECODE_MAX_M:
        return 16
    if INTERPRETED:
        return 32  # keeps the interpreter quick and still gives several row tiles at M=133
    return 64 if M <= 1024 else 128


def bwd_block_m(M: int) -> int:
    """Rows per tile of the dX kernel: block_m, but never 128. On an H200 (triton 3.6) the dX
    configs with 128-wide K tiles and 8 warps computed wrong dX at 128-row tiles in fp16 and bf16
    (every element off, and illegal addresses while the autotuner benchmarked them), and were
    right at 64-row tiles in every dtype (bench/triton_config_sweep.py, bench/RESULTS.md)."""
    return min(block_m(M), 64)


def r_pad(R: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two; padded columns are masked to 0."""
    return max(16, triton.next_power_of_2(R))


def _precision(dtype: torch.dtype) -> str:
    # Only fp32 operands are affected. Match torch.matmul: TF32 only where torch allows it.
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


# ----------------------------------------------------------------------------- forward split rule


@dataclass(frozen=True)
class ShrinkPlan:
    split: bool
    why: str


# Nominal H100 SXM figures for the cost model below. Not measured here (no GPU in the session
# that wrote this): bench/test_bench_lowrank_linear.py is where the rule gets confirmed.
_PEAK_FLOPS = {torch.float16: 989e12, torch.bfloat16: 989e12, torch.float32: 67e12}
_HBM_BYTES_PER_S = 3.35e12
_LAUNCH_S = 4e-6
_NOMINAL_BLOCK_N = 128


def shrink_plan(M: int, N: int, K: int, R: int, dtype: torch.dtype, override: str = "auto") -> ShrinkPlan:
    """Fuse the shrink x A^T into every N tile of the forward, or run it once as its own kernel.

    Fused, each of the ceil(N / BLOCK_N) column tiles recomputes its rows' sketch: extra
    tensor-core work 2 M K R_PAD (tiles - 1). Split, s is computed once, at the price of a
    second read of x (M K bytes), a write and read of s, and one more launch. The rule picks
    whichever extra is cheaper on nominal H100 figures. It gives: fused at decode (the launch
    alone costs more than the adapter) and at narrow d_out; split at prefill once d_out is wide
    and r >= 32 (e.g. M=2048, 4096 -> 14336: split from r=16; 4096 -> 4096: split from r=32).
    It is a cost model, to be confirmed by the benchmark on a GPU; `override` ("fused",
    "split") or FASTCL_TRITON_SHRINK forces either way.
    """
    if override not in ("auto", "fused", "split"):
        raise ValueError(f"shrink must be 'auto', 'fused' or 'split', got {override!r}")
    if override != "auto":
        return ShrinkPlan(override == "split", f"forced {override}")
    if M <= DECODE_MAX_M:
        # A second launch would cost more than the whole adapter here. Every N tile re-reads A,
        # but A (r x d_in) is small enough to stay in L2, so HBM should see A and B about once.
        return ShrinkPlan(False, "decode: one launch, shrink fused")
    elt = torch.finfo(dtype).bits // 8
    tiles = triton.cdiv(N, _NOMINAL_BLOCK_N)
    fused_extra = 2 * M * K * r_pad(R) * (tiles - 1) / _PEAK_FLOPS[dtype]
    split_extra = (M * K * elt + 2 * M * R * elt) / _HBM_BYTES_PER_S + _LAUNCH_S
    split = fused_extra > split_extra
    return ShrinkPlan(split, f"cost model: fused recompute {fused_extra * 1e6:.1f} us vs split {split_extra * 1e6:.1f} us")


# ----------------------------------------------------------------------------- launchers


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not whichever is current; nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def lowrank_linear_fwd(x, weight, bias, A, B, scale, shrink: str | None = None):
    """(y, s) for 2-D x (M, K); any strides. shrink: None (FASTCL_TRITON_SHRINK or "auto"),
    "auto", "fused" or "split"."""
    M, K = x.shape
    N, R = weight.shape[0], A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    s = torch.empty((M, R), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, s
    plan = shrink_plan(M, N, K, R, x.dtype, shrink or os.environ.get("FASTCL_TRITON_SHRINK", "auto"))
    common = dict(R_PAD=r_pad(R), PRECISION=_precision(x.dtype), BLOCK_M=block_m(M))
    bucket = m_bucket(M)
    with _on_device(x):
        if plan.split:
            _shrink[(triton.cdiv(M, common["BLOCK_M"]),)](
                x, A, s, M, K, R, bucket,
                x.stride(0), x.stride(1), A.stride(0), A.stride(1), s.stride(0), s.stride(1), **common)
        kernel = _fwd_decode if M <= DECODE_MAX_M else _fwd_prefill
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](
            x, weight, bias if bias is not None else y, A, B, y, s,
            M, N, K, R, bucket, float(scale),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), A.stride(0), A.stride(1),
            B.stride(0), B.stride(1), y.stride(0), y.stride(1), s.stride(0), s.stride(1),
            HAS_BIAS=bias is not None, FUSE_SHRINK=not plan.split, **common)
    return y, s


def lowrank_linear_bwd(dy, s, weight, A, B, grad_B, scale, needs_dx):
    """grad_B += scale dY^T s (in place); return dX (M, K) or None. dy (M, N) and s (M, R) are
    2-D with any strides. Two kernels: dX, then dB (one writer per element, so the same inputs
    and tuned config give the same bits, run after run)."""
    M, N = dy.shape
    K, R = weight.shape[1], A.shape[0]
    if M == 0:
        return torch.zeros((0, K), dtype=dy.dtype, device=dy.device) if needs_dx else None
    bucket = m_bucket(M)
    precision = _precision(dy.dtype)
    bm = bwd_block_m(M)
    dx = None
    with _on_device(dy):
        if needs_dx:
            dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
            _bwd[lambda meta: (triton.cdiv(M, bm) * triton.cdiv(K, meta["BLOCK_K"]),)](
                dy, weight, A, B, dx,
                M, N, K, R, bucket, float(scale),
                dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), A.stride(0), A.stride(1),
                B.stride(0), B.stride(1), dx.stride(0), dx.stride(1),
                R_PAD=r_pad(R), PRECISION=precision, BLOCK_M=bm)
        _grad_b[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
            dy, s, grad_B, M, N, R, bucket, float(scale),
            dy.stride(0), dy.stride(1), s.stride(0), s.stride(1), grad_B.stride(0), grad_B.stride(1),
            R_PAD=r_pad(R), PRECISION=precision, BLOCK_M=block_m(M))
    return dx
