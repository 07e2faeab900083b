"""The Triton backend against the PyTorch reference: forward (y, s) and backward (dX, dB) on odd
shapes, both forward plans, both backward reductions, leading dims and strided inputs, a whole
patched tiny Llama, and torch.compile.

Without CUDA these run the kernels under TRITON_INTERPRET=1 (set by conftest.py before the
kernels are imported); with CUDA they run the compiled kernels on the GPU. bf16 runs on a GPU
only: the interpreter misreads bf16 loads (DESIGN.md).
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastcl
from fastcl.ops import backends, lowrank_linear, reference
from helpers import assert_close, op_operands, random_ids, tiny_model

kernels = pytest.importorskip("fastcl.kernels.lowrank_linear", reason="triton is not installed")
from fastcl.ops import triton_backend  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA and not kernels.INTERPRETED:
    pytest.skip("no CUDA device and the kernels were imported without TRITON_INTERPRET=1 "
                "(tests/conftest.py sets it unless the environment says otherwise)", allow_module_level=True)

BF16_ON_GPU_ONLY = pytest.mark.skipif(
    not CUDA, reason="bf16 needs a GPU: triton's interpreter misreads bf16 loads (errors ~1e11, DESIGN.md)")
# dB is accumulated in fp32 from low-precision dY and s: compared relative to its largest entry.
DB_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make(M, d_in, d_out, r, dtype, bias=True, lead=()):
    x, W, b, A, B, g = op_operands(M, d_in, d_out, r, dtype, bias, lead)
    dy = torch.randn(*lead, M, d_out, generator=g).to(dtype)
    grad_B0 = torch.randn(d_out, r, generator=g)  # accumulators already hold earlier gradients
    on = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return tuple(on(t) for t in (x, W, b, A, B, dy, grad_B0))


def up(t):
    """The oracle runs in fp32 on the same (already rounded) inputs."""
    return None if t is None else t.float()


def finished(t, stage: str) -> None:
    """Wait for the GPU work queued so far, so that an asynchronous fault (an illegal address)
    is raised here and names the stage that caused it, not some later call."""
    if t.is_cuda:
        try:
            torch.cuda.synchronize(t.device)
        except Exception as exc:
            raise RuntimeError(f"{stage}: {exc}") from exc


def check_against_reference(x, W, b, A, B, dy, grad_B0, scale, dtype, **launch):
    """Run the Triton forward and backward (through the backend adapter, or straight through the
    launchers when `launch` options are given) and compare every output with the reference."""
    grad_B = grad_B0.clone()
    if launch:
        y, s = kernels.lowrank_linear_fwd(x, W, b, A, B, scale, **{k: v for k, v in launch.items() if k == "shrink"})
        finished(x, "forward")
        dx = kernels.lowrank_linear_bwd(dy, s, W, A, B, grad_B, scale, True)
        finished(x, "backward")
    else:
        y, s = triton_backend.lowrank_linear_fwd(x, W, b, A, B, scale)
        dx = triton_backend.lowrank_linear_bwd(dy, s, W, A, B, grad_B, scale, True)
    y_ref, s_ref = reference.lowrank_linear_fwd(up(x), up(W), up(b), up(A), B, scale)
    grad_B_ref = grad_B0.clone()
    dx_ref = reference.lowrank_linear_bwd(up(dy), up(s), up(W), up(A), B, grad_B_ref, scale, True)
    assert y.dtype == s.dtype == dx.dtype == dtype and grad_B.dtype == torch.float32
    assert_close(s, s_ref, dtype, "s")
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dX")
    added, added_ref = grad_B - grad_B0, grad_B_ref - grad_B0
    assert_close(added, added_ref, dtype, "dB", atol=DB_TOL[dtype] * added_ref.abs().max().item())


SHAPES = [(72, 200), (200, 72)]  # not multiples of any block size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 7, 133])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("r", [1, 8, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_match_reference(dtype, M, d_in, d_out, r, bias):
    # M=1 and 7 take the decode path (one row tile, dB added in place); M=133 several row tiles
    # (dB partials reduced in order).
    check_against_reference(*make(M, d_in, d_out, r, dtype, bias), scale=0.5, dtype=dtype)


@BF16_ON_GPU_ONLY
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 133])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
@pytest.mark.parametrize("r", [1, 16])
def test_bf16_matches_reference(M, d_in, d_out, r):
    check_against_reference(*make(M, d_in, d_out, r, torch.bfloat16), scale=0.5, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,d_in,d_out,r", [(133, 72, 200, 8), (7, 200, 72, 16), (40, 72, 200, 1)])
def test_split_shrink_forward_matches_reference(dtype, M, d_in, d_out, r):
    """The forward with the shrink as its own kernel (the plan for wide d_out, large r)."""
    check_against_reference(*make(M, d_in, d_out, r, dtype), scale=0.5, dtype=dtype, shrink="split")


@pytest.mark.parametrize("tuned_name", ["_fwd_prefill", "_fwd_decode", "_shrink", "_bwd", "_grad_b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_every_tuned_config_matches_reference(monkeypatch, tuned_name, dtype):
    """The autotuner keeps the fastest config per key, so the tests above check one config of
    each kernel. A wrong config that is never fastest on the test shapes would pass them and be
    picked on another GPU or shape: on an H200 one backward config gave NaN (bench/RESULTS.md).
    Here each kernel runs with one config at a time (one each under the interpreter; the GPU
    sets on a GPU), at decode and prefill sizes; a config the GPU cannot fit is skipped, as the
    autotuner skips it."""
    from triton.runtime.errors import OutOfResources

    tuned = getattr(kernels, tuned_name)
    long = [1100] if CUDA else []  # 128-row tiles (block_m): the GPU's long prefills only
    rows = {"_fwd_decode": [7], "_fwd_prefill": [133] + long}.get(tuned_name, [7, 133] + long)
    shrink = "split" if tuned_name == "_shrink" else "fused"
    try:
        for config in list(tuned.configs):
            monkeypatch.setattr(tuned, "configs", [config])
            tuned.cache.clear()
            for M in rows:
                try:
                    check_against_reference(*make(M, 72, 200, 16, dtype), scale=0.5, dtype=dtype, shrink=shrink)
                except OutOfResources:
                    continue
                except Exception as exc:  # a wrong value, or a fault (on an H200 once: an illegal address)
                    raise AssertionError(f"{tuned_name} with {config} at M={M}, {dtype}: {exc}") from None
    finally:
        tuned.cache.clear()


def test_backward_is_bitwise_repeatable():
    x, W, b, A, B, dy, grad_B0 = make(133, 72, 200, 16, torch.float32)
    s = reference.lowrank_linear_fwd(x, W, b, A, B, 0.5)[1]
    runs = []
    for _ in range(2):
        grad_B = grad_B0.clone()
        dx = triton_backend.lowrank_linear_bwd(dy, s, W, A, B, grad_B, 0.5, True)
        runs.append((dx, grad_B))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("M", [7, 133])
def test_backward_without_dx_only_accumulates(M):
    x, W, b, A, B, dy, grad_B0 = make(M, 72, 200, 8, torch.float32)
    s = reference.lowrank_linear_fwd(x, W, b, A, B, 0.5)[1]
    grad_B, grad_B_ref = grad_B0.clone(), grad_B0.clone()
    assert triton_backend.lowrank_linear_bwd(dy, s, W, A, B, grad_B, 0.5, False) is None
    reference.lowrank_linear_bwd(dy, s, W, A, B, grad_B_ref, 0.5, False)
    assert_close(grad_B, grad_B_ref, what="dB")


def run_op(backend, x, W, b, A, B, dy):
    """The custom op with autograd: returns y, dX and the accumulator."""
    x = x.detach().clone().requires_grad_()
    grad_B = torch.zeros(B.shape, device=B.device)
    y = lowrank_linear(x, W, b, A, B.clone().requires_grad_(), grad_B, 2.0, backend=backend)
    y.backward(dy)
    return y.detach(), x.grad, grad_B


def test_leading_dims_strided_input_and_transposed_weight():
    """x (6, 3, 40) from a transpose (rows not evenly strided, so the adapter must copy), W a
    transposed view as GPT-2's Conv1D gives, through the custom op and autograd."""
    x, W, b, A, B, dy, _ = make(6, 40, 24, 4, torch.float32, lead=(3,))
    x = x.transpose(0, 1)
    W_t = W.t().contiguous().t()  # same values, strides (1, d_out)
    assert not x.is_contiguous() and not W_t.is_contiguous()
    got = run_op("triton", x, W_t, b, A, B, dy.transpose(0, 1))
    want = run_op("torch", x, W, b, A, B, dy.transpose(0, 1))
    assert got[0].shape == (6, 3, 24)
    for g, w, name in zip(got, want, ("y", "dX", "dB")):
        assert_close(g, w, what=name)


def test_strided_rows_are_not_copied():
    """Every other row of a larger tensor: reshape keeps the view, the kernel uses the stride."""
    x, W, b, A, B, dy, grad_B0 = make(14, 72, 200, 8, torch.float32)
    x_rows, dy_rows = x[::2], dy[::2]
    assert x_rows.stride(0) == 2 * 72
    check_against_reference(x_rows, W, b, A, B, dy_rows, grad_B0, scale=0.5, dtype=torch.float32)


def test_empty_batch():
    x, W, b, A, B, dy, grad_B0 = make(3, 16, 12, 2, torch.float32)
    y, s = triton_backend.lowrank_linear_fwd(x[:0], W, b, A, B, 1.0)
    assert y.shape == (0, 12) and s.shape == (0, 2)
    grad_B = grad_B0.clone()
    dx = triton_backend.lowrank_linear_bwd(dy[:0], s, W, A, B, grad_B, 1.0, True)
    assert dx.shape == (0, 16) and torch.equal(grad_B, grad_B0)


def test_clear_errors():
    x, W, b, A, B, dy, grad_B0 = make(3, 16, 12, 2, torch.float32)
    with pytest.raises(TypeError, match="float64"):
        triton_backend.lowrank_linear_fwd(x.double(), W.double(), b.double(), A.double(), B, 1.0)
    with pytest.raises(TypeError, match="weight is torch.float16"):
        triton_backend.lowrank_linear_fwd(x, W.half(), b, A, B, 1.0)
    with pytest.raises(TypeError, match="B .* must be float32"):
        triton_backend.lowrank_linear_fwd(x, W, b, A, B.half(), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        triton_backend.lowrank_linear_fwd(x[:, :10], W, b, A, B, 1.0)
    s = x @ A.t()
    with pytest.raises(TypeError, match="grad_B must be a float32"):
        triton_backend.lowrank_linear_bwd(dy, s, W, A, B, grad_B0.half(), 1.0, True)


def test_tiny_llama_matches_torch_backend():
    """A whole patched Llama, backend triton vs torch: logits and every layer's accumulator."""
    ids = random_ids(batch=2, seq=9).to(DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        model = tiny_model("llama").to(DEVICE)
        # fp32 input gradients in both: this compares the kernels, not the bf16 rounding of dX
        learner = fastcl.patch(model, rank=8, backend=backend, backward_dtype=None)
        g = torch.Generator().manual_seed(3)
        for module in learner.modules.values():  # non-zero fast weights, so the adapter path counts
            module.B.data.copy_(torch.randn(module.B.shape, generator=g) * 0.05)
            module.b_is_zero = False
        out = learner.observe(ids)
        results[backend] = (out.logits, {n: m.grad_B.clone() for n, m in learner.modules.items()})
    (logits, acc), (logits_ref, acc_ref) = results["triton"], results["torch"]
    assert len(acc) >= 14  # q, k, v, o, gate, up, down in each of 2 layers
    # Two layers of fp32 GEMMs summed in different orders: a little above the op tolerance.
    assert_close(logits, logits_ref, what="logits", rtol=1e-4, atol=1e-4)
    for name in acc_ref:
        scale = acc_ref[name].abs().max().item()
        assert scale > 0, f"{name}: no gradient reached the accumulator"
        assert_close(acc[name], acc_ref[name], what=f"{name} dB", rtol=1e-4, atol=1e-4 * scale)


def test_torch_compile_traces_the_triton_backend():
    x, W, b, A, B, dy, _ = make(9, 24, 20, 4, torch.float32)

    def step(x, grad_B, B_leaf):
        return lowrank_linear(x, W, b, A, B_leaf, grad_B, 0.5, "triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
    results = []
    for fn in (step, compiled):
        xi = x.clone().requires_grad_()
        grad_B = torch.zeros(20, 4, device=DEVICE)
        y = fn(xi, grad_B, B.clone().requires_grad_())
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, grad_B))
    for (eager, name), traced in zip(zip(results[0], ("y", "dX", "dB")), results[1]):
        assert_close(traced, eager, what=f"compiled {name}")


def test_auto_backend_choice_and_log(caplog, monkeypatch):
    """auto: torch on the CPU (even with the interpreter on: it is for tests, not speed), and on
    CUDA too (measured faster there, bench/RESULTS.md), and the log says why. The CUDA choice is
    checked here with a stand-in status()."""
    backends._resolve_auto.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="fastcl"):
            assert backends.resolve("auto", "cpu") == "torch"
            assert "auto -> torch" in caplog.text and "need CUDA" in caplog.text
            if CUDA:
                assert backends.resolve("auto", "cuda") == "torch"
                assert "auto -> torch (first available on cuda" in caplog.text
            backends._resolve_auto.cache_clear()
            caplog.clear()
            monkeypatch.setattr(backends, "status", lambda name, device=None: (True, "available"))
            assert backends._resolve_auto("cuda") == "torch"
            assert "auto -> torch (first available on cuda in the order torch, triton, cuda)" in caplog.text
            backends._resolve_auto.cache_clear()
            caplog.clear()
            monkeypatch.setattr(backends, "_AUTO_ORDER_CUDA", ("triton", "cuda", "torch"))
            monkeypatch.setattr(backends, "status", lambda name, device=None: (name == "torch", "no kernels here"))
            assert backends._resolve_auto("cuda") == "torch"
            assert "passed over: triton: no kernels here; cuda: no kernels here" in caplog.text
    finally:
        backends._resolve_auto.cache_clear()


def test_shrink_plan_follows_the_cost_note():
    """The documented choices of the fused/split rule (a cost model until measured on a GPU)."""
    half = torch.float16
    plan = kernels.shrink_plan
    assert not plan(1, 14336, 4096, 64, half).split and not plan(16, 14336, 4096, 64, half).split  # decode
    assert plan(2048, 14336, 4096, 16, half).split  # wide d_out
    assert not plan(2048, 4096, 4096, 16, half).split and plan(2048, 4096, 4096, 32, half).split
    assert not plan(2048, 1536, 576, 64, half).split  # SmolLM2 widths
    assert plan(2048, 1536, 576, 64, half, override="split").split
    with pytest.raises(ValueError, match="shrink must be"):
        plan(2048, 1536, 576, 64, half, override="fast")


def test_interpreter_runs_one_config_per_kernel():
    """Autotuning on the interpreter would run every config through numpy: one config each."""
    if not kernels.INTERPRETED:
        pytest.skip("compiled kernels: the GPU config sets apply")
    for tuned in (kernels._fwd_prefill, kernels._fwd_decode, kernels._shrink, kernels._bwd, kernels._grad_b):
        assert len(tuned.configs) == 1


def test_environment_flags_select_the_paths(monkeypatch):
    """FASTCL_TRITON_SHRINK reaches the forward's plan."""
    plans = []
    real_plan = kernels.shrink_plan
    monkeypatch.setattr(kernels, "shrink_plan", lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1])
    monkeypatch.setenv("FASTCL_TRITON_SHRINK", "split")
    check_against_reference(*make(20, 72, 200, 8, torch.float32), scale=0.5, dtype=torch.float32)
    assert plans and plans[-1].split and plans[-1].why == "forced split"


@pytest.mark.skipif(CUDA, reason="with a GPU the tests above compile and run the kernels")
def test_kernels_compile_for_sm90():
    """The interpreter never runs triton's compiler: build every kernel for an H100 here (triton
    ships ptxas), in a subprocess that imports the kernels compiled, not interpreted."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas, so it cannot compile for sm_90 here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning
    script = Path(__file__).with_name("triton_sm90_compile.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
