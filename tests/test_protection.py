"""Protected input directions: A avoids where general text lives in each layer's input."""

import pytest
import torch

import fastcl
from fastcl.projection import make_projection
from fastcl.protection import _top_eigenvectors, principal_input_directions
from helpers import VOCAB, random_ids, tiny_model


class CharTokenizer:
    """Enough of a tokenizer for the shipped texts: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def subspace_distance(u, v):
    return float(torch.linalg.matrix_norm(u @ u.t() - v @ v.t(), ord=2))


def test_top_eigenvectors_match_eigh_on_a_matrix_with_a_gap():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(37, 37, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([50.0, 30, 20, 10]), torch.rand(33, generator=g).double()])
    moment = (q * spectrum) @ q.t()
    found = _top_eigenvectors(moment.float(), 4)
    expected = torch.linalg.eigh(moment).eigenvectors[:, -4:].float()
    assert torch.allclose(found.t() @ found, torch.eye(4), atol=1e-5)
    assert subspace_distance(found, expected) < 1e-4


def test_projection_rows_are_orthogonal_to_the_protected_directions():
    g = torch.Generator().manual_seed(1)
    avoid, _ = torch.linalg.qr(torch.randn(29, 3, generator=g))
    plain = make_projection(0, 2, 5, 6, 29, torch.float32, "cpu")
    A = make_projection(0, 2, 5, 6, 29, torch.float32, "cpu", avoid=avoid)
    assert (A @ avoid).abs().max() < 1e-6
    assert not (plain @ avoid).abs().max() < 1e-3  # the plain draw does see them
    # Only the protected component is removed: the rest of each row is the plain draw.
    assert torch.allclose(A, plain - (plain @ avoid) @ avoid.t(), atol=1e-6)


def test_principal_directions_find_a_planted_dominant_input_direction():
    model = tiny_model("llama")
    layer = model.model.layers[0].mlp.down_proj
    direction = torch.nn.functional.normalize(torch.arange(1.0, 73.0), dim=0)
    handle = layer.register_forward_pre_hook(lambda m, args: (args[0] + 40.0 * direction,))
    try:
        found = principal_input_directions(model, {"down": layer}, random_ids(1, 40)[0].tolist(), k=2)["down"]
    finally:
        handle.remove()
    assert found.shape == (72, 2)
    assert float((found.t() @ direction).norm()) > 0.999


def test_q_k_v_share_one_basis_and_every_layer_gets_one():
    model = tiny_model("llama")
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    found = principal_input_directions(model, modules, random_ids(1, 30)[0].tolist(), k=3)
    assert found.keys() == modules.keys()
    attn = "model.layers.1.self_attn."
    assert found[attn + "q_proj"] is found[attn + "k_proj"] is found[attn + "v_proj"]
    assert found[attn + "o_proj"] is not found[attn + "q_proj"]


def test_patch_with_a_tokenizer_protects_every_projection_across_consolidations(tmp_path):
    model = tiny_model("llama")
    learner = fastcl.patch(model, rank=4, tokenizer=CharTokenizer(), protect_directions=5, gate_tolerance=None,
                           anchor_weight=0.0, replay=0, replay_per_step=0)
    ids = random_ids(1, 12)[0].tolist()
    learner.learn(ids[:5], ids[5:])  # steps and consolidates: A is resampled
    assert learner.counters.epoch == 1
    for module in learner.modules.values():
        assert module.protected.shape == (module.in_features, 5)
        assert (module.A.float() @ module.protected).abs().max() < 1e-5
    path = tmp_path / "state.safetensors"
    learner.save(path)

    # A learner patched without protection takes the file's: the fast weights were learned in it.
    other_model = tiny_model("llama")
    other = fastcl.patch(other_model, rank=4)
    assert all(m.protected is None for m in other.modules.values())
    other.load(path)
    assert other.config.protect_directions == 5
    for name, module in learner.modules.items():
        assert torch.equal(other.modules[name].protected, module.protected)
        assert torch.equal(other.modules[name].A, module.A)


def test_protection_without_a_tokenizer_is_refused_or_turned_off():
    model = tiny_model("llama")
    with pytest.raises(fastcl.PatchError, match="protect_directions need the tokenizer"):
        fastcl.patch(model, protect_directions=4)
    learner = fastcl.patch(model)
    assert learner.config.protect_directions == 0
    assert all(m.protected is None for m in learner.modules.values())


def test_protecting_as_many_directions_as_the_input_is_wide_is_refused_before_patching():
    model = tiny_model("llama")
    with pytest.raises(fastcl.PatchError, match="protect_directions=48"):
        fastcl.patch(model, tokenizer=CharTokenizer(), protect_directions=48)
    assert not hasattr(model, "fastcl")


def test_model_to_half_keeps_the_protected_basis_exact():
    model = tiny_model("llama")
    learner = fastcl.patch(model, tokenizer=CharTokenizer(), protect_directions=3, gate_tolerance=None)
    module = next(iter(learner.modules.values()))
    before = module.protected.clone()
    model.to(torch.float16)
    assert module.protected.dtype == torch.float32 and torch.equal(module.protected, before)
    assert module.A.dtype == torch.float16
