"""The generic patcher on several architectures: what it patches, bit-identity, unpatch, refusals."""

import contextlib

import pytest
import torch
import torch.nn as nn

import fastcl
from fastcl.layers import FastLinear
from helpers import ARCHITECTURES, assert_close, assert_weights_unchanged, random_ids, tiny_model, weights_copy

EXPECTED_PER_BLOCK = {"llama": 7, "qwen2": 7, "mistral": 7, "gpt_neox": 4, "gpt2": 4}


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patch_is_bit_identical_at_zero_fast_weights(arch):
    model = tiny_model(arch)
    ids = random_ids()
    before = logits(model, ids)
    learner = fastcl.patch(model, rank=4)
    assert len(learner.report.patched) == 2 * EXPECTED_PER_BLOCK[arch]
    assert torch.equal(logits(model, ids), before), "inference path"
    # The learning path runs the op (to build s) and must give the same bits too.
    assert torch.equal(learner.observe(ids).logits, before), "observe path"
    assert model.fastcl is learner


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_observe_learns_and_unpatch_keeps_weights(arch):
    model = tiny_model(arch)
    ids = random_ids()
    learner = fastcl.patch(model, rank=4, lr=1e-2)
    for _ in range(3):
        learner.observe(ids)
        assert learner.step()
    live = logits(model, ids)
    fastcl.unpatch(model)  # merges the live fast weights
    assert not any(isinstance(m, FastLinear) for m in model.modules())
    assert not hasattr(model, "fastcl")
    torch.testing.assert_close(logits(model, ids), live, rtol=1e-5, atol=1e-5)


def test_report_names_every_linear_and_why():
    model = tiny_model("llama")
    learner = fastcl.patch(model, rank=4)
    patched = {name for name, *_ in learner.report.patched}
    skipped = dict(learner.report.skipped)
    assert "model.layers.0.self_attn.q_proj" in patched and "model.layers.1.mlp.down_proj" in patched
    assert "lm_head" in skipped and "output embedding" in skipped["lm_head"]
    assert "model.embed_tokens" in skipped
    linears = {n for n, m in tiny_model("llama").named_modules() if isinstance(m, nn.Linear)}
    assert linears == patched | (set(skipped) & linears), "a linear layer went unreported"
    assert "patched 14 layers" in str(learner.report)


def test_gpt2_conv1d_is_patched_through_a_transposed_view():
    model = tiny_model("gpt2")
    learner = fastcl.patch(model, rank=4)
    kinds = {kind for _, kind, *_ in learner.report.patched}
    assert kinds == {"Conv1D"}
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, FastLinear) and c_attn.out_features == 3 * 48 and c_attn.in_features == 48


def test_targets_and_exclude_accept_names_and_regexes():
    model = tiny_model("llama")
    learner = fastcl.patch(model, rank=4, targets=["q_proj", r"model\.layers\.1\.mlp\..*"], exclude=["up_proj"])
    patched = sorted(name for name, *_ in learner.report.patched)
    assert patched == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert dict(learner.report.skipped)["model.layers.1.mlp.up_proj"] == "excluded by pattern 'up_proj'"


def test_lm_head_can_be_targeted_explicitly():
    model = tiny_model("llama")
    learner = fastcl.patch(model, rank=4, targets=["lm_head"])
    assert [name for name, *_ in learner.report.patched] == ["lm_head"]
    assert learner.report.notes, "tied output embedding should be noted"


def test_refusals_leave_the_model_untouched():
    model = tiny_model("llama")
    with pytest.raises(fastcl.PatchError, match="matched no linear layer: \\['nope'\\]"):
        fastcl.patch(model, targets=["q_proj", "nope"])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        fastcl.patch(model, rank=0)
    with pytest.raises(fastcl.BackendUnavailable, match="cuda"):
        fastcl.patch(model, backend="cuda")
    assert not any(isinstance(m, FastLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()), "a refused patch must not freeze the model"


def test_double_patch_is_refused():
    model = tiny_model("llama")
    fastcl.patch(model, rank=4)
    with pytest.raises(fastcl.PatchError, match="already patched"):
        fastcl.patch(model, rank=4)


# peft's get_peft_model reads a transformers attribute deprecated in transformers 5 (not ours to fix).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_wrapped_model_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(fastcl.PatchError, match="merge_and_unload"):
        fastcl.patch(model)


def test_base_is_frozen_and_unpatch_restores_flags():
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(False)  # a user's own choice must survive
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    learner = fastcl.patch(model, rank=4)
    base_params = [p for n, p in model.named_parameters() if not n.endswith(".B")]
    assert not any(p.requires_grad for p in base_params)
    assert all(m.B.requires_grad for m in learner.modules.values())
    fastcl.unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_state_dict_keys_keep_their_names():
    model = tiny_model("llama")
    keys = set(model.state_dict())
    fastcl.patch(model, rank=4)
    patched_keys = set(model.state_dict())
    assert keys <= patched_keys
    assert all(k.endswith(".B") for k in patched_keys - keys)


def test_unpatch_without_merge_discards_fast_weights():
    model = tiny_model("llama")
    ids = random_ids()
    before = logits(model, ids)
    learner = fastcl.patch(model, rank=4, lr=1e-2)
    learner.observe(ids)
    learner.step()
    fastcl.unpatch(model, merge=False)
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(fastcl.FastclError, match="unpatched"):
        learner.observe(ids)


def test_model_to_dtype_keeps_fast_weights_fp32():
    model = tiny_model("llama")
    learner = fastcl.patch(model, rank=4)
    model.to(torch.bfloat16)
    module = next(iter(learner.modules.values()))
    assert module.weight.dtype == torch.bfloat16 and module.A.dtype == torch.bfloat16
    assert module.B.dtype == torch.float32 and module.grad_B.dtype == torch.float32
    assert module.base.weight is module.weight
    learner.observe(random_ids())
    assert learner.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_serving_forward_follows_every_change_of_the_fast_weights(dtype):
    """No-grad forwards reuse a prepared copy of B; it must be rebuilt whenever B changes
    (step, rollback, load, a direct in-place edit), never serve stale fast weights."""
    base = nn.Linear(40, 24, dtype=dtype)
    layer = FastLinear(base, layer_index=0, rank=4, scale=0.5, seed=0, backend="torch")
    layer.b_is_zero = False
    x = torch.randn(3, 40, dtype=dtype)

    def expected():
        delta = (x.float() @ layer.A.float().t()) @ layer.B.detach().t() * 0.5
        return (base(x).float() + delta).to(dtype)

    for change in (lambda B: B.normal_(), lambda B: B.mul_(-3.0), lambda B: B.copy_(torch.ones_like(B))):
        with torch.no_grad():
            change(layer.B)
            served = layer(x)
        assert_close(served, expected(), dtype, what="served output after B changed")
        with torch.enable_grad():
            assert_close(layer(x), served, dtype, what="grad-mode output")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_serving_forward_follows_replaced_weights_and_keeps_the_input_shape(kind):
    """The prepared forward binds W, b and A: a weight or A replaced (model.to, .data assignment)
    or edited in place must show in the next no-grad output, for 3-D and 1-row inputs alike."""
    from transformers.pytorch_utils import Conv1D

    base = nn.Linear(40, 24) if kind == "linear" else Conv1D(24, 40)
    layer = FastLinear(base, layer_index=0, rank=4, scale=0.5, seed=0, backend="torch")
    layer.b_is_zero = False
    with torch.no_grad():
        layer.B.normal_()

    def expected(x):
        W = layer.weight_matrix()
        return x @ W.t() + layer.bias + 0.5 * (x @ layer.A.t()) @ layer.B.detach().t()

    x = torch.randn(2, 5, 40)
    changes = (
        lambda: None,
        lambda: setattr(layer.weight, "data", torch.randn_like(layer.weight)),  # replaced storage
        lambda: layer.weight.mul_(2.0),  # in place
        lambda: layer.bias.add_(1.0),
        lambda: setattr(layer.bias, "data", torch.randn_like(layer.bias)),
        lambda: setattr(layer, "A", torch.randn_like(layer.A)),  # replaced buffer
    )
    for change in changes:
        with torch.no_grad():
            change()
            for inputs in (x, x[:1, :1]):
                served = layer(inputs)
                assert served.shape == inputs.shape[:-1] + (24,)
                assert_close(served, expected(inputs), torch.float32, what="served output after a change")


def test_copies_serve_their_own_fast_weights():
    """deepcopy and pickle (torch.save of a whole model) after serving with live fast weights: the
    prepared forward is a closure over the original's tensors, which pickle refuses and a copy must
    not serve from."""
    import copy
    import io

    layer = FastLinear(nn.Linear(40, 24), layer_index=0, rank=4, scale=0.5, seed=0, backend="torch")
    layer.b_is_zero = False
    x = torch.randn(2, 40)
    with torch.no_grad():
        layer.B.normal_()
        before = layer(x)
        twin = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for clone in (twin, loaded):
            clone.B.mul_(-1.0)
            flipped = clone.base(x) + 0.5 * (x @ clone.A.t()) @ clone.B.detach().t()
            assert_close(clone(x), flipped, torch.float32, what="a copy's served output")
        assert torch.equal(layer(x), before), "changing a copy changed the original"


def test_the_serving_copy_of_b_is_counted_in_bytes_held(llama):
    learner = fastcl.patch(llama, rank=4, lr=1e-2)
    ids = random_ids(2, 9)
    learner.observe(ids)
    learner.step()
    assert learner.stats()["bytes_held"]["serving"] == 0
    with torch.no_grad():
        llama(ids)  # serving with live fast weights lays B out once per layer
    expected = sum(m.B.numel() * m.B.element_size() for m in learner.modules.values())
    assert learner.stats()["bytes_held"]["serving"] == expected


@pytest.mark.parametrize("fails", [False, True])
def test_restored_leaves_the_model_as_it_came(fails):
    from fastcl.benchmark import restored

    model = tiny_model("llama")
    ids = random_ids()
    before = weights_copy(model)
    with pytest.raises(RuntimeError, match="inside") if fails else contextlib.nullcontext():
        with restored(model):
            learner = fastcl.patch(model, rank=4, lr=1e-2)
            learner.observe(ids)
            assert learner.step()
            learner.consolidate(gate=False)
            changed = model.model.layers[0].mlp.down_proj.base.weight
            assert not torch.equal(changed, before["model.layers.0.mlp.down_proj.weight"]), "nothing was merged"
            if fails:
                raise RuntimeError("a failure inside")
    assert not hasattr(model, "fastcl") and not any(isinstance(m, FastLinear) for m in model.modules())
    assert_weights_unchanged(model, before, "restored()")


def test_restored_keeps_a_learner_that_was_there_on_entry():
    from fastcl.benchmark import restored

    model = tiny_model("llama")
    learner = fastcl.patch(model, rank=4, lr=1e-2)
    before = weights_copy(model)
    with restored(model):
        learner.observe(random_ids())
        assert learner.step()
        learner.consolidate(gate=False)
    assert model.fastcl is learner
    assert_weights_unchanged(model, before, "restored()")


@pytest.mark.parametrize("options, expected_seed", [({"rank": 4}, 7), ({"rank": 4, "seed": 3}, 3)])
def test_a_benchmark_learner_draws_from_the_streams_seed_unless_told_otherwise(options, expected_seed):
    from fastcl.benchmark import patch_for_stream, restored

    model = tiny_model("llama")
    with restored(model):
        learner = patch_for_stream(model, None, 7, options)
        assert learner.config.seed == expected_seed and learner.config.rank == 4
        assert {m.seed for m in learner.modules.values()} == {expected_seed}
