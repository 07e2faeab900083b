"""Learner: observe/step/consolidate/rollback/save/load, bad input, constant memory."""

import inspect
import logging

import pytest
import torch

import fastcl
from helpers import VOCAB, assert_same_state, learner_state, random_ids, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def patched(arch="llama", **kw):
    model = tiny_model(arch)
    kw.setdefault("rank", 4)
    kw.setdefault("lr", 1e-2)
    return model, fastcl.patch(model, **kw)


def mean_loss(learner, ids):
    with torch.no_grad():
        return learner.observe(ids, weight=0).logits.log_softmax(-1)[:, :-1].gather(
            -1, ids[:, 1:, None]).neg().mean().item()


def test_observe_step_lowers_the_loss_on_what_was_served():
    model, learner = patched()
    ids = random_ids()
    before = mean_loss(learner, ids)
    for _ in range(20):
        learner.observe(ids)
        learner.step()
    after = mean_loss(learner, ids)
    assert after < before - 0.5, (before, after)
    assert learner.stats()["steps"] == 20


def test_observe_returns_cache_usable_for_generation():
    model, learner = patched()
    ids = random_ids(batch=1, seq=6)
    out = learner.observe(ids)
    assert out.logits.shape == (1, 6, VOCAB) and not out.logits.requires_grad
    assert out.loss is not None and out.loss.ndim == 0
    cache = out["cache"] if "cache" in out else out.past_key_values
    next_id = out.logits[:, -1].argmax(-1, keepdim=True)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        step = model(next_id, **{cache_arg: cache})
        full = model(torch.cat([ids, next_id], 1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-4)


def test_generate_on_patched_model_with_live_fast_weights():
    model, learner = patched()
    ids = random_ids(batch=1, seq=5)
    learner.observe(ids)
    learner.step()
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_loss_mask_and_weight_select_what_is_learned():
    model, learner = patched()
    ids = random_ids(batch=1, seq=8)
    mask = torch.zeros_like(ids)
    mask[:, 5:] = 1
    learner.observe(ids, loss_mask=mask)
    assert learner.counters.tokens_pending == 3
    learner.observe(ids, weight=0)
    assert learner.counters.tokens_pending == 3, "weight=0 serves without learning"
    with pytest.raises(fastcl.InputError, match="negative"):
        learner.observe(ids, weight=-1.0)


def test_left_padded_batch_matches_rows_served_alone():
    """A padded batch accumulates the same gradient as its rows one at a time."""
    ids = random_ids(batch=2, seq=9)
    _, alone = patched()
    alone.observe(ids[:1, 3:])
    alone.observe(ids[1:])
    _, batched = patched()
    padded = ids.clone()
    padded[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    batched.observe(padded, attention_mask=mask)
    assert batched.counters.tokens_pending == alone.counters.tokens_pending == 5 + 8
    for (name, a), b in zip(alone.modules.items(), batched.modules.values()):
        torch.testing.assert_close(b.grad_B, a.grad_B, rtol=1e-4, atol=1e-6, msg=name)


def test_consolidate_matches_unmerged_and_rollback_is_exact():
    model, learner = patched()
    ids = random_ids()
    original = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    for _ in range(3):
        learner.observe(ids)
        learner.step()
    live = logits(model, ids)
    state_before = learner_state(learner)
    report = learner.consolidate()
    assert report.layers_merged == len(learner.modules) and report.epoch == 1
    assert all(m.b_is_zero and not m.B.any() for m in learner.modules.values())
    torch.testing.assert_close(logits(model, ids), live, rtol=0, atol=1e-5)
    assert any(not torch.equal(m.weight, original[n]) for n, m in learner.modules.items())
    learner.rollback()
    assert_same_state(state_before, learner_state(learner) | {"counters": state_before["counters"]})
    assert learner.counters.rollbacks == 1
    assert torch.equal(logits(model, ids), live)
    with pytest.raises(fastcl.ConsolidationError, match="nothing to roll back"):
        learner.rollback()


def test_consolidate_resamples_the_projection():
    _, learner = patched()
    module = next(iter(learner.modules.values()))
    A0 = module.A.clone()
    learner.consolidate()
    assert not torch.equal(module.A, A0)
    learner.rollback()
    assert torch.equal(module.A, A0)


def test_consolidate_refuses_non_finite_updates_and_changes_nothing():
    model, learner = patched()
    learner.observe(random_ids())
    learner.step()
    name, module = list(learner.modules.items())[3]
    with torch.no_grad():
        module.B[0, 0] = float("inf")
    before = learner_state(learner)
    with pytest.raises(fastcl.ConsolidationError, match=name.replace(".", r"\.")):
        learner.consolidate()
    assert_same_state(before, learner_state(learner))


def test_nan_accumulator_skips_the_step(caplog):
    _, learner = patched()
    learner.observe(random_ids())
    next(iter(learner.modules.values())).grad_B[0, 0] = float("nan")
    B_before = [m.B.clone() for m in learner.modules.values()]
    with caplog.at_level(logging.WARNING, logger="fastcl"):
        assert learner.step() is False
    assert "step skipped" in caplog.text
    assert learner.counters.skipped_steps == 1 and learner.counters.steps == 0
    assert all(torch.equal(b, m.B) for b, m in zip(B_before, learner.modules.values()))
    assert all(not m.grad_B.any() for m in learner.modules.values())


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(input_ids=torch.rand(1, 5)), "integer tensor"),
        (dict(input_ids=torch.tensor([[1, 2, VOCAB]])), f"token id {VOCAB}"),
        (dict(input_ids=torch.tensor([[1, -3, 2]])), "token id -3"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), loss_mask=torch.ones(2, 4)), "loss_mask has shape"),
        (dict(input_ids=torch.ones(1, 5, dtype=torch.long), loss_mask=torch.full((1, 5), 0.5)), "0/1"),
        (dict(input_ids=torch.ones(1, 1, 5, dtype=torch.long)), "shape"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), weight=torch.ones(3)), "weight must be"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(bad, message):
    _, learner = patched()
    learner.observe(random_ids())
    learner.step()
    learner.observe(random_ids(seed=3))
    before = learner_state(learner)
    with pytest.raises(fastcl.InputError, match=message):
        learner.observe(**bad)
    assert_same_state(before, learner_state(learner))


def test_bytes_held_do_not_grow_with_tokens():
    _, learner = patched()
    learner.observe(random_ids(seq=8))
    learner.step()
    one = learner.stats()["bytes_held"]
    for seed in range(10):
        learner.observe(random_ids(seq=8, seed=seed))
    learner.step()
    ten = learner.stats()
    assert ten["bytes_held"] == one
    assert ten["tokens_observed"] == 11 * 2 * 7


def test_save_load_round_trip_continues_identically(tmp_path):
    ids, ids2 = random_ids(), random_ids(seed=5)
    model, learner = patched()
    learner.observe(ids)
    learner.step()
    learner.consolidate()
    learner.observe(ids)
    learner.step()
    learner.observe(ids2)  # pending accumulators are part of the state too
    path = tmp_path / "state.safetensors"
    learner.save(path)
    saved = learner_state(learner)

    learner.step()
    expected = logits(model, ids)

    fresh_model, fresh = patched()
    fresh.load(path)  # the file holds the consolidated weights, so a fresh base model works
    assert_same_state(saved, learner_state(fresh))
    fresh.step()
    assert torch.equal(logits(fresh_model, ids), expected)


def test_load_refuses_mismatches_and_changes_nothing(tmp_path):
    _, learner = patched()
    learner.observe(random_ids())
    learner.step()
    path = tmp_path / "s.safetensors"
    learner.save(path)

    cases = {
        "rank": patched(rank=8)[1],
        "patched layers": patched(targets=["q_proj"])[1],
        "model mismatch": patched("qwen2")[1],
    }
    for message, other in cases.items():
        other.observe(random_ids())
        before = learner_state(other)
        with pytest.raises(fastcl.StateFileError, match=message):
            other.load(path)
        assert_same_state(before, learner_state(other))

    # Same shapes, other base weights, and the file holds no weights: refused.
    other_model = tiny_model("llama", seed=1)
    other = fastcl.patch(other_model, rank=4, lr=1e-2)
    with pytest.raises(fastcl.StateFileError, match="differ from those the state was saved with"):
        other.load(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_fastcl"])
def test_corrupt_state_file_is_refused(tmp_path, damage):
    _, learner = patched()
    learner.observe(random_ids())
    learner.step()
    path = tmp_path / "s.safetensors"
    learner.save(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64 + data[64:])
    else:
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(2)}, str(path))
    before = learner_state(learner)
    with pytest.raises(fastcl.StateFileError):
        learner.load(path)
    assert_same_state(before, learner_state(learner))


def test_sgd_optimizer_and_loss_normalisation():
    """SGD on B: one step moves B by lr times the mean-token gradient, whatever the split."""
    ids = random_ids(batch=2, seq=7)
    _, whole = patched(optimizer="sgd", lr=0.1)
    whole.observe(ids)
    whole.step()
    _, split = patched(optimizer="sgd", lr=0.1)
    split.observe(ids[:1])
    split.observe(ids[1:])
    split.step()
    for a, b in zip(whole.modules.values(), split.modules.values()):
        torch.testing.assert_close(a.B, b.B, rtol=1e-5, atol=1e-7)
