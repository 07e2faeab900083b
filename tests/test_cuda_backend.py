"""Backend "cuda" (fastcl._C) on a GPU, against the reference: odd shapes, the dtype tolerance
table, both weight layouts, the decode and tiled paths, accumulation, streams, CUDA graphs,
torch.compile, and whole tiny models patched with backend="cuda" vs "torch".

Marked `gpu`: skipped, with the reason, where there is no CUDA device. Where there is one but
fastcl._C did not build, the tests fail with the reason: a GPU run must not pass by skipping.
Build it first: FASTCL_BUILD_CUDA=1 pip install --no-build-isolation -e .

Memory check on a GPU (each tensor its own allocation, so an overrun cannot hide inside the
caching allocator's blocks); racecheck looks for shared-memory races in the tiled kernel:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        .venv/bin/python -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider -k "not graph"
    compute-sanitizer --tool racecheck --error-exitcode 1 \\
        .venv/bin/python -m pytest tests/test_cuda_backend.py -q -x -p no:cacheprovider -k "matches_reference and 133"

(CUDA graph capture and the caching allocator being off do not mix, hence -k "not graph".)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl.ops import lowrank_linear, reference
from helpers import TOLERANCES, assert_close, random_ids, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device: the cuda backend runs fastcl._C's kernels (the CPU checks of "
                              "the extension are tests/test_cuda_build.py and tests/test_cuda_emulation.py)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# dB is accumulated in fp32 from low-precision dY and s: compared relative to its scale (test_op.py).
TOL_DB = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def _extension_built():
    from fastcl.ops import cuda_backend

    if cuda_backend.UNAVAILABLE_REASON:
        pytest.fail(f"a CUDA device is present but backend 'cuda' is unavailable: {cuda_backend.UNAVAILABLE_REASON}. "
                    "Build it: FASTCL_BUILD_CUDA=1 pip install --no-build-isolation -e .")


def make(M, d_in, d_out, r, dtype, bias=True, lead=(), transposed=False, seed=0):
    """Inputs on the GPU; W is a transposed (Conv1D-style) view when `transposed`."""
    g = torch.Generator().manual_seed(seed + M * 1000 + d_in + d_out + r)
    x = torch.randn(*lead, M, d_in, generator=g)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g) if bias else None
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) * 0.1  # test_op.py's scale: bf16 rounding of the reference fits the table
    dev = dict(device="cuda", dtype=dtype)
    W = W.t().contiguous().to(**dev).t() if transposed else W.to(**dev)
    return x.to(**dev), W, None if b is None else b.to(**dev), A.to(**dev), B.cuda()


def lora_fa(x, W, b, A, B, scale):
    return F.linear(x, W, b) + scale * F.linear(F.linear(x, A), B.to(x.dtype))


def run(backend, x, W, b, A, B, scale, dy=None, grad_B=None, needs_dx=True):
    x = x.detach().clone().requires_grad_(needs_dx)
    B_leaf = B.clone().requires_grad_()
    grad_B = torch.zeros(B.shape, device="cuda") if grad_B is None else grad_B.clone()
    y = lowrank_linear(x, W, b, A, B_leaf, grad_B, scale, backend=backend)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y.backward(dy)
    assert B_leaf.grad is None, "the fast-weight gradient must go to the accumulator, not B.grad"
    return y.detach(), x.grad, grad_B, dy


def oracle(x, W, b, A, B, scale, dy):
    """float64 on the same (already rounded) inputs; autograd gives dX and dB."""
    up = lambda t: None if t is None else t.detach().double()  # noqa: E731
    x64 = up(x).requires_grad_()
    B64 = B.double().requires_grad_()
    y = lora_fa(x64, up(W), up(b), up(A), B64, scale)
    y.backward(dy.double())
    return y.detach(), x64.grad, B64.grad


def check(y, dx, dB, ref, dtype, what=""):
    y_ref, dx_ref, dB_ref = ref
    assert_close(y, y_ref, dtype, f"y{what}")
    if dx is not None:
        assert_close(dx, dx_ref, dtype, f"dX{what}")
    assert_close(dB, dB_ref, dtype, f"dB{what}", atol=TOL_DB[dtype] * dB_ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 8, 9, 133])  # 8 | 9: the decode path's boundary
@pytest.mark.parametrize("d_in,d_out", [(72, 200), (200, 72)])
@pytest.mark.parametrize("r", [1, 8, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(dtype, M, d_in, d_out, r, bias):
    x, W, b, A, B = make(M, d_in, d_out, r, dtype, bias)
    y, dx, dB, dy = run("cuda", x, W, b, A, B, 0.5)
    assert y.dtype == dtype and dx.dtype == dtype and dB.dtype == torch.float32
    check(y, dx, dB, oracle(x, W, b, A, B, 0.5, dy), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 133])
def test_transposed_conv1d_weight(dtype, M):
    x, W, b, A, B = make(M, 96, 80, 8, dtype, transposed=True)
    assert W.stride(0) == 1, "the weight should be a transposed view"
    y, dx, dB, dy = run("cuda", x, W, b, A, B, 0.75)
    check(y, dx, dB, oracle(x, W, b, A, B, 0.75, dy), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sketch_output_matches_the_reference(dtype):
    from fastcl.ops import cuda_backend

    for M in (3, 133):
        x, W, b, A, B = make(M, 72, 40, 16, dtype)
        _, s = cuda_backend.lowrank_linear_fwd(x, W, b, A, B, 0.5)
        _, s_ref = reference.lowrank_linear_fwd(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5)
        assert_close(s, s_ref, dtype, f"s (M={M})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_shapes_with_leading_dims(dtype):
    """Many reduction chunks and column blocks, and a d_out long enough to split grad-only work."""
    x, W, b, A, B = make(300, 1024, 2112, 64, dtype, lead=(2,))
    y, dx, dB, dy = run("cuda", x, W, b, A, B, 0.25)
    assert y.shape == (2, 300, 2112) and dx.shape == (2, 300, 1024)
    check(y, dx, dB, oracle(x, W, b, A, B, 0.25, dy), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_only_backward_accumulates_into_existing_values(dtype):
    x, W, b, A, B = make(133, 200, 1100, 8, dtype)
    start = torch.randn(B.shape, device="cuda")
    y, dx, dB, dy = run("cuda", x, W, b, A, B, 0.5, grad_B=start, needs_dx=False)
    assert dx is None
    _, _, dB_ref = oracle(x, W, b, A, B, 0.5, dy)
    assert_close(dB - start, dB_ref, dtype, "dB increment", atol=TOL_DB[dtype] * dB_ref.abs().max().item())


def test_matches_the_torch_backend_call_for_call():
    from fastcl.ops import cuda_backend

    x, W, b, A, B = make(37, 64, 48, 4, torch.float32, lead=(3,))
    y, s = cuda_backend.lowrank_linear_fwd(x, W, b, A, B, 0.5)
    y_ref, s_ref = reference.lowrank_linear_fwd(x, W, b, A, B, 0.5)
    assert_close(y, y_ref, what="y")
    assert_close(s, s_ref, what="s")
    dy = torch.randn_like(y)
    g, g_ref = torch.ones(48, 4, device="cuda"), torch.ones(48, 4, device="cuda")
    dx = cuda_backend.lowrank_linear_bwd(dy, s, W, A, B, g, 0.5, True)
    dx_ref = reference.lowrank_linear_bwd(dy, s_ref, W, A, B, g_ref, 0.5, True)
    assert_close(dx, dx_ref, what="dX")
    assert_close(g, g_ref, what="grad_B")


def test_largest_rank_runs_and_a_larger_one_is_refused_by_name():
    x, W, b, A, B = make(20, 64, 32, 64, torch.bfloat16)
    y, dx, dB, dy = run("cuda", x, W, b, A, B, 0.5)
    check(y, dx, dB, oracle(x, W, b, A, B, 0.5, dy), torch.bfloat16)
    x, W, b, A, B = make(20, 80, 32, 65, torch.bfloat16)
    with pytest.raises(RuntimeError, match="rank 65 is outside 1..64"):
        run("cuda", x, W, b, A, B, 0.5)


def test_empty_batch():
    x, W, b, A, B = make(1, 16, 8, 2, torch.float32)
    y, dx, dB, _ = run("cuda", x[:0], W, b, A, B, 0.5)
    assert y.shape == (0, 8) and dx.shape == (0, 16) and not dB.any()


def test_runs_on_the_current_stream():
    x, W, b, A, B = make(133, 200, 72, 8, torch.bfloat16)
    expected = run("cuda", x, W, b, A, B, 0.5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run("cuda", x, W, b, A, B, 0.5, dy=expected[3])
    torch.cuda.current_stream().wait_stream(side)
    for a, e, name in zip(got[:3], expected[:3], ("y", "dX", "dB")):
        assert_close(a, e, torch.bfloat16, f"{name} on a side stream")


def test_cuda_graph_capture_and_replay():
    x, W, b, A, B = make(64, 72, 40, 8, torch.float16)
    grad_B = torch.zeros(40, 8, device="cuda")
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph, as torch's docs ask
        lowrank_linear(static_x, W, b, A, B, grad_B, 0.5, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lowrank_linear(static_x, W, b, A, B, grad_B, 0.5, backend="cuda")
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(static_y, reference.lowrank_linear_fwd(new_x, W, b, A, B, 0.5)[0], torch.float16, "replayed y")


def test_torch_compile_matches_eager():
    x, W, b, A, B = make(9, 24, 20, 4, torch.float32)

    def step(x, grad_B, B_leaf):
        return lowrank_linear(x, W, b, A, B_leaf, grad_B, 0.5, "cuda")

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        xi = x.clone().requires_grad_()
        grad_B = torch.zeros(20, 4, device="cuda")
        y = fn(xi, grad_B, B.clone().requires_grad_())
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, grad_B))
    for name, a, e in zip(("y", "dX", "dB"), results[1], results[0]):
        assert_close(a, e, what=f"compiled {name}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_second_device():
    from fastcl.ops import cuda_backend

    with torch.cuda.device(0):
        x, W, b, A, B = (t.to("cuda:1") for t in make(33, 64, 48, 4, torch.float32))
        y, _ = cuda_backend.lowrank_linear_fwd(x, W, b, A, B, 0.5)
        assert torch.cuda.current_device() == 0, "the launcher must restore the caller's device"
    assert y.device == torch.device("cuda:1")
    assert_close(y, reference.lowrank_linear_fwd(x, W, b, A, B, 0.5)[0], what="y on cuda:1")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D, the transposed weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_tiny_model_cuda_matches_torch_backend(arch, dtype):
    learners = {}
    for backend in ("torch", "cuda"):
        model = tiny_model(arch).to("cuda", dtype)
        learners[backend] = fastcl.patch(model, rank=4, backend=backend, seed=0, lr=1e-2)
    ids = random_ids(batch=2, seq=11).cuda()
    outputs = {}
    for backend, learner in learners.items():
        first = learner.observe(ids)  # B = 0: the learning forward still runs the op
        grads = {name: m.grad_B.clone() for name, m in learner.modules.items()}
        assert learner.step()
        second = learner.observe(ids)  # B != 0 now: the adapter path changes the logits
        with torch.no_grad():
            served = learner.model(input_ids=ids).logits
        outputs[backend] = (first.logits, grads, second.logits, served)
    tol = TOLERANCES[dtype]
    for i, name in enumerate(("logits before a step", None, "logits after a step", "served logits")):
        if name is None:
            for layer, g in outputs["cuda"][1].items():
                ref = outputs["torch"][1][layer]
                assert_close(g, ref, dtype, f"grad_B of {layer}", atol=TOL_DB[dtype] * ref.abs().max().item() + 1e-7)
            continue
        assert_close(outputs["cuda"][i], outputs["torch"][i], dtype, f"{arch} {name}", rtol=tol[0], atol=tol[1])
