"""layer_options: learn_at, projection and lr set per layer, so one learner can hold two recipes
on disjoint layers (e.g. attention at every position in a random A, the MLP keyed to the entity
in a fitted A), each layer learning exactly as a learner with its options everywhere would."""

import pytest
import torch

import fastcl
from fastcl.errors import PatchError
from fastcl.layers import FastLinear
from helpers import ARCHITECTURES, assert_weights_unchanged, record_fits, tiny_model, weights_copy
from test_protection import CharTokenizer

MLP = "gate_proj|up_proj|down_proj"
HEAD, TAIL = [1, 2], [5]
TEACHER = HEAD + [10, 40, 41, 11, 12, 13] + [3, 40, 41, 4] + TAIL  # context, then the question
STUDENT = HEAD + [3, 40, 41, 4] + TAIL  # the question alone: its entity is [40, 41] at 3, 4
RESPONSE = [11, 12, 13]


def patched(**kw):
    options = dict(rank=4, lr=1e-2, tokenizer=CharTokenizer(), gate_tolerance=None, anchor_weight=0.0, replay=0,
                   replay_per_step=0, grounded=False, gain_threshold=-float("inf"), consolidate_every=0,
                   layer_options=None)
    options.update(kw)
    model = tiny_model("llama")
    return model, fastcl.patch(model, **options)


def is_mlp(name):
    return name.rsplit(".", 1)[-1] in MLP.split("|")


def accumulated(**kw):
    _, learner = patched(step_every=0, **kw)
    learner.learn(TEACHER, RESPONSE, STUDENT)
    return learner, {name: m.grad_B.clone() for name, m in learner.modules.items()}


def test_each_layer_fits_and_learns_as_its_own_options_would_everywhere(monkeypatch):
    recorded = record_fits(monkeypatch)
    mixed, grads = accumulated(layer_options={MLP: {"learn_at": "entity", "projection": "whitened"}})
    fits = dict(recorded)
    names = list(mixed.modules)
    assert {names[i] for i in fits} == {n for n in names if is_mlp(n)}
    assert all(p == [3, 4] for p in fits.values())  # the entity's rows, not the answering ones
    assert all(m.fitted == is_mlp(n) for n, m in mixed.modules.items())
    _, everywhere = accumulated()
    _, keyed = accumulated(learn_at="entity", projection="whitened")
    for name, grad in grads.items():
        expected = (keyed if is_mlp(name) else everywhere)[name]
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7, msg=name)
    # (the last block's MLP at the entity reaches no response token: its dB is zero in both)
    for group in (True, False):
        assert sum(float(g.norm()) for n, g in grads.items() if is_mlp(n) == group) > 0
    assert not all(torch.allclose(grads[n], everywhere[n]) for n in grads if is_mlp(n))
    assert all(m.sketch_mask is None and m.fit_positions is None for m in mixed.modules.values())


def test_a_layers_lr_scales_its_step_only():
    def stepped(**kw):
        _, learner = patched(optimizer="sgd", **kw)
        learner.learn(TEACHER, RESPONSE, STUDENT)
        return learner

    mixed, uniform = stepped(layer_options={MLP: {"lr": 2.5e-3}}), stepped()
    assert sorted(g["lr"] for g in mixed.optimizer.param_groups) == [2.5e-3, 1e-2]
    for name, module in mixed.modules.items():
        expected = uniform.modules[name].B * (0.25 if is_mlp(name) else 1.0)
        assert module.B.abs().max() > 0
        torch.testing.assert_close(module.B, expected, rtol=1e-5, atol=1e-9, msg=name)


def test_save_and_load_keep_each_layers_optimizer_state(tmp_path):
    options = dict(layer_options={MLP: {"lr": 2e-3, "learn_at": "entity", "projection": "whitened"}})
    _, saved = patched(**options)
    saved.learn(TEACHER, RESPONSE, STUDENT)
    path = tmp_path / "state.safetensors"
    saved.save(path)
    _, loaded = patched(**options)
    loaded.load(path)
    assert loaded.config.layer_options == saved.config.layer_options
    for (name, a), b in zip(saved.modules.items(), loaded.modules.values()):
        assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(saved.optimizer.state[a.B][key], loaded.optimizer.state[b.B][key]), (name, key)


def test_config_round_trips_and_a_layer_gets_the_first_matching_pattern():
    config = fastcl.LearnerConfig(lr=1e-3, inner_steps=1, layer_options={"down_proj": {"lr": 5e-4},
                                                                         MLP: {"learn_at": "entity", "inner_steps": 3}})
    assert fastcl.LearnerConfig(**config.to_dict()).layer_options == config.layer_options
    assert config.layer("model.layers.0.mlp.down_proj") == {"learn_at": "all", "projection": "random", "lr": 5e-4,
                                                            "inner_steps": 1}
    assert config.layer("model.layers.0.mlp.up_proj") == {"learn_at": "entity", "projection": "random", "lr": 1e-3,
                                                          "inner_steps": 3}
    assert config.layer("model.layers.0.self_attn.q_proj") == {"learn_at": "all", "projection": "random", "lr": 1e-3,
                                                               "inner_steps": 1}


@pytest.mark.parametrize("options, message", [
    ({MLP: {"rank": 8}}, r"sets \['rank'\]; per layer only"),
    ({MLP: {"learn_at": "subject"}}, "learn_at must be one of"),
    ({MLP: {"projection": "learned"}}, "projection must be one of"),
    ({MLP: {"lr": 0.0}}, "lr must be positive"),
    ({MLP: {"inner_steps": -1}}, "inner_steps must be an integer >= 0"),
    ({MLP: {"inner_steps": 1.5}}, "inner_steps must be an integer >= 0"),
    ({MLP: "entity"}, "must map layer-name patterns to dicts"),
])
def test_bad_layer_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        fastcl.LearnerConfig(layer_options=options)


def test_patch_refuses_what_layer_options_cannot_do_and_leaves_the_model_alone():
    with pytest.raises(ValueError, match="learn_at='entity' applies to objective='context_gain'"):
        fastcl.LearnerConfig(objective="next_token", layer_options={MLP: {"learn_at": "entity"}})
    model = tiny_model("llama")
    before = weights_copy(model)
    with pytest.raises(PatchError, match=r"layer_options patterns matched no patched layer: \['lm_head'\]"):
        fastcl.patch(model, layer_options={"lm_head": {"lr": 1e-3}})
    with pytest.raises(PatchError, match="layer_options need the tokenizer"):
        fastcl.patch(model, layer_options={MLP: {"projection": "whitened"}})
    assert not hasattr(model, "fastcl") and not any(isinstance(m, FastLinear) for m in model.modules())
    assert_weights_unchanged(model, before, "a refused patch()")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_mlp_preset_keys_every_mlp_layer_and_only_those(arch):
    learner = fastcl.patch(tiny_model(arch), tokenizer=CharTokenizer(), gate_tolerance=None, lr=1.5e-3,
                           layer_options=fastcl.MLP_ENTITY_KEYED)
    mlp = {name for name in learner.modules if ".mlp." in name}
    assert mlp and len(mlp) < len(learner.modules), sorted(learner.modules)
    for name in learner.modules:
        expected = ({"learn_at": "entity", "projection": "whitened", "lr": 2e-3, "inner_steps": 0} if name in mlp
                    else {"learn_at": "all", "projection": "random", "lr": 1.5e-3, "inner_steps": 0})
        assert learner.config.layer(name) == expected, name
    assert sorted(g["lr"] for g in learner.optimizer.param_groups) == [1.5e-3, 2e-3]
    with pytest.raises(TypeError):  # the preset is read-only: an edit here would change every later patch
        fastcl.MLP_ENTITY_KEYED[r".*\.mlp\..*"]["lr"] = 1.0


def test_the_default_keys_the_mlp_with_a_tokenizer_and_its_own_step():
    learner = fastcl.patch(tiny_model("llama"), tokenizer=CharTokenizer(), gate_tolerance=None)
    config = learner.config
    assert config.layer_options == {p: dict(o) for p, o in fastcl.MLP_ENTITY_KEYED.items()}
    assert config.lr == fastcl.config.PRESET_LR
    assert sorted(g["lr"] for g in learner.optimizer.param_groups) == [1.5e-3, 2e-3]
    assert {config.layer(n)["learn_at"] for n in learner.modules if ".mlp." in n} == {"entity"}
    # What is saved is the resolved config: loaded elsewhere it is this one, not "auto" again.
    again = fastcl.LearnerConfig(**config.to_dict())
    assert again.layer_options == config.layer_options and not again.auto_layer_options


@pytest.mark.parametrize("options, note", [
    (dict(), "no tokenizer given"),
    (dict(tokenizer=CharTokenizer(), gate_tolerance=None, targets=["q_proj", "v_proj"]),
     "no patched layer is under an `mlp` module"),
    (dict(tokenizer=CharTokenizer(), gate_tolerance=None, objective="next_token"), None),
    (dict(tokenizer=CharTokenizer(), gate_tolerance=None, learn_at="entity"), None),
    (dict(tokenizer=CharTokenizer(), gate_tolerance=None, projection="whitened"), None),
])
def test_the_default_preset_is_off_where_it_does_not_apply_and_the_step_follows(options, note):
    learner = fastcl.patch(tiny_model("llama"), **options)
    assert learner.config.layer_options is None and learner.config.lr == fastcl.config.PLAIN_LR
    assert {learner.config.layer(n)["lr"] for n in learner.modules} == {fastcl.config.PLAIN_LR}
    if note is not None:
        assert any(note in n for n in learner.report.notes), learner.report.notes
    given = fastcl.patch(tiny_model("llama"), lr=1e-3, **options)  # a step asked for is kept
    assert given.config.lr == 1e-3 and given.config.layer_options is None


def test_replicas_keep_the_default_preset_in_blocks_and_asynchronous_ones_drop_it(monkeypatch):
    import fastcl.patcher

    # Rank 1 of a group of two, as fastcl.distributed.group_layout would find it.
    monkeypatch.setattr(fastcl.patcher, "group_layout", lambda group: None if group is False else (1, 2))
    learner = fastcl.patch(tiny_model("llama"), rank=4, tokenizer=CharTokenizer(), gate_tolerance=None)
    assert learner.config.layer_options is not None and learner.config.lr == fastcl.config.PRESET_LR
    for name, m in learner.modules.items():  # the fitted MLP layers: one block of 4 rows a replica, this one's second
        assert (m.rank, m.fit_block) == ((8, (4, 4)) if is_mlp(name) else (4, None)), name
        assert m.scale == learner.config.scale  # a block learns at a lone learner's scale
    assert any("rows 4-7" in n for n in learner.report.notes), learner.report.notes
    from fastcl.distributed import bytes_per_step

    counted = bytes_per_step(learner)
    mlp = [m for n, m in learner.modules.items() if is_mlp(n)]
    attention = [m for n, m in learner.modules.items() if not is_mlp(n)]
    assert counted["fitted_projection"] == sum(4 * m.in_features * 4 for m in mlp)
    # an epoch's first step: attention's accumulators summed whole, the MLP's own block of 4 columns gathered
    assert counted["fastcl_sync"] == (sum(m.out_features * 4 * 4 for m in attention + mlp)
                                      + counted["fitted_projection"] + 24)
    assert counted["later_steps"] == sum(m.grad_B.numel() * 4 for m in learner.modules.values()) + 24

    asynchronous = fastcl.patch(tiny_model("llama"), tokenizer=CharTokenizer(), gate_tolerance=None, sync_every=2)
    assert asynchronous.config.layer_options is None and asynchronous.config.lr == fastcl.config.PLAIN_LR
    assert any("asynchronous replicas" in n for n in asynchronous.report.notes), asynchronous.report.notes
    model = tiny_model("llama")
    before = weights_copy(model)
    with pytest.raises(PatchError, match="with asynchronous replicas"):
        fastcl.patch(model, tokenizer=CharTokenizer(), gate_tolerance=None, sync_every=2,
                     layer_options=fastcl.MLP_ENTITY_KEYED)
    assert not hasattr(model, "fastcl")
    assert_weights_unchanged(model, before)

    alone = fastcl.patch(tiny_model("llama"), tokenizer=CharTokenizer(), gate_tolerance=None, process_group=False)
    assert alone.config.layer_options is not None
    assert all(m.fit_block is None and m.rank == 16 for m in alone.modules.values())
    other = fastcl.LearnerConfig(layer_options={MLP: {"learn_at": "entity"}})  # not measured: the plain step
    assert other.lr == fastcl.config.PLAIN_LR


def test_the_default_preset_learns_the_same_under_torch_compile():
    """The entity mask goes through the registered op and the fit breaks the graph cleanly, so a
    compiled model accumulates what an eager one does."""
    grads = []
    for compiled in (False, True):
        model, learner = patched(step_every=0, layer_options="auto", lr=None)
        if compiled:
            model.compile(backend="aot_eager")
        learner.learn(TEACHER, RESPONSE, STUDENT)
        assert all(m.fitted == is_mlp(n) for n, m in learner.modules.items())
        grads.append({name: m.grad_B.clone() for name, m in learner.modules.items()})
    eager, compiled = grads
    assert sum(float(g.norm()) for g in eager.values()) > 0
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_entity_answer_weight_learns_the_answer_too_but_fits_A_to_the_entity(monkeypatch):
    fits = record_fits(monkeypatch)
    keyed = {MLP: {"learn_at": "entity", "projection": "whitened"}}
    _, alone = accumulated(layer_options=keyed)
    _, weighted = accumulated(layer_options=keyed, entity_answer_weight=0.5)
    assert fits and all(p == [3, 4] for _, p in fits)  # the entity's rows, with or without the answer's
    changed = [n for n in alone if not torch.allclose(alone[n], weighted[n])]
    assert changed and all(is_mlp(n) for n in changed)  # only the entity-keyed layers learn more rows


def test_a_state_with_a_blocks_a_replica_fitted_a_loads_only_into_the_same_layout(monkeypatch, tmp_path):
    import fastcl.patcher

    monkeypatch.setattr(fastcl.patcher, "group_layout", lambda group: None if group is False else (0, 2))
    grouped = fastcl.patch(tiny_model("llama"), rank=4, tokenizer=CharTokenizer(), gate_tolerance=None)
    path = tmp_path / "group.safetensors"
    grouped.save(path)
    model = tiny_model("llama")
    alone = fastcl.patch(model, rank=4, tokenizer=CharTokenizer(), gate_tolerance=None, process_group=False)
    before = {name: m.B.detach().clone() for name, m in alone.modules.items()}
    with pytest.raises(fastcl.StateFileError, match=r"expected \(72, 4\); in a group of replicas a fitted A holds"):
        alone.load(path)
    assert all(torch.equal(m.B, before[name]) for name, m in alone.modules.items())


def test_a_backend_that_cannot_run_a_groups_block_rank_is_refused_at_patch(monkeypatch):
    import types

    import fastcl.patcher
    from fastcl.ops import backends

    def limited(rank):  # as the CUDA kernels' limit, here at 8
        if rank > 8:
            raise RuntimeError(f"fastcl._C: rank {rank} is outside 1..8")

    monkeypatch.setattr(fastcl.patcher, "group_layout", lambda group: None if group is False else (0, 3))
    monkeypatch.setattr(backends, "resolve", lambda backend, device: backend)
    monkeypatch.setattr(backends, "implementation", lambda backend, device: types.SimpleNamespace(check_rank=limited))
    model = tiny_model("llama")
    before = weights_copy(model)
    with pytest.raises(PatchError, match=r"cannot learn at rank 12 \(rank 4 x 3 replicas.*outside 1\.\.8"):
        fastcl.patch(model, rank=4, backend="cuda", tokenizer=CharTokenizer(), gate_tolerance=None)
    assert not hasattr(model, "fastcl")
    assert_weights_unchanged(model, before)
    assert fastcl.patch(model, rank=4, backend="cuda", tokenizer=CharTokenizer(), gate_tolerance=None,
                        process_group=False).modules  # alone, rank 4 fits the limit
