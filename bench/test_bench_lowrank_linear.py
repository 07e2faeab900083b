"""The fast-weight linear against its baselines, forward and forward+backward (pytest-benchmark).

Providers, side by side in each benchmark group:

    linear             nn.Linear (cuBLAS on a GPU): the base cost, no adapter
    peft               PEFT LoRA, eager, dropout 0 (trains A and B)
    compiled_reference fastcl.ops.reference under torch.compile (fwd; fwd then bwd)
    fastcl_torch       fastcl.ops.lowrank_linear, backend "torch" (eager: a plain autograd.Function)
    fastcl_torch_op    the registered custom op torch.ops.fastcl.lowrank_linear, backend "torch":
                       what torch.compile calls; against fastcl_torch, its dispatch overhead
    fastcl_triton      the custom op, backend "triton" (GPU only)
    fastcl_cuda        the custom op, backend "cuda": fastcl._C's kernels (GPU only)

Shapes: Llama-3-8B and SmolLM2-135M projections, ranks 8/16/64. Forward+backward takes dX (the
served path needs it) and the adapter's gradient.

On a GPU (bf16), M in {1, 16, 2048, 8192} and the whole matrix runs; it is long (every
compiled_reference case compiles once), so select with -k, e.g. `-k "fwd and 4096x14336"`.

On a CPU (fp32), M in {1, 16, 512}: every SmolLM2 case, and the Llama-3-8B shapes at M <= 16.
At M = 512 an 8B projection costs 4 to 60 GFLOP a forward (about 0.1 to 1 s a call on one
core, three times that forward+backward), so only the two smaller 8B projections run there,
at r = 16; the others are skipped with that reason, which keeps all of `pytest bench/` within
about 10 minutes (`FASTCL_BENCH_FULL_GRID=1` times them too: about 7 more minutes on one AMD
EPYC core). Rounds adapt to each case's cost (about 0.4 s of timing per case). Run:

    .venv/bin/pytest bench/test_bench_lowrank_linear.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-json=bench/last-run.json
"""

from __future__ import annotations

import importlib.util
import os
import time
from functools import lru_cache

import pytest
import torch
import torch.nn as nn

from fastcl.ops import backends, lowrank_linear, reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

# (d_in, d_out)
LLAMA3_8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
SMOLLM2_135M = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
RANKS = [8, 16, 64]
ROWS = [1, 16, 2048, 8192] if CUDA else [1, 16, 512]
PROVIDERS = ["linear", "peft", "compiled_reference", "fastcl_torch", "fastcl_torch_op", "fastcl_triton", "fastcl_cuda"]
# The 8B projections that the CPU run times at M = 512, at this rank only (see the docstring);
# FASTCL_BENCH_FULL_GRID=1 times every shape and rank there too.
CPU_LARGE_M, CPU_LARGE_SHAPES, CPU_LARGE_RANK = 512, [(4096, 4096), (4096, 1024)], 16
FULL_GRID = os.environ.get("FASTCL_BENCH_FULL_GRID") == "1"
CPU_SECONDS_PER_CASE = 0.4


def skip_reason(provider: str, d_in: int, d_out: int, r: int, M: int) -> str | None:
    if provider in ("fastcl_triton", "fastcl_cuda"):
        backend = provider.split("_")[1]
        ok, why = backends.status(backend, DEVICE)
        if not CUDA:
            return f"{provider} needs a CUDA device: no GPU here (TRITON_INTERPRET is for correctness, not speed)"
        if not ok:
            return f"{provider} unavailable: {why}"
    if provider == "peft" and importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install -e '.[test]')"
    if not CUDA and not FULL_GRID and (d_in, d_out) in LLAMA3_8B and M >= CPU_LARGE_M:
        if (d_in, d_out) not in CPU_LARGE_SHAPES or r != CPU_LARGE_RANK:
            return (f"Llama-3-8B at M={M} on a CPU: 4-60 GFLOP a call; the CPU run keeps r={CPU_LARGE_RANK} on "
                    f"{', '.join(_label(*s) for s in CPU_LARGE_SHAPES)} so that pytest bench/ stays within ~10 min "
                    "(FASTCL_BENCH_FULL_GRID=1 runs them all)")
    return None


@lru_cache(maxsize=1)
def _weights(d_in: int, d_out: int) -> torch.Tensor:
    """W for one shape, shared by every rank, M and provider (an 8B W takes a while to draw)."""
    g = torch.Generator(DEVICE).manual_seed(d_in * 100_003 + d_out)
    return (torch.randn(d_out, d_in, generator=g, device=DEVICE) / d_in**0.5).to(DTYPE)


class Problem:
    """One (shape, rank, M) case: inputs shared by every provider."""

    def __init__(self, d_in, d_out, r, M):
        # Drawn where they are used: an 8B-sized x drawn on a CPU and copied takes seconds a case.
        on = dict(device=DEVICE)
        g = torch.Generator(DEVICE).manual_seed(0)
        self.x = torch.randn(M, d_in, generator=g, **on).to(DTYPE)
        self.W = _weights(d_in, d_out)
        self.b = None  # Llama projections have no bias
        self.A = (torch.randn(r, d_in, generator=g, **on) / d_in**0.5).to(DTYPE)
        self.B = (torch.randn(d_out, r, generator=g, **on) * 0.01).requires_grad_()
        self.grad_B = torch.zeros(d_out, r, **on)
        self.dy = torch.randn(M, d_out, generator=g, **on).to(DTYPE)
        self.scale = 1.0
        self.r = r

    def linear(self):
        layer = nn.Linear(self.W.shape[1], self.W.shape[0], bias=False, device=DEVICE, dtype=DTYPE)
        layer.weight.data.copy_(self.W)
        layer.requires_grad_(False)
        return layer

    def peft(self):
        from peft import LoraConfig, inject_adapter_in_model

        class Holder(nn.Module):
            def __init__(self, proj):
                super().__init__()
                self.proj = proj

            def forward(self, x):
                return self.proj(x)

        config = LoraConfig(r=self.r, lora_alpha=self.r, lora_dropout=0.0, target_modules=["proj"])
        model = inject_adapter_in_model(config, Holder(self.linear())).to(device=DEVICE, dtype=DTYPE)
        return model


def make_call(provider: str, p: Problem, mode: str):
    """A no-argument callable running one forward (mode "fwd") or forward+backward ("fwd_bwd")."""
    x_leaf = p.x.clone().requires_grad_(mode == "fwd_bwd")

    if provider in ("linear", "peft"):
        module = p.linear() if provider == "linear" else p.peft()

        def forward():
            return module(x_leaf)

    elif provider == "fastcl_torch_op":
        def forward():
            return torch.ops.fastcl.lowrank_linear(x_leaf, p.W, p.b, p.A, p.B, p.grad_B, p.scale, "torch")[0]

    elif provider in ("fastcl_torch", "fastcl_triton", "fastcl_cuda"):
        backend = provider.split("_")[1]

        def forward():
            return lowrank_linear(x_leaf, p.W, p.b, p.A, p.B, p.grad_B, p.scale, backend=backend)

    elif provider == "compiled_reference":
        torch._dynamo.reset()  # each case compiles for its own static shapes
        if mode == "fwd":
            compiled = torch.compile(reference.lowrank_linear_fwd, dynamic=False)

            def run():
                return compiled(p.x, p.W, p.b, p.A, p.B.detach(), p.scale)
        else:
            def step(x, W, A, B, grad_B, dy):
                y, s = reference.lowrank_linear_fwd(x, W, None, A, B, p.scale)
                return y, reference.lowrank_linear_bwd(dy, s, W, A, B, grad_B, p.scale, True)

            compiled = torch.compile(step, dynamic=False)

            def run():
                return compiled(p.x, p.W, p.A, p.B.detach(), p.grad_B, p.dy)
        return _synced(run)
    else:
        raise ValueError(provider)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
    else:
        def run():
            y = forward()
            y.backward(p.dy)
            return y
    return _synced(run)


def _synced(fn):
    if not CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _label(d_in, d_out):
    return f"{d_in}x{d_out}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("d_in,d_out", LLAMA3_8B + SMOLLM2_135M, ids=[_label(*s) for s in LLAMA3_8B + SMOLLM2_135M])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_lowrank_linear(benchmark, mode, d_in, d_out, r, M, provider):
    reason = skip_reason(provider, d_in, d_out, r, M)
    if reason:
        pytest.skip(reason)
    p = Problem(d_in, d_out, r, M)
    run = make_call(provider, p, mode)
    run()  # compile / autotune / allocate outside the timing
    benchmark.group = f"{mode} {_label(d_in, d_out)} r={r} M={M}"
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        dtype=str(DTYPE),
        threads=torch.get_num_threads(),
        adapter_flop_share=r * (d_in + d_out) / (d_in * d_out),
    )
    if provider == "fastcl_triton":
        from fastcl.kernels.lowrank_linear import shrink_plan

        plan = shrink_plan(M, d_out, d_in, r, DTYPE)
        benchmark.extra_info["forward_plan"] = ("split: " if plan.split else "fused: ") + plan.why
    if CUDA:
        benchmark(run)
    else:
        benchmark.pedantic(run, **_cpu_rounds(run))


def _cpu_rounds(run) -> dict:
    """Rounds and iterations for about CPU_SECONDS_PER_CASE of timing: at least 3 rounds, and
    enough iterations per round that a round lasts a millisecond or more."""
    start = time.perf_counter()
    run()
    once = max(time.perf_counter() - start, 1e-6)
    iterations = max(1, int(1e-3 / once))
    rounds = min(50, max(3, int(CPU_SECONDS_PER_CASE / (once * iterations))))
    return dict(rounds=rounds, iterations=iterations, warmup_rounds=1)
