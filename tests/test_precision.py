"""backward_dtype (fastcl.precision): dX's products in bf16, dB and everything served unchanged."""

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl import precision
from fastcl.ops import lowrank_linear, reference
from helpers import assert_close, op_operands, random_ids, tiny_model


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_only_for_fp32_on_a_cpu_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    resolve = precision.input_gradient_dtype
    assert resolve("auto", torch.float32, "cpu") == (torch.bfloat16 if native else None)
    for dtype, device in ((torch.float16, "cpu"), (torch.bfloat16, "cpu"), (torch.float32, "cuda")):
        assert resolve("auto", dtype, device) is None, (dtype, device)
    assert resolve("bfloat16", torch.float32, "cuda") == torch.bfloat16, "an explicit setting applies anywhere"
    assert resolve("bfloat16", torch.bfloat16, "cpu") is None, "bf16 activations are already bf16"
    assert resolve(None, torch.float32, "cpu") is None
    assert ("run in bfloat16" in precision.describe("auto", torch.float32, "cpu")) == native
    # Asked for on a CPU that would emulate it, the report says what that costs.
    assert ("no native bf16, so they are emulated" in precision.describe("bfloat16", torch.float32, "cpu")) != native
    assert "emulated" not in precision.describe("bfloat16", torch.float32, "cuda")


def test_unknown_backward_dtype_is_refused():
    with pytest.raises(ValueError, match="backward_dtype"):
        fastcl.patch(tiny_model("llama"), rank=4, backward_dtype="float16")


def run(x, W, b, A, B, dx_dtype, dy_seed=7):
    x = x.detach().clone().requires_grad_()
    grad_B = torch.zeros(B.shape)
    y = lowrank_linear(x, W, b, A, B.clone().requires_grad_(), grad_B, 0.5, "torch", dx_dtype)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed))
    y.backward(dy)
    return y.detach(), x.grad, grad_B


@pytest.mark.parametrize("M", [1, 7, 133])
@pytest.mark.parametrize("d_in,d_out", [(72, 200), (200, 72)])
@pytest.mark.parametrize("transposed", [False, True])
def test_op_input_gradient_in_bf16(M, d_in, d_out, transposed):
    x, W, b, A, B, _ = op_operands(M, d_in, d_out, 8, torch.float32)
    if transposed:  # GPT-2's Conv1D hands the op a transposed view of its (d_in, d_out) weight
        W = W.t().contiguous().t()
    y, dx, dB = run(x, W, b, A, B, None)
    y_low, dx_low, dB_low = run(x, W, b, A, B, torch.bfloat16)
    assert torch.equal(y_low, y), "the forward must not change"
    assert torch.equal(dB_low, dB), "dB is formed from the fp32 dY either way"
    assert dx_low.dtype == torch.float32
    assert_close(dx_low, dx, torch.bfloat16, "dX with bf16 products")
    assert not torch.equal(dx_low, dx), "the bf16 products were not used"


def test_registered_op_carries_the_dtype():
    x, W, b, A, B, g = op_operands(7, 72, 200, 8, torch.float32)
    dy = torch.randn(7, 200, generator=g)
    s = F.linear(x, A)
    grad_B = torch.zeros(B.shape)
    dx = torch.ops.fastcl.lowrank_linear_bwd(dy, s, W, A, B, grad_B, 0.5, True, "torch", torch.bfloat16)
    assert torch.equal(dx, reference.input_gradient(dy, W, A, B, 0.5, torch.bfloat16))
    torch.library.opcheck(torch.ops.fastcl.lowrank_linear_bwd.default,
                          (dy, s, W, A, B, torch.zeros(B.shape), 0.5, True, "torch", torch.bfloat16))


def test_output_embedding_gradient_in_row_blocks(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, W = torch.randn(2, 13, 48, generator=g), torch.randn(97, 48, generator=g)
    dy = torch.randn(2, 13, 97, generator=g)

    def input_gradient():
        leaf = x.clone().requires_grad_()
        y = precision.LowPrecisionInputGradient.apply(leaf, W, None, torch.bfloat16)
        assert torch.equal(y, F.linear(x, W)), "the forward must not change"
        y.backward(dy)
        return leaf.grad

    whole = input_gradient()
    monkeypatch.setattr(precision.LowPrecisionInputGradient, "ROWS", 5)  # 26 rows: blocks of 5 and a rest of 1
    assert torch.equal(input_gradient(), whole)
    exact = dy @ W
    error = float((whole - exact).norm() / exact.norm())
    assert 0 < error < 1e-2, f"dX of the output embedding off by {error:.3g} relative (bf16 inputs: ~4e-3)"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D layers, patched through a transposed view
def test_model_learns_the_same_gradients_within_bf16_and_serves_the_same(arch):
    ids = random_ids(batch=2, seq=13)
    results = {}
    for setting in (None, "bfloat16"):
        model = tiny_model(arch)
        learner = fastcl.patch(model, rank=4, backward_dtype=setting)
        head_patched = "forward" in model.get_output_embeddings().__dict__
        assert head_patched == (setting is not None)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # the same live fast weights in both: the adapter's products take part in dX
            for m in learner.modules.values():
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.05)
                m.b_is_zero = False
        logits = learner.observe(ids).logits
        results[setting] = logits, {name: m.grad_B.clone() for name, m in learner.modules.items()}
        fastcl.unpatch(model)
        assert "forward" not in model.get_output_embeddings().__dict__, "unpatch must restore the head"
    (logits, exact), (logits_low, low) = results[None], results["bfloat16"]
    assert torch.equal(logits_low, logits), "serving must not change"
    differs = 0
    for name, g in exact.items():
        error = float((low[name] - g).norm() / g.norm())
        assert error < 3e-2, f"{name}: grad_B off by {error:.3g} relative (bf16 rounding is ~4e-3 a product)"
        differs += not torch.equal(low[name], g)
    assert differs, "no accumulator changed: the bf16 input gradient was not used"
