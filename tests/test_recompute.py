"""The gated MLP that recomputes act(gate) in backward: same numbers, fewer saved bytes, and only
where the MLP really computes down(act(gate(x)) * up(x))."""

import pytest
import torch
import torch.nn as nn

import fastcl
from fastcl import recompute
from helpers import random_ids, tiny_model


def saved_bytes(fn, model):
    state = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in state:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_observe_accumulates_the_same_gradients_and_saves_less(arch):
    ids = random_ids(batch=2, seq=13)
    model = tiny_model(arch)
    learner = fastcl.patch(model, rank=4)
    mlps = [m for m in model.modules() if "_fastcl_act" in m.__dict__ and "forward" in m.__dict__]
    assert len(mlps) == model.config.num_hidden_layers, "every decoder MLP should get the fused forward"
    assert any("recompute act(gate)" in note for note in learner.report.notes)
    with_recompute = saved_bytes(lambda: learner.observe(ids), model)
    fused = {name: m.grad_B.clone() for name, m in learner.modules.items()}
    learner._clear_accumulators()
    recompute.remove(model)
    without = saved_bytes(lambda: learner.observe(ids), model)
    for name, m in learner.modules.items():
        torch.testing.assert_close(m.grad_B, fused[name], rtol=1e-6, atol=1e-7, msg=f"{name}: grad_B differs")
    # One (tokens x d_ff) fp32 tensor per layer is no longer saved: act(gate).
    tokens, d_ff, layers = ids.numel(), model.config.intermediate_size, model.config.num_hidden_layers
    assert without - with_recompute == layers * tokens * d_ff * 4


def test_served_outputs_and_unpatch_are_unchanged():
    ids = random_ids()
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(ids).logits
    learner = fastcl.patch(model, rank=4)
    learner.observe(ids)
    learner.step()
    with torch.no_grad():
        live = model(ids).logits
    assert torch.equal(learner.observe(ids).logits, live), "learning and serving forwards must agree bit for bit"
    fastcl.unpatch(model, merge=False)
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "_fastcl_act")), \
        "unpatch must restore the class forward"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


class ScaledMLP(nn.Module):
    """Looks like a gated MLP, computes something else: must keep its own forward."""

    def __init__(self, d=8, d_ff=12):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, d_ff), nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([ScaledMLP()])


def test_an_mlp_that_computes_something_else_is_left_alone():
    model = Block()
    notes = recompute.install(model)
    assert "forward" not in model.layers[0].__dict__
    assert notes and "is not down(act(gate(x)) * up(x))" in notes[0]


class GatedMLP(ScaledMLP):
    def __init__(self, act):
        super().__init__()
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(approximate="tanh")], ids=["silu", "gelu_tanh"])
def test_fused_backward_matches_autograd(act):
    """SiLU takes the direct silu_backward path, any other activation autograd's; both must give
    autograd's gradients for the input and every weight."""
    torch.manual_seed(0)
    own, fused = GatedMLP(act), GatedMLP(act)
    fused.load_state_dict(own.state_dict())
    assert recompute.install(fused) and "forward" in fused.__dict__
    assert (fused._fastcl_act is torch.nn.functional.silu) == isinstance(act, nn.SiLU)
    x = torch.randn(2, 5, 8)
    grads = []
    for mlp in (own, fused):
        xi = x.clone().requires_grad_()
        mlp(xi).pow(2).sum().backward()
        grads.append([xi.grad] + [p.grad for p in mlp.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
