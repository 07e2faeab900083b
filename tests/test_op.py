"""The op against a plain-PyTorch LoRA-FA (nn.Linear + frozen A + trainable B, autograd doing the
rest): y, dX, dB, across dtypes, odd shapes, bias or none, leading dims, non-contiguous input."""

import pytest
import torch
import torch.nn.functional as F

from fastcl.ops import lowrank_linear, reference
from helpers import assert_close, op_operands


def lora_fa(x, W, b, A, B, scale):
    """The textbook formula; autograd gives dX and dB."""
    return F.linear(x, W, b) + scale * F.linear(F.linear(x, A), B.to(x.dtype))


def make(M, d_in, d_out, r, dtype, bias=True, lead=()):
    return op_operands(M, d_in, d_out, r, dtype, bias, lead)[:5]


def run_op(x, W, b, A, B, scale):
    x = x.detach().clone().requires_grad_()
    B_leaf = B.clone().requires_grad_()
    grad_B = torch.zeros(B.shape, dtype=torch.float32)
    y = lowrank_linear(x, W, b, A, B_leaf, grad_B, scale, backend="torch")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    y.backward(dy)
    assert B_leaf.grad is None, "the fast-weight gradient must go to the accumulator, not B.grad"
    return y.detach(), x.grad, grad_B, dy


def run_reference(x, W, b, A, B, scale, dy):
    x = x.detach().clone().requires_grad_()
    B_leaf = B.clone().requires_grad_()
    y = lora_fa(x, W, b, A, B_leaf, scale)
    y.backward(dy)
    return y.detach(), x.grad, B_leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 7, 133])
@pytest.mark.parametrize("d_in,d_out", [(72, 200), (200, 72)])
@pytest.mark.parametrize("r", [1, 8, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_lora_fa(dtype, M, d_in, d_out, r, bias):
    x, W, b, A, B = make(M, d_in, d_out, r, dtype, bias)
    y, dx, dB, dy = run_op(x, W, b, A, B, scale=0.5)
    # The oracle runs in fp32 on the same (already rounded) inputs.
    up = lambda t: None if t is None else t.float()  # noqa: E731
    y_ref, dx_ref, dB_ref = run_reference(up(x), up(W), up(b), up(A), B, 0.5, dy.float())
    assert y.dtype == dtype and dx.dtype == dtype and dB.dtype == torch.float32
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dX")
    # dB is accumulated in fp32 from low-precision dY and s: compare relative to its scale.
    assert_close(dB, dB_ref, dtype, "dB", atol=TOL_DB[dtype] * dB_ref.abs().max().item())


TOL_DB = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def test_leading_dims_and_noncontiguous_input():
    x, W, b, A, B = make(6, 40, 24, 4, torch.float32, lead=(3,))
    x = x.transpose(0, 1)  # (6, 3, 40), not contiguous
    assert not x.is_contiguous()
    y, dx, dB, dy = run_op(x, W, b, A, B, scale=2.0)
    y_ref, dx_ref, dB_ref = run_reference(x, W, b, A, B, 2.0, dy)
    assert y.shape == (6, 3, 24)
    assert_close(y, y_ref, what="y")
    assert_close(dx, dx_ref, what="dX")
    assert_close(dB, dB_ref, what="dB")


def test_accumulates_across_backward_calls():
    x, W, b, A, B = make(5, 16, 12, 3, torch.float32)
    grad_B = torch.zeros(12, 3)
    B_leaf = B.clone().requires_grad_()
    total = torch.zeros(12, 3)
    for seed in range(3):
        xi = x + seed
        lowrank_linear(xi, W, b, A, B_leaf, grad_B, 1.0, "torch").sum().backward()
        B_ref = B.clone().requires_grad_()
        lora_fa(xi, W, b, A, B_ref, 1.0).sum().backward()
        total += B_ref.grad
    assert_close(grad_B, total, what="accumulated dB")


def test_sketch_mask_chooses_the_rows_dB_learns_from_and_changes_nothing_else():
    """dB = c dY^T (s * m) against the reference's dB over only the masked rows; y and dX as
    without a mask (dX never reads the sketch)."""
    x, W, b, A, B = make(7, 24, 10, 3, torch.float32, lead=(2,))
    mask = torch.zeros(2, 7)
    mask[0, 2:5] = 1.0
    mask[1, 6] = 1.0
    dy = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(3))
    results = []
    for sketch_mask in (None, mask):
        xi, B_leaf, grad_B = x.clone().requires_grad_(), B.clone().requires_grad_(), torch.zeros(10, 3)
        y = lowrank_linear(xi, W, b, A, B_leaf, grad_B, 0.5, "torch", sketch_mask=sketch_mask)
        y.backward(dy)
        results.append((y.detach(), xi.grad, grad_B))
    (y_all, dx_all, dB_all), (y_masked, dx_masked, dB_masked) = results
    assert torch.equal(y_all, y_masked) and torch.equal(dx_all, dx_masked)
    rows = mask.bool()
    _, _, dB_rows = run_reference(x[rows], W, b, A, B, 0.5, dy[rows])
    assert_close(dB_masked, dB_rows, what="dB over the masked rows")
    assert not torch.allclose(dB_masked, dB_all)


def test_gradcheck_float64():
    x, W, b, A, B = make(7, 9, 11, 3, torch.float64)
    x.requires_grad_()
    B_leaf = B.double().requires_grad_()
    grad_B = torch.zeros(11, 3)

    def f(x):
        return lowrank_linear(x, W, b, A, B_leaf, grad_B, 0.75, "torch")

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8)


def test_dB_matches_finite_differences_float64():
    """B's gradient is never returned to autograd, so check the accumulator by central
    differences of sum(y * dy) in float64."""
    x, W, b, A, B = make(7, 9, 11, 3, torch.float64)
    B = B.double()
    dy = torch.randn(7, 11, dtype=torch.float64)
    grad_B = torch.zeros(11, 3)
    lowrank_linear(x, W, b, A, B.clone().requires_grad_(), grad_B, 0.75, "torch").backward(dy)
    eps = 1e-6
    numeric = torch.zeros_like(B)
    for i in range(B.shape[0]):
        for j in range(B.shape[1]):
            Bp, Bm = B.clone(), B.clone()
            Bp[i, j] += eps
            Bm[i, j] -= eps
            fp = (reference.lowrank_linear_fwd(x, W, b, A, Bp, 0.75)[0] * dy).sum()
            fm = (reference.lowrank_linear_fwd(x, W, b, A, Bm, 0.75)[0] * dy).sum()
            numeric[i, j] = (fp - fm) / (2 * eps)
    assert_close(grad_B.double(), numeric, torch.float32, "dB vs finite differences")


def test_saves_only_the_sketch_per_token():
    """Per token, the op saves r numbers (s = x A^T), never x's d_in."""
    d_in, d_out, r = 96, 64, 4

    def saved_bytes(M):
        x, W, b, A, B = make(M, d_in, d_out, r, torch.float32)
        x.requires_grad_()
        B_leaf = B.clone().requires_grad_()
        # Weights are saved by reference (no per-token cost); everything else counts.
        weights = {t.data_ptr() for t in (W, A, B_leaf)}
        saved = []

        def pack(t):
            if t.data_ptr() not in weights:
                saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lowrank_linear(x, W, b, A, B_leaf, torch.zeros(d_out, r), 1.0, "torch")
        return sum(saved)

    assert saved_bytes(100) == 100 * r * 4
    assert saved_bytes(200) - saved_bytes(100) == 100 * r * 4


def test_custom_op_registration_passes_opcheck():
    x, W, b, A, B = make(5, 16, 12, 3, torch.float32)
    grad_B = torch.zeros(12, 3)
    torch.library.opcheck(torch.ops.fastcl.lowrank_linear.default, (x, W, b, A, B, grad_B, 0.5, "torch"))
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    torch.library.opcheck(torch.ops.fastcl.lowrank_linear.default, (x, W, b, A, B, grad_B, 0.5, "torch", None, mask))
    s = x @ A.t()
    dy = torch.randn(5, 12)
    torch.library.opcheck(torch.ops.fastcl.lowrank_linear_bwd.default, (dy, s, W, A, B, grad_B, 0.5, True, "torch"))


@pytest.mark.parametrize("masked", [False, True], ids=["every row", "sketch_mask"])
def test_torch_compile_forward_and_backward_match_eager(masked):
    """Also with a sketch mask (learn_at="entity"): the registered op masks the sketch it saves."""
    x, W, b, A, B = make(9, 24, 20, 4, torch.float32)
    mask = (torch.arange(9) % 3 == 1).float() if masked else None

    def step(x, grad_B, B_leaf):
        return lowrank_linear(x, W, b, A, B_leaf, grad_B, 0.5, "torch", sketch_mask=mask)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        xi = x.clone().requires_grad_()
        grad_B = torch.zeros(20, 4)
        y = fn(xi, grad_B, B.clone().requires_grad_())
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, grad_B))
    for (a, name), b_ in zip(zip(results[0], ("y", "dX", "dB")), results[1]):
        assert_close(b_, a, what=f"compiled {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_eager_path_matches_the_registered_op_bit_for_bit(dtype, bias):
    """Eager calls bypass the custom op's dispatch (ops/lowrank_linear.py says why); the
    registered op must still compute exactly the same y, dX and accumulated dB."""
    x, W, b, A, B = make(133, 72, 200, 8, dtype, bias, lead=(2,))
    dy = torch.randn(2, 133, 200, generator=torch.Generator().manual_seed(3)).to(dtype)
    results = []
    for call in ("eager", "op"):
        xi, B_leaf, grad_B = x.clone().requires_grad_(), B.clone().requires_grad_(), torch.zeros(B.shape)
        if call == "eager":
            y = lowrank_linear(xi, W, b, A, B_leaf, grad_B, 0.5, "torch")
        else:
            y, _ = torch.ops.fastcl.lowrank_linear(xi, W, b, A, B_leaf, grad_B, 0.5, "torch")
        y.backward(dy)
        with torch.no_grad():
            served = lowrank_linear(x, W, b, A, B, grad_B, 0.5, "torch")
        results.append((y.detach(), xi.grad, grad_B, served))
    for name, eager, op in zip(("y", "dX", "dB", "no-grad y"), *results):
        assert torch.equal(eager, op), f"{name}: the eager path differs from the registered op"


def _served_both_ways(monkeypatch, x, W, b, A, B, dtype):
    """(C++ closure's output, Python closure's output, whether C++ took the fused loop)."""
    from fastcl import _serving

    served = {}
    for name, implementation in (("C++", _serving.serving_forward), ("Python", None)):
        monkeypatch.setattr(reference, "compiled_serving_forward", implementation)
        run, Bt = reference.serving_forward(W, b, A, B, 0.5, dtype)
        served[name] = run(x)
    fused = _serving.uses_fused_adapter(W.t(), A.t(), Bt, reference.max_fused_rows, x)
    assert served["C++"].shape == x.shape[:-1] + (W.shape[0],)
    return served["C++"], served["Python"], fused


def _serving_extension():
    from fastcl.info import build_info

    if not build_info().get("serving_extension"):
        pytest.skip("this install did not try to build fastcl._serving (FASTCL_BUILD_SERVING=0 or no torch at build)")
    assert reference.compiled_serving_forward is not None, "fastcl._serving was built but does not import"
    from fastcl import _serving

    return _serving


def test_compiled_serving_closure_matches_the_python_one_bit_for_bit_off_the_fused_loop(monkeypatch):
    """fastcl._serving (csrc/serving) runs prefill, bf16 and GPU decode as the Python closure's
    three ATen calls: exactly what the Python closure gives, odd shapes, 1 to 3-D input, bias or
    none; so does fp32 decode with the loop turned off (max_fused_rows=0) or with an A the loop
    cannot read in place (strided)."""
    _serving = _serving_extension()
    cases = [(torch.bfloat16, 1, 72, 200, True, ()), (torch.bfloat16, 7, 65, 33, False, (1,)),
             (torch.bfloat16, 133, 48, 96, True, (2,)), (torch.float32, 7, 65, 33, False, (1,)),
             (torch.float32, 133, 48, 96, True, (2,)), (torch.float32, _serving.FUSED_MAX_ROWS + 1, 40, 24, True, ())]
    for dtype, M, d_in, d_out, bias, lead in cases:
        x, W, b, A, B = make(M, d_in, d_out, 8, dtype, bias, lead)
        compiled, python, fused = _served_both_ways(monkeypatch, x, W, b, A, B, dtype)
        assert not fused, f"{dtype} M={M}: expected the ATen path"
        assert torch.equal(compiled, python), f"{dtype} M={M}: the compiled closure differs"
    # max_fused_rows = 0 turns the loop off for decode too (bench/generation_bounds.py aten_closure).
    monkeypatch.setattr(reference, "max_fused_rows", 0)
    x, W, b, A, B = make(1, 72, 200, 8, torch.float32)
    compiled, python, fused = _served_both_ways(monkeypatch, x, W, b, A, B, torch.float32)
    assert not fused and torch.equal(compiled, python), "max_fused_rows=0 must give the ATen path, bit for bit"
    monkeypatch.setattr(reference, "max_fused_rows", _serving.FUSED_MAX_ROWS)
    strided_A = torch.stack([A, A], dim=-1)[..., 0]  # A's values, every other float of a wider tensor
    compiled, python, fused = _served_both_ways(monkeypatch, x, W, b, strided_A, B, torch.float32)
    assert not fused and torch.equal(compiled, python), "a strided A must take the ATen path, bit for bit"
    monkeypatch.setattr(reference, "compiled_serving_forward", _serving.serving_forward)
    run, _ = reference.serving_forward(W, b, A, B, 0.5, torch.float32)
    with pytest.raises(RuntimeError, match="input has 3 features, the layer takes 72"):
        run(torch.zeros(2, 3))


@pytest.mark.parametrize("M, d_in, d_out, r, bias, lead", [
    (1, 72, 200, 8, True, ()),      # d_in not a multiple of the loop's 16 lanes
    (1, 7, 5, 1, False, (1,)),      # fewer features than lanes, rank 1
    (3, 133, 33, 33, True, (1,)),   # a few rows, odd rank
    (4, 576, 192, 16, False, ()),   # SmolLM2's k_proj at rank 16
])
def test_fused_decode_loop_matches_the_reference(monkeypatch, M, d_in, d_out, r, bias, lead):
    """A few fp32 rows on the CPU (decode) take the fused adapter loop: equal to the Python
    closure within fp32 rounding, on odd shapes, with a non-contiguous input falling back."""
    _serving_extension()
    x, W, b, A, B = make(M, d_in, d_out, r, torch.float32, bias, lead)
    B = B * 3  # a live adapter large enough that its rounding shows in y
    compiled, python, fused = _served_both_ways(monkeypatch, x, W, b, A, B, torch.float32)
    assert fused, "a few fp32 rows on the CPU should take the fused loop"
    assert_close(compiled, python, torch.float32, "fused decode y")
    assert_close(compiled, lora_fa(x, W, b, A, B, 0.5), torch.float32, "fused decode y against LoRA-FA")
    # A strided input (every row a slice of a wider one): one row is still read in place by the
    # loop; several rows that are not packed go through ATen, bit for bit.
    strided = torch.cat([x, x], dim=-1)[..., :d_in]
    compiled, python, fused = _served_both_ways(monkeypatch, strided, W, b, A, B, torch.float32)
    assert fused == (M == 1)
    if fused:
        assert_close(compiled, python, torch.float32, "fused decode y, strided row")
    else:
        assert torch.equal(compiled, python), f"M={M}: strided rows must take the ATen path, bit for bit"


def test_a_patched_model_decodes_through_the_fused_loop():
    """Every patched layer of a model hands the serving closure an A and B^T the loop can read, so
    fp32 decode on the CPU takes it (else decode would silently fall back to the slower path)."""
    _serving = _serving_extension()
    import fastcl
    from helpers import tiny_model

    model = tiny_model("llama")
    learner = fastcl.patch(model, backend="torch")
    modules = list(learner.modules.values())
    assert len(modules) == 14, "the tiny Llama has 7 linears in each of its 2 blocks"
    for module in modules:
        _, Bt = reference.serving_forward(module.weight_matrix(), module.bias, module.A, module.B, module.scale,
                                          torch.float32)
        x = torch.randn(1, 1, module.in_features)
        assert _serving.uses_fused_adapter(module.weight_matrix().t(), module.A.t(), Bt, reference.max_fused_rows, x)
