"""save()/load() carry the recipe's state: a learner restarted from a file goes on learning as
the saved one would have (replay buffer, schedule, random draws, the gate's baselines, the
anchor's reference), and a damaged recipe state is refused with nothing changed."""

import json
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastcl
from fastcl import recipe_state
from fastcl.guard import Anchor
from fastcl.recipe import Interaction
from helpers import VOCAB, random_rows as rows, tiny_model


def guarded(model, chat=False):
    """A learner with everything the recipe keeps between calls: a replay buffer sampled at
    random, an anchor (set by hand: patch() wants a tokenizer for the shipped text; with `chat`,
    also holding the reference's replies to two prompts), a gate with a probe that tracks drift
    from the model at its first check, steps every second call."""
    learner = fastcl.patch(model, rank=4, lr=1e-2, grounded=False, gain_threshold=-1.0, step_every=2,
                           consolidate_every=1, replay=6, replay_per_step=2)
    learner.config.anchor_weight = 1.0
    learner.recipe.anchor = Anchor(rows(40, 1, low=45, high=46)[0], window=16, top_k=8,
                                   chat_prompts=rows(42, 2, 4, 7) if chat else (), reply_tokens=5)
    learner.add_probe(lambda m: -float(m(torch.tensor([rows(41, 1, low=20, high=21)[0]])).logits.float().std()),
                      tolerance=10.0, name="spread")
    return learner


def requests(seed, n):
    return list(zip(rows(seed, n, 6, 12), rows(seed + 1, n), rows(seed + 2, n, 3, 6)))  # teacher, student, response


def serve(learner, stream):
    for teacher, student, response in stream:
        learner.learn(teacher, response, student)


def test_every_interaction_field_is_saved_or_derived():
    """A field added to Interaction must be saved, or declared derived (recomputed on use)."""
    known = {*recipe_state.TOKEN_FIELDS, *recipe_state.PER_TOKEN_FIELDS, *recipe_state.SCALAR_FIELDS,
             *recipe_state.DERIVED_FIELDS}
    assert {f.name for f in fields(Interaction)} == known


@pytest.mark.parametrize("chat", [False, True])
def test_a_learner_restarted_from_its_file_continues_as_if_never_stopped(tmp_path, chat):
    model = tiny_model("llama")
    learner = guarded(model, chat)
    serve(learner, requests(50, 9))  # odd: one request waits for its step
    assert len(learner.recipe.pending) == 1 and len(learner.recipe.replay) == 6  # the buffer is full
    assert learner.counters.consolidations == 4 and learner.recipe.gate.baseline is not None
    path = tmp_path / "state.safetensors"
    learner.save(path)

    later = requests(60, 7)
    serve(learner, later)
    expected = {n: (m.weight.detach().clone(), m.B.detach().clone()) for n, m in learner.modules.items()}

    fresh = guarded(tiny_model("llama"), chat)  # the base weights: the file holds the merged ones
    fresh.load(path)
    assert fresh.recipe.anchor.windows == learner.recipe.anchor.windows  # replies as the reference gave them
    # the start model's baseline, not one measured on the loaded weights
    assert fresh.recipe.gate.baseline == {"spread": learner.recipe.gate.baseline["spread"]}
    serve(fresh, later)
    for name, module in fresh.modules.items():
        weight, fast = expected[name]
        assert torch.equal(module.weight, weight), f"{name}: the weights differ after the same requests"
        assert torch.equal(module.B, fast), name
    assert [i.replays for i in fresh.recipe.replay] == [i.replays for i in learner.recipe.replay]


def test_without_the_recipe_state_the_restart_takes_the_drifted_model_as_its_reference(tmp_path):
    """What the saved state prevents: a version 1 file (no recipe state) still loads, and then the
    gate's baseline is taken from the loaded, already-changed weights."""
    learner = guarded(tiny_model("llama"))
    serve(learner, requests(50, 8))
    path, old = tmp_path / "state.safetensors", tmp_path / "v1.safetensors"
    learner.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "recipe"}
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k.split(".")[0] not in ("replay", "pending",
                                                                                              "anchor")}
    save_file(tensors, str(old), metadata={**metadata, "version": "1"})
    fresh = guarded(tiny_model("llama"))
    fresh.load(old)
    assert not fresh.recipe.replay and fresh.recipe.gate.baseline is None
    fresh.recipe.check_gate(skip=True)
    assert fresh.recipe.gate.baseline["spread"] != learner.recipe.gate.baseline["spread"]


def rewrite(path, out, change):
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(metadata, tensors)
    save_file(tensors, str(out), metadata=metadata)


def damage_tokens(metadata, tensors):
    tensors["replay.0.response"] = torch.tensor([VOCAB + 5])


def damage_logprobs(metadata, tensors):
    tensors["replay.1.teacher_logprobs"] = tensors["replay.1.teacher_logprobs"][:-1]


def damage_anchor(metadata, tensors):
    del tensors["anchor.0.probs"]


def damage_reply(metadata, tensors):
    tensors["anchor.3.tokens"] = tensors["anchor.3.tokens"][1:]  # after 3 prose windows: the first chat prompt


def damage_schedule(metadata, tensors):
    metadata["recipe"] = metadata["recipe"].replace('"requests_seen": 8', '"requests_seen": -1')


def damage_json(metadata, tensors):
    metadata["recipe"] = metadata["recipe"].replace('"anchor_next": ', '"anchor_next": "x", "_": ')


def other_gate_text(metadata, tensors):
    config = json.loads(metadata["config"])
    metadata["config"] = json.dumps({**config, "gate_text": "my_general_text.txt"})


def other_gate_answers(metadata, tensors):
    config = json.loads(metadata["config"])
    metadata["config"] = json.dumps({**config, "gate_answer_tolerance": 0.1, "gate_answers": "my_answers.txt"})


@pytest.mark.parametrize("damage, message", [
    (damage_tokens, "replay.0.response holds token id .* outside the vocabulary"),
    (damage_logprobs, "replay.1.teacher_logprobs has shape"),
    (damage_anchor, "anchor.0.probs is missing"),
    (damage_reply, "anchor.3.tokens does not answer this learner's anchor prompt 0"),
    (damage_schedule, "requests_seen must be an integer >= 0"),
    (damage_json, "anchor_next must be an integer >= 0"),
    (other_gate_text, "gate_text='my_general_text.txt' in the file, 'gate_text.txt' here"),
    (other_gate_answers, "gate_answers='my_answers.txt' in the file, 'gate_answers.txt' here"),
])
def test_a_damaged_recipe_state_is_refused_and_nothing_changes(tmp_path, damage, message):
    learner = guarded(tiny_model("llama"), chat=True)
    serve(learner, requests(50, 8))
    path, bad = tmp_path / "state.safetensors", tmp_path / "bad.safetensors"
    learner.save(path)
    rewrite(path, bad, damage)

    other = guarded(tiny_model("llama"), chat=True)
    serve(other, requests(70, 3))
    before = {n: (m.weight.detach().clone(), m.B.detach().clone()) for n, m in other.modules.items()}
    replay, baseline = list(other.recipe.replay), dict(other.recipe.gate.baseline)
    with pytest.raises(fastcl.StateFileError, match=message):
        other.load(bad)
    assert list(other.recipe.replay) == replay and other.recipe.gate.baseline == baseline
    for name, module in other.modules.items():
        assert torch.equal(module.weight, before[name][0]) and torch.equal(module.B, before[name][1]), name


def test_a_probe_added_later_keeps_the_others_baselines():
    learner = guarded(tiny_model("llama"))
    serve(learner, requests(50, 4))
    first = dict(learner.recipe.gate.baseline)
    learner.add_probe(lambda m: 0.0, tolerance=1.0, name="constant")
    serve(learner, requests(80, 2))
    assert learner.recipe.gate.baseline == {**first, "constant": 0.0}


def test_a_replica_restarted_from_the_group_file_keeps_its_own_traffic(tmp_path, monkeypatch):
    """In a group the file's replay buffer is the saving replica's: a restarted replica starts
    with an empty one, and takes the group's schedule, gate baselines and anchor reference."""
    learner = guarded(tiny_model("llama"))
    serve(learner, requests(50, 9))
    path = tmp_path / "shared.safetensors"
    learner.save(path)
    replica = guarded(tiny_model("llama"))
    monkeypatch.setattr(type(replica.replicas), "group", property(lambda self: object()))  # no collectives
    monkeypatch.setattr(replica.replicas, "after_load", lambda: None)
    replica.load(path)
    assert not replica.recipe.replay and not replica.recipe.pending
    assert replica.recipe.scheduled_steps == learner.recipe.scheduled_steps
    assert replica.recipe.gate.baseline == learner.recipe.gate.baseline
    for (indices, probs), (theirs, their_probs) in zip(replica.recipe.anchor.targets, learner.recipe.anchor.targets):
        assert torch.equal(indices, theirs) and torch.equal(probs, their_probs)


def test_load_forgets_the_anchor_drift_read_on_the_weights_before_it(tmp_path):
    learner = guarded(tiny_model("llama"))
    serve(learner, requests(60, 4))
    assert len(learner.recipe._cycle_kl) > 0  # the anchor read drift at each step
    learner.save(tmp_path / "state.safetensors")
    learner.load(tmp_path / "state.safetensors")
    assert len(learner.recipe._cycle_kl) == 0  # inner_kl_limit must not judge the loaded weights by those
