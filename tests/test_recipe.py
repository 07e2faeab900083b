"""learn(), its schedule, replay, the anchor and the consolidation gate (tiny models; the real
model's learning is in test_real_model.py)."""

import pytest
import torch

import fastcl
from fastcl import guard
from helpers import VOCAB, assert_same_state, learner_state, random_rows as rows, tiny_model
from test_protection import CharTokenizer


def patched(**kw):
    model = tiny_model("llama")
    kw.setdefault("rank", 4)
    kw.setdefault("lr", 1e-2)
    # The random rows here share no tokens between a response and its context, so the default
    # (grounded: learn only tokens found in the context) would learn none of them; grounded has
    # its own test.
    kw.setdefault("grounded", False)
    return model, fastcl.patch(model, **kw)


def response_losses(model, prompt, response):
    """Per response token, its loss after the prompt."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return -logprobs[positions, torch.tensor(response)]


def response_loss(model, prompt, response):
    return float(response_losses(model, prompt, response).mean())


def test_learn_without_context_learns_the_response_after_the_prompt():
    model, learner = patched(consolidate_every=2)
    prompt, response = rows(0, 1)[0], rows(1, 1)[0]
    before = response_loss(model, prompt, response)
    for _ in range(10):
        report = learner.learn(prompt, response)
    assert report.stepped and report.tokens_learned == len(response)
    assert response_loss(model, prompt, response) < before - 0.5
    assert learner.counters.consolidations == 5


def test_context_gain_learns_only_what_the_context_made_likelier():
    """With a threshold no token can pass nothing is learned; with -inf every token is."""
    teacher, student, response = rows(2, 1)[0], rows(3, 1)[0], rows(4, 1)[0]
    _, nothing = patched(gain_threshold=1e9, step_every=0)
    assert nothing.learn(teacher, response, student).tokens_learned == 0
    assert nothing.counters.tokens_pending == 0
    assert all(not m.grad_B.any() for m in nothing.modules.values())
    _, everything = patched(gain_threshold=-float("inf"), step_every=0)
    assert everything.learn(teacher, response, student).tokens_learned == len(response)
    # With every token selected, context gain is next-token learning on the student prompt.
    _, plain = patched(step_every=0)
    plain.learn(student, response)
    for a, b in zip(everything.modules.values(), plain.modules.values()):
        torch.testing.assert_close(a.grad_B, b.grad_B, rtol=1e-5, atol=1e-7)


def test_batched_ragged_requests_match_one_at_a_time():
    teachers, students, responses = rows(5, 3), rows(6, 3), rows(7, 3)
    _, batched = patched(step_every=0, gain_threshold=-1.0)
    batched.learn(teachers, responses, students, weight=[1.0, 0.5, 2.0])
    _, alone = patched(step_every=0, gain_threshold=-1.0)
    for t, s, r, w in zip(teachers, students, responses, [1.0, 0.5, 2.0]):
        alone.learn(t, r, s, weight=w)
    assert batched.counters.tokens_pending == alone.counters.tokens_pending
    for a, b in zip(batched.modules.values(), alone.modules.values()):
        torch.testing.assert_close(a.grad_B, b.grad_B, rtol=1e-4, atol=1e-6)


def test_weight_zero_is_ignored_and_negative_refused():
    _, learner = patched(step_every=0)
    prompt, response = rows(8, 2)
    assert learner.learn(prompt, response, weight=0).tokens_learned == 0
    assert learner.counters.tokens_pending == 0
    before = learner_state(learner)
    with pytest.raises(fastcl.InputError, match="negative"):
        learner.learn(prompt, response, weight=-1)
    with pytest.raises(fastcl.InputError, match="empty"):
        learner.learn(prompt, [])
    with pytest.raises(fastcl.InputError, match="batch sizes differ"):
        learner.learn([prompt, prompt], [response])
    with pytest.raises(fastcl.InputError, match=f"token id {VOCAB}"):
        learner.learn(prompt, [1, VOCAB])
    assert_same_state(before, learner_state(learner))


def test_schedule_steps_and_consolidates_on_call_counts():
    _, learner = patched(step_every=3, consolidate_every=2)
    prompt, response = rows(9, 2)
    reports = [learner.learn(prompt, response) for _ in range(6)]
    assert [r.stepped for r in reports] == [False, False, True, False, False, True]
    assert [r.consolidation is not None for r in reports] == [False] * 5 + [True]
    assert learner.counters.steps == 2 and learner.counters.consolidations == 1


def test_replay_buffer_is_bounded_and_replayed():
    _, learner = patched(replay=4, replay_per_step=2, passes=2)
    for prompt, response in zip(rows(10, 7), rows(11, 7)):
        learner.learn(prompt, response)
    stats = learner.stats()
    assert stats["replay_buffer"] == 4
    assert stats["steps"] == 14  # two passes per step
    assert stats["tokens_processed"]["replay"] > 0 and stats["tokens_processed"]["passes"] > 0


def record_replayed(monkeypatch, recipe) -> list:
    """The list that each step's replayed requests are appended to, as the recipe learns them."""
    replayed = []
    real = recipe.accumulate
    monkeypatch.setattr(recipe, "accumulate",
                        lambda items, component: (replayed.append(list(items)) if component == "replay" else None)
                        or real(items, component))
    return replayed


def test_replay_recent_replays_the_newest_requests_every_step(monkeypatch):
    """replay_recent=k adds the k newest buffered requests to every step, beside the random
    draws from the older ones."""
    _, learner = patched(replay=8, replay_per_step=1, replay_recent=2)
    replayed = record_replayed(monkeypatch, learner.recipe)
    requests = list(zip(rows(30, 6), rows(31, 6)))
    for prompt, response in requests:
        learner.learn(prompt, response)
    # The first step has an empty buffer; from the second on, the two newest requests (those of
    # the previous steps), then one older one once there is an older one.
    assert [len(r) for r in replayed] == [1, 2, 3, 3, 3]
    for i, batch in enumerate(replayed, start=1):
        newest = [item.response for item in batch[:min(i, 2)]]
        assert newest == [r for _, r in requests[max(0, i - 2):i]]


def test_replay_schedule_replays_each_request_at_its_offsets(monkeypatch):
    """replay_schedule=(1, 3): the request learned in step s comes back in steps s + 1 and s + 3
    and in no other, beside the random draws (none here), while the buffer holds it."""
    _, learner = patched(replay=8, replay_per_step=0, replay_schedule=[1, 3])
    assert learner.config.replay_schedule == (1, 3)
    replayed = record_replayed(monkeypatch, learner.recipe)
    requests = list(zip(rows(32, 7), rows(33, 7)))
    for prompt, response in requests:
        learner.learn(prompt, response)
    # Step 0 has an empty buffer and replays nothing (the replay call is skipped), so the record
    # starts at step 1.
    due = [[response for step_learned, (_, response) in enumerate(requests) if step - step_learned in (1, 3)]
           for step in range(1, len(requests))]
    assert [[item.response for item in batch] for batch in replayed] == due
    assert [len(batch) for batch in replayed] == [1, 1, 2, 2, 2, 2]
    # Random draws come on top of what is due, never the same request twice in a step.
    _, mixed = patched(replay=8, replay_per_step=2, replay_schedule=[1])
    replayed = record_replayed(monkeypatch, mixed.recipe)
    for prompt, response in requests:
        mixed.learn(prompt, response)
    for batch, (_, previous) in zip(replayed, requests):
        assert batch[0].response == previous and len({id(item) for item in batch}) == len(batch)
    for wrong, message in (([3, 1], "increasing positive integers"), ([0, 2], "increasing positive integers"),
                           ([4, 4], "increasing positive integers"), ([16], "beyond a replay buffer of 8")):
        with pytest.raises(ValueError, match=message):
            patched(replay=8, replay_schedule=wrong)


def record_component(monkeypatch, recipe, component) -> list:
    """The list each accumulate() call of `component` appends its requests to."""
    seen = []
    real = recipe.accumulate
    monkeypatch.setattr(recipe, "accumulate",
                        lambda items, name: (seen.append(list(items)) if name == component else None)
                        or real(items, name))
    return seen


def test_rehearse_learns_the_least_replayed_requests_first_and_steps_and_merges(monkeypatch):
    """rehearse(): each step takes the buffered requests replayed least (oldest first among
    equals), learns them again, steps and consolidates; by default one pass over the buffer."""
    _, learner = patched(replay=6, replay_per_step=1)
    requests = list(zip(rows(40, 6), rows(41, 6)))
    for prompt, response in requests:
        learner.learn(prompt, response)
    buffer = list(learner.recipe.replay)
    counts_before = [item.replays for item in buffer]
    assert sum(counts_before) == 5  # steps 1-5 drew one request each (step 0 had an empty buffer)
    rehearsed = record_component(monkeypatch, learner.recipe, "rehearse")
    steps, merges = learner.counters.steps, learner.counters.consolidations
    report = learner.rehearse()
    assert report.steps == 3 and report.requests == 6  # 6 buffered requests, 2 a step
    assert learner.counters.steps == steps + 3 and learner.counters.consolidations == merges + 3
    assert len(report.consolidations) == 3
    expected = sorted(range(6), key=lambda k: (counts_before[k], k))  # least replayed, then oldest
    position = {id(item): k for k, item in enumerate(buffer)}
    assert [position[id(item)] for batch in rehearsed for item in batch] == expected  # each request once
    assert [item.replays for item in buffer] == [c + 1 for c in counts_before]
    # steps beyond one pass start the next pass, again least replayed first.
    rehearsed.clear()
    learner.rehearse(steps=3, requests_per_step=4)
    counts = [c + 1 for c in counts_before]
    second = sorted(range(6), key=lambda k: (counts[k], k))
    third = sorted(range(6), key=lambda k: (counts[k] + 1, k))
    assert [[position[id(item)] for item in batch] for batch in rehearsed] == [second[:4], second[4:], third[:4]]


def test_rehearse_lowers_the_loss_on_buffered_requests_and_checks_its_arguments():
    model, learner = patched(replay=8, replay_per_step=1, lr=3e-2)
    requests = list(zip(rows(42, 4), rows(43, 4)))
    for prompt, response in requests:
        learner.learn(prompt, response)
    before = sum(response_loss(model, p, r) for p, r in requests)
    learner.rehearse(steps=4)
    assert sum(response_loss(model, p, r) for p, r in requests) < before
    for wrong in (0, -1, 1.5, True):
        with pytest.raises(fastcl.InputError, match="positive integer"):
            learner.rehearse(steps=wrong)
        with pytest.raises(fastcl.InputError, match="positive integer"):
            learner.rehearse(requests_per_step=wrong)
    _, empty = patched(replay=8)
    assert empty.rehearse().steps == 0  # nothing buffered: nothing to do
    _, waiting = patched(replay=8, step_every=0)
    waiting.learn(*requests[0])
    with pytest.raises(fastcl.FastclError, match="waiting for their step"):
        waiting.rehearse()


def test_inner_steps_close_the_context_gain_and_stop_when_it_is_closed():
    """Inner steps step on the request's own context gain only (no replay, no anchor) and stop
    once no response token is gain_threshold short of the teacher."""
    teacher, student, response = rows(15, 1)[0], rows(16, 1)[0], rows(17, 1)[0]
    # Every token short of the teacher by more than -1 nats: a gain that closing never ends.
    model, endless = patched(gain_threshold=-1.0, inner_steps=4, consolidate_every=0)
    endless.learn(teacher, response, student, teacher_logprobs=torch.zeros(len(response)))
    assert endless.counters.steps == 5  # the scheduled step, then all four inner steps
    assert endless.stats()["tokens_processed"]["inner"] > 0
    # A teacher the student already matches: nothing to learn, no step at all.
    _, closed = patched(inner_steps=4, consolidate_every=0)
    closed.learn(teacher, response, student, teacher_logprobs=torch.full((len(response),), -1e3))
    assert closed.counters.steps == 0 and "inner" not in closed.stats()["tokens_processed"]
    # A reachable target: the loop ends early, and more steps close more of the gap.
    def loss_after(inner_steps):
        model, learner = patched(inner_steps=inner_steps, consolidate_every=0, lr=3e-2)
        # The teacher 0.8 nats above the student on every token: closed 0.5 nats short of it.
        target = -response_losses(model, student, response) + 0.8
        learner.learn(teacher, response, student, teacher_logprobs=target)
        return response_loss(model, student, response), learner.counters.steps

    one, _ = loss_after(0)
    many, steps = loss_after(50)
    assert many < one
    assert 1 < steps < 51  # stopped once every token was within gain_threshold of the teacher


def test_a_layer_s_own_inner_steps_decide_which_inner_steps_move_it():
    """layer_options' inner_steps: the k-th inner step moves only the layers whose count is at
    least k; the others keep what the scheduled step gave them, bit for bit."""
    teacher, student, response = rows(15, 1)[0], rows(16, 1)[0], rows(17, 1)[0]

    def b_after(inner_steps, layer_options):
        model, learner = patched(gain_threshold=-1.0, inner_steps=inner_steps, layer_options=layer_options,
                                 consolidate_every=0)
        learner.learn(teacher, response, student, teacher_logprobs=torch.zeros(len(response)))
        return {name: m.B.detach().clone() for name, m in learner.modules.items()}, learner.counters.steps

    plain, steps = b_after(0, None)
    assert steps == 1
    mlp_two, steps = b_after(0, {r".*mlp.*": {"inner_steps": 2}})
    assert steps == 3  # the scheduled step, then two inner steps on the MLP layers alone
    assert any("mlp" in name for name in plain) and any("mlp" not in name for name in plain)
    for name in plain:
        if "mlp" in name:
            assert not torch.equal(mlp_two[name], plain[name]), name
        else:
            assert torch.equal(mlp_two[name], plain[name]), name


def test_inner_anchor_gives_every_inner_step_the_anchor_s_window():
    teacher, student, response = rows(15, 1)[0], rows(16, 1)[0], rows(17, 1)[0]

    def anchor_tokens(inner_anchor):
        _, learner = patched(tokenizer=CharTokenizer(), gate_tolerance=None, protect_directions=0,
                             gain_threshold=-1.0, inner_steps=2, inner_anchor=inner_anchor, consolidate_every=0)
        learner.learn(teacher, response, student, teacher_logprobs=torch.zeros(len(response)))
        assert learner.counters.steps == 3
        return learner.stats()["tokens_processed"]["anchor"]

    assert anchor_tokens(True) == 3 * anchor_tokens(False)  # the scheduled step's window, then one per inner step
    with pytest.raises(ValueError, match="inner_anchor must be True or False"):
        fastcl.LearnerConfig(inner_anchor=1)


def test_inner_headroom_skips_inner_steps_while_the_gate_is_on_alert():
    teacher, student, response = rows(15, 1)[0], rows(16, 1)[0], rows(17, 1)[0]
    _, learner = patched(gate_tolerance=None, gain_threshold=-1.0, inner_steps=2, inner_headroom=True, gate_every=1)
    drift = {"now": 0.0}
    learner.add_probe(lambda m: -drift["now"], tolerance=0.05, name="drift")
    steps = []
    for now in (0.0, 0.04, 0.04, 0.0, 0.0):  # what the probe reads at each request's merge
        drift["now"] = now
        before = learner.counters.steps
        learner.learn(teacher, response, student, teacher_logprobs=torch.zeros(len(response)))
        steps.append(learner.counters.steps - before)
    # 0.04 uses more than half the tolerance (0.025) and passes: the next request gets its
    # scheduled step alone, until a check finds headroom again.
    assert steps == [3, 3, 1, 1, 3]
    with pytest.raises(ValueError, match="inner_headroom must be True or False"):
        fastcl.LearnerConfig(inner_headroom="yes")


def test_anchor_kl_reads_the_drift_of_what_was_merged():
    teacher, student, response = rows(15, 1)[0], rows(16, 1)[0], rows(17, 1)[0]
    _, learner = patched(tokenizer=CharTokenizer(), gate_tolerance=None, protect_directions=0, gain_threshold=-1.0,
                         lr=0.05)
    assert learner.recipe.anchor_kl is None
    kls = []
    for _ in range(2):
        learner.learn(teacher, response, student, teacher_logprobs=torch.zeros(len(response)))
        kls.append(learner.recipe.anchor_kl)
    # The first step reads the reference itself; the second, after one merge, reads its drift.
    assert abs(kls[0]) < 1e-4 and kls[1] > 1e-3


def test_inner_kl_limit_skips_inner_steps_once_the_anchor_reads_drift():
    teacher, student, response = rows(15, 1)[0], rows(16, 1)[0], rows(17, 1)[0]

    def steps_per_request(limit):
        _, learner = patched(tokenizer=CharTokenizer(), gate_tolerance=None, protect_directions=0,
                             gain_threshold=-1.0, lr=0.05, inner_steps=2, inner_kl_limit=limit)
        steps = []
        for _ in range(3):
            before = learner.counters.steps
            learner.learn(teacher, response, student, teacher_logprobs=torch.zeros(len(response)))
            steps.append(learner.counters.steps - before)
        return steps

    # The first step reads the reference itself (KL ~0); after a merge the anchor reads drift.
    assert steps_per_request(1e-4) == [3, 1, 1]
    assert steps_per_request(None) == [3, 3, 3]
    assert steps_per_request(10.0) == [3, 3, 3]
    for bad, message in (({"inner_kl_limit": -0.1}, "inner_kl_limit must be a number"),
                         ({"inner_kl_limit": True}, "inner_kl_limit must be a number"),
                         ({"inner_kl_limit": 0.01, "anchor_weight": 0.0}, "needs anchor_weight > 0"),
                         ({"inner_kl_limit": 0.01, "sync_every": 4}, "asynchronous replicas")):
        with pytest.raises(ValueError, match=message):
            fastcl.LearnerConfig(**bad)
    with pytest.raises(fastcl.PatchError, match="inner_kl_limit need the tokenizer"):
        patched(inner_kl_limit=0.01)


def anchor_of(chat: bool, **kw):
    """An anchor on 60 tokens of random 'prose' (three windows of 20); with `chat`, also on the
    reference's replies to three prompts."""
    from fastcl.guard import Anchor

    return Anchor(rows(12, 1, low=60, high=61)[0], window=20, top_k=8,
                  chat_prompts=rows(20, 3, 5, 9) if chat else (), reply_tokens=6, **kw)


@pytest.mark.parametrize("chat", [False, True])
def test_anchor_pulls_general_behaviour_back_to_the_reference(chat):
    """Train hard on one response, then step on the anchor alone: the anchor KL falls."""
    model, learner = patched(lr=3e-2, eps=1e-8, consolidate_every=0)
    anchor = anchor_of(chat)
    anchor.prepare(learner)
    prompt, response = rows(13, 2)
    for _ in range(5):
        learner.learn(prompt, response)
    # Merged, as the recipe does, so the anchor's steps start from a fresh optimizer: Adam's
    # momentum from the learning steps would carry the drift on for a few steps first.
    learner.consolidate(gate=False)
    drifted = [anchor.accumulate(learner, scale=0.0)[0] for _ in range(len(anchor))]
    learner._clear_accumulators()
    assert sum(drifted) > 0
    for _ in range(15):
        for _ in range(len(anchor)):
            anchor.accumulate(learner, scale=1.0)
        learner.counters.tokens_pending = 1  # the anchor's gradient is already a mean
        learner.step()
    held = [anchor.accumulate(learner, scale=0.0)[0] for _ in range(len(anchor))]
    learner._clear_accumulators()
    assert sum(held) < 0.5 * sum(drifted)


@pytest.mark.parametrize("chat", [False, True])
def test_anchor_has_no_gradient_at_its_reference(chat):
    """Before anything is learned the model is the reference: the anchor's loss is at its
    minimum, so it must leave the fast weights' gradient at zero (a top-k cross-entropy without
    the tail's bucket pushes the tail's mass into the top k and fails this)."""
    model, learner = patched(consolidate_every=0)
    anchor = anchor_of(chat)
    kl = sum(anchor.accumulate(learner, scale=1.0)[0] for _ in range(len(anchor)))
    gradient = max(float(m.grad_B.abs().max()) for m in learner.modules.values())
    assert abs(kl) < 1e-5
    assert gradient < 1e-6, f"the anchor moves the fast weights at its own reference (max |grad B| {gradient:.2e})"


def test_chat_anchor_holds_the_reference_replies_to_its_prompts():
    """Each chat prompt is followed by the reference's greedy reply (its stop token included);
    the targets cover the reply's tokens alone. A step takes a reply window beside its prose
    window, so the prose term is unchanged; the shorter list cycles."""
    from fastcl.evaluate import greedy_continuations
    from fastcl.guard import Anchor

    model, learner = patched(consolidate_every=0)
    anchor = anchor_of(chat=True)
    assert anchor.prompt_of == [None, None, None, 0, 1, 2] and anchor.steps == [[0, 3], [1, 4], [2, 5]]
    assert len(anchor) == 3
    prompts = rows(20, 3, 5, 9)
    with torch.no_grad():
        replies = [greedy_continuations(model, [p], 6, None, keep_stop=True)[0] for p in prompts]
    anchor.prepare(learner)
    for j in range(3):
        assert anchor.windows[3 + j] == prompts[j] + replies[j]
        assert anchor.targets[3 + j][0].shape == (len(replies[j]), 8)
    anchor._next = 1
    assert anchor.accumulate(learner, scale=0.0)[1] == 20 + len(replies[1])  # prose window 1 and reply 1
    more_replies = Anchor(list(range(3, 43)), window=20, chat_prompts=rows(21, 3, 5, 9), reply_tokens=6)
    assert more_replies.steps == [[0, 2], [1, 3], [0, 4]]
    with pytest.raises(ValueError, match="reply_tokens must be >= 1"):
        Anchor([1, 2, 3], chat_prompts=[[4]], reply_tokens=0)
    with pytest.raises(ValueError, match="anchor_prompts must name a shipped prompts file"):
        patched(anchor_prompts=None)
    with pytest.raises(ValueError, match="anchor_reply_tokens must be an integer >= 1"):
        patched(anchor_reply_tokens=0)
    from test_protection import CharTokenizer

    model = tiny_model("llama")
    with pytest.raises(fastcl.PatchError, match="anchor_prompts: 'nowhere.txt' is neither a text shipped"):
        fastcl.patch(model, tokenizer=CharTokenizer(), anchor_prompts="nowhere.txt")
    assert not hasattr(model, "fastcl") and not any(isinstance(m, fastcl.FastLinear) for m in model.modules())
    with pytest.raises(fastcl.PatchError, match="anchor_prompts need the tokenizer"):
        fastcl.patch(model, anchor_prompts="anchor_questions.txt")


@pytest.mark.parametrize("name", [guard.ANCHOR_QUESTIONS, guard.ANCHOR_PROMPTS])
def test_anchor_prompt_files_ask_none_of_the_probe_questions(name):
    """The anchor trains on its prompts' replies: a probe asked there would be scored on what the
    anchor held, not on what the model kept."""
    from fastcl.evaluate import load_probes
    from fastcl.guard import read_text

    asked = [line.strip().lower() for line in read_text(name).splitlines() if line.strip()]
    probes = {question.lower() for question, _, _ in load_probes()}
    assert len(asked) >= 32 and len(set(asked)) == len(asked)
    assert not probes & set(asked)


def test_patch_builds_the_reply_anchor_from_a_shipped_prompts_file(smollm):
    """anchor_prompts names the file; every line becomes a chat-formatted prompt whose reply the
    anchor holds, with anchor_reply_tokens as the reply's limit."""
    from fastcl.evaluate import chat_ids
    from fastcl.guard import Anchor, read_text

    _, tokenizer = smollm
    lines = [line for line in read_text("anchor_questions.txt").splitlines() if line.strip()]
    anchor = Anchor.from_tokenizer(tokenizer, "anchor_questions.txt", reply_tokens=24)
    assert anchor.chat_prompts == [chat_ids(tokenizer, line) for line in lines] and anchor.reply_tokens == 24
    assert len(anchor) == max(len(anchor.windows) - len(lines), len(lines))
    assert Anchor.from_tokenizer(tokenizer).chat_prompts == []


def test_bucketed_cross_entropy_is_the_kl_of_the_coarsened_distributions():
    """Against float64 by hand: top-k tokens kept apart, the rest summed into one bucket; the
    gradient vanishes where the model's distribution is the target's."""
    from fastcl.guard import bucketed_cross_entropy, tail_mass, xlogx

    torch.manual_seed(0)
    vocab, k = 37, 5
    target_logits, logits = torch.randn(3, vocab, dtype=torch.float64) * 2, torch.randn(3, vocab, dtype=torch.float64)
    p = target_logits.softmax(-1)
    top = p.topk(k, -1)
    q = logits.softmax(-1)
    q_top = q.gather(-1, top.indices)
    p_tail, q_tail = 1 - top.values.sum(-1), 1 - q_top.sum(-1)
    kl = (top.values * (top.values / q_top).log()).sum(-1) + p_tail * (p_tail / q_tail).log()
    entropy = -xlogx(top.values).sum(-1) - xlogx(tail_mass(top.values))
    torch.testing.assert_close(bucketed_cross_entropy(logits, top.indices, top.values) - entropy, kl)
    at_target = target_logits.clone().requires_grad_()
    bucketed_cross_entropy(at_target, top.indices, top.values).sum().backward()
    assert float(at_target.grad.abs().max()) < 1e-12
    whole = p.topk(vocab, -1)  # every token kept apart: the plain cross-entropy, finite
    torch.testing.assert_close(bucketed_cross_entropy(logits, whole.indices, whole.values),
                               -(p * logits.log_softmax(-1)).sum(-1))


def test_gate_refuses_a_planted_bad_update_and_changes_nothing():
    model, learner = patched(consolidate_every=0, gate_every=1)  # every merge checked (gate_every: below)
    probe_ids = torch.tensor([rows(14, 1, low=30, high=31)[0]])

    with torch.no_grad():
        reference = model(probe_ids).logits

    def closeness(m):  # a user probe: how close outputs stay to the reference (higher is better)
        with torch.no_grad():
            return -float((m(probe_ids).logits - reference).abs().mean())

    learner.add_probe(closeness, tolerance=0.05, name="probe")
    prompt, response = rows(15, 2)
    learner.learn(prompt, response)  # a small, harmless update
    good = learner.consolidate()
    assert good.committed and good.gate.passed
    weights = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    with torch.no_grad():  # plant a bad update
        for module in learner.modules.values():
            module.B.normal_(0, 5.0)
            module.b_is_zero = False
    bad = learner.consolidate()
    assert not bad.committed and not bad.gate.passed
    assert bad.gate.scores["probe"]["drop"] > 0.05
    assert "REFUSED" in str(bad.gate)
    assert all(torch.equal(m.weight, weights[n]) for n, m in learner.modules.items())
    assert all(not m.B.any() and m.b_is_zero for m in learner.modules.values())
    assert learner.counters.gate_refusals == 1


@pytest.mark.parametrize("backoff", [1, 2])
def test_gate_backoff_merges_a_halved_update_or_refuses_and_rollback_restores_it(backoff):
    from fastcl.consolidation import merged_weight

    model, learner = patched(consolidate_every=0, gate_backoff=backoff, gate_every=1)

    def largest_fast_weight(m):  # a probe the halvings move predictably: -max |B| of the live layers
        live = [mod.B.detach().abs().max() for mod in learner.modules.values() if mod.enabled]
        return -float(max(live)) if live else 0.0

    learner.add_probe(largest_fast_weight, tolerance=1.0, name="size")
    with torch.no_grad():
        for module in learner.modules.values():
            module.B.uniform_(-3.0, 3.0)
            module.B[0, 0] = 3.0  # max |B| = 3: passes at 3/4, after two halvings
            module.b_is_zero = False
    planted = {n: m.B.detach().clone() for n, m in learner.modules.items()}
    weights = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    expected = {}
    for n, m in learner.modules.items():
        with torch.no_grad():
            m.B.mul_(0.25)
            expected[n] = merged_weight(m)
            m.B.copy_(planted[n])
    report = learner.consolidate()
    if backoff == 1:  # 3 -> 1.5 still drops more than 1.0: refused, nothing merged
        assert not report.committed and learner.counters.gate_refusals == 1
        assert all(torch.equal(m.weight, weights[n]) for n, m in learner.modules.items())
        return
    assert report.committed and report.halvings == 2 and "1/4 strength" in str(report)
    assert learner.counters.gate_halved == 1 and learner.counters.gate_refusals == 0
    for n, m in learner.modules.items():
        assert torch.equal(m.weight, expected[n]), f"{n}: merged a quarter of the update"
    learner.rollback()
    for n, m in learner.modules.items():
        assert torch.equal(m.weight, weights[n]) and torch.equal(m.B, planted[n]), f"{n}: rollback is exact"


def repairable(gate_repair):
    """A learner whose gate refuses an update of three learn() calls at a high learning rate
    (a user probe: KL to the start model on a random row), and an anchor on another random
    text for gate_repair (set by hand: patch() wants a tokenizer for the shipped text)."""
    from fastcl.guard import Anchor

    model, learner = patched(consolidate_every=0, gate_every=1, gate_backoff=0, lr=3e-2, eps=1e-8)
    learner.config.gate_repair = gate_repair
    learner.recipe.anchor = Anchor(rows(12, 1, low=60, high=61)[0], window=20, top_k=8)
    probe_ids = torch.tensor([rows(14, 1, low=30, high=31)[0]])
    with torch.no_grad():
        reference = model(probe_ids).logits.log_softmax(-1)

    def closeness(m):
        with torch.no_grad():
            current = m(probe_ids).logits.log_softmax(-1)
            return -float((reference.exp() * (reference - current)).sum(-1).mean())

    learner.add_probe(closeness, tolerance=0.01, name="kl")
    prompt, response = rows(13, 2)
    before = response_loss(model, prompt, response)
    for _ in range(3):
        learner.learn(prompt, response)
    return model, learner, (prompt, response), before


def test_gate_repair_takes_drift_out_and_keeps_what_was_learned():
    unrepaired_model, unrepaired, (prompt, response), _ = repairable(0)
    taught = response_loss(unrepaired_model, prompt, response)  # the live, unmerged update
    refused = unrepaired.consolidate()
    assert not refused.committed and refused.gate.scores["kl"]["drop"] > 0.01

    model, learner, _, before = repairable(3)
    weights = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    fast = {n: m.B.detach().clone() for n, m in learner.modules.items()}
    report = learner.consolidate()
    assert report.committed and report.gate.passed and 1 <= report.repairs <= 3
    assert report.gate.scores["kl"]["drop"] <= 0.01
    assert "repair step" in str(report) and learner.counters.gate_repaired == 1
    assert learner.stats()["tokens_processed"]["repair"] > 0 and learner.stats()["seconds"]["repair"] > 0
    # What the three calls taught is mostly kept: the loss fell by at least half as much.
    learned = response_loss(model, prompt, response)
    assert learned < before - 0.5 * (before - taught)
    learner.rollback()  # exact: the weights, and B as it was before the repair steps
    for n, m in learner.modules.items():
        assert torch.equal(m.weight, weights[n]) and torch.equal(m.B, fast[n]), n


def test_gate_repair_needs_the_tokenizer_and_a_count():
    with pytest.raises(fastcl.PatchError, match="gate_repair need the tokenizer"):
        patched(gate_repair=1)
    with pytest.raises(ValueError, match="gate_repair must be an integer >= 0"):
        patched(gate_repair=-1)


def plant(learner, std):
    with torch.no_grad():
        for module in learner.modules.values():
            module.B.normal_(0, std)
            module.b_is_zero = False


def test_gate_every_checks_every_nth_merge_and_a_refusal_undoes_the_unchecked_ones():
    """gate_every=3: merges 1 and 2 are committed unchecked; the third is checked. A harmful
    update hidden in merge 2 makes the check of merge 3 fail, and all three are undone,
    bit-exactly; the next window starts clean."""
    model, learner = patched(consolidate_every=0, gate_every=3, gate_backoff=0)
    probe_ids = torch.tensor([rows(14, 1, low=30, high=31)[0]])
    with torch.no_grad():
        reference = model(probe_ids).logits
    calls = []

    def closeness(m):
        calls.append(1)
        with torch.no_grad():
            return -float((m(probe_ids).logits - reference).abs().mean())

    learner.add_probe(closeness, tolerance=0.05, name="probe")
    before = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    plant(learner, 1e-3)
    first = learner.consolidate()
    assert first.committed and first.gate is None  # unchecked
    assert len(calls) == 1  # but the baseline is taken now, on the weights before any merge
    assert learner.stats()["bytes_held"]["gate_window"] == sum(w.numel() * 4 for w in before.values())
    plant(learner, 5.0)  # the harmful one, also unchecked
    assert learner.consolidate().gate is None and len(calls) == 1
    assert learner.counters.gate_skipped == 2
    plant(learner, 1e-3)
    third = learner.consolidate()
    assert len(calls) == 2  # the check
    assert not third.committed and not third.gate.passed and third.undone == 2
    assert "2 unchecked merges before it undone" in str(third)
    assert all(torch.equal(m.weight, before[n]) for n, m in learner.modules.items())
    assert all(not m.B.any() and m.b_is_zero for m in learner.modules.values())
    assert learner.counters.gate_undone == 2 and learner.counters.gate_refusals == 1
    with pytest.raises(fastcl.ConsolidationError, match="nothing to roll back"):
        learner.rollback()  # the last merge was undone with the window
    # After a refusal the next merge is checked; with the drift far from the limit again the
    # schedule goes back to every third: two unchecked merges, then a check that accepts them.
    reports = []
    for _ in range(4):
        plant(learner, 1e-3)
        reports.append(learner.consolidate())
    assert [r.gate is not None for r in reports] == [True, False, False, True]
    assert all(r.committed for r in reports) and reports[-1].gate.passed
    assert learner.counters.gate_skipped == 4 and len(calls) == 4 and learner._gate_window.merges == 0


def test_gate_every_checks_every_merge_while_drift_is_near_the_tolerance():
    model, learner = patched(consolidate_every=0, gate_every=3)
    drift = {"now": 0.0}
    learner.add_probe(lambda m: -drift["now"], tolerance=0.05, name="drift")
    checked = []
    for now in (0.0, 0.0, 0.0, 0.03, 0.03, 0.01, 0.01, 0.01, 0.01):
        drift["now"] = now  # what the probe reads at this merge
        plant(learner, 1e-3)
        checked.append(learner.consolidate().gate is not None)
    # Every third merge is checked: 3 reads 0, 6 reads 0.01, both under half the tolerance
    # (0.025), so the schedule stays; 4 and 5 drift to 0.03 unseen, as gate_every allows.
    assert checked == [False, False, True, False, False, True, False, False, True]
    drift["now"] = 0.04  # a check near the limit (0.04 > 0.025): every merge is checked after it
    for _ in range(3):
        plant(learner, 1e-3)
        checked.append(learner.consolidate().gate is not None)
    assert checked[-3:] == [False, False, True]
    plant(learner, 1e-3)
    assert learner.consolidate().gate is not None  # right after the near-limit check
    drift["now"] = 0.0
    plant(learner, 1e-3)
    assert learner.consolidate().gate is not None  # checked: the last check was near the limit; this one is not
    plant(learner, 1e-3)
    assert learner.consolidate().gate is None  # headroom again: back to every third


def test_gate_every_rollback_steps_the_window_back():
    """rollback() of an unchecked merge shortens the window: a later refusal undoes only the
    merges still in it, and the weights come back to those before the window."""
    model, learner = patched(consolidate_every=0, gate_every=3, gate_backoff=0)
    probe_ids = torch.tensor([rows(14, 1, low=30, high=31)[0]])
    with torch.no_grad():
        reference = model(probe_ids).logits
    learner.add_probe(lambda m: -float((m(probe_ids).logits - reference).abs().mean()), tolerance=0.05, name="probe")
    before = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    for _ in range(2):
        plant(learner, 1e-3)
        learner.consolidate()
    learner.consolidate()  # nothing live: nothing merged, and the open window stays open
    assert learner._gate_window.merges == 2
    learner.rollback()
    assert learner._gate_window.merges == 1
    plant(learner, 5.0)
    assert learner.consolidate().gate is None  # the window's second merge: unchecked
    plant(learner, 1e-3)
    refused = learner.consolidate()
    assert not refused.committed and refused.undone == 2
    assert all(torch.equal(m.weight, before[n]) for n, m in learner.modules.items())


def test_gate_every_must_be_positive():
    with pytest.raises(ValueError, match="gate_every must be an integer >= 1"):
        patched(gate_every=0)


def test_fast_weights_bypassed_restores_base_behaviour():
    model, learner = patched(consolidate_every=0)
    ids = torch.tensor([rows(16, 1)[0]])
    with torch.no_grad():
        base = model(ids).logits
    learner.learn(ids[0].tolist()[:3], ids[0].tolist()[3:])
    with torch.no_grad():
        with learner.fast_weights_bypassed():
            assert torch.equal(model(ids).logits, base)
        assert not torch.equal(model(ids).logits, base)


def test_recipe_options_are_validated_before_patching():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="objective"):
        fastcl.patch(model, objective="magic")
    with pytest.raises(ValueError, match="replay_per_step=2 needs a replay buffer.*replay_per_step=0 for no replay"):
        fastcl.patch(model, replay=0, replay_per_step=2)
    with pytest.raises(ValueError, match="replay_recent=1 needs a replay buffer"):
        fastcl.patch(model, replay=0, replay_per_step=0, replay_recent=1)
    with pytest.raises(ValueError, match="replay_recent must be an integer >= 0"):
        fastcl.patch(model, replay_recent=-1)
    with pytest.raises(fastcl.PatchError, match="tokenizer"):
        fastcl.patch(model, anchor_weight=0.5)
    assert not hasattr(model, "fastcl")


def test_anchor_window_sets_the_general_text_the_anchor_takes_a_step():
    from test_protection import CharTokenizer

    def anchor_of(**kw):
        return patched(tokenizer=CharTokenizer(), gate_tolerance=None, protect_directions=0, **kw)[1].recipe.anchor

    usual, short = anchor_of(), anchor_of(anchor_window=16)
    assert {len(w) for w in usual.windows[:-1]} == {65} and {len(w) for w in short.windows[:-1]} == {17}
    assert sum(len(w) - 1 for w in usual.windows) == sum(len(w) - 1 for w in short.windows), "the same text, cut finer"
    with pytest.raises(ValueError, match="anchor_window must be an integer >= 1"):
        patched(anchor_window=0)


def test_gate_text_sets_the_text_the_built_in_gate_probe_scores(tmp_path):
    from test_protection import CharTokenizer

    from fastcl.evaluate import mean_log_likelihood
    from fastcl.guard import read_text

    own = tmp_path / "kept.txt"
    own.write_text("The model must keep this kind of text. " * 20, encoding="utf-8")
    for text, expected in (("gate_text.txt", read_text("gate_text.txt")), (str(own), own.read_text())):
        model, learner = patched(tokenizer=CharTokenizer(), gate_text=text, anchor_weight=0.0, protect_directions=0)
        (probe,) = learner.recipe.gate.probes
        ids = CharTokenizer()(expected)["input_ids"]
        assert probe.score(model) == pytest.approx(mean_log_likelihood(model, ids, 256))
    assert read_text("gate_text.txt") != own.read_text()

    model = tiny_model("llama")
    with pytest.raises(fastcl.PatchError, match="'nowhere.txt' is neither a text shipped with fastcl "
                                                "\\(anchor_prompts.txt, anchor_questions.txt, anchor_text.txt, "
                                                "gate_answers.txt, gate_text.txt, general_text.txt\\) nor a file"):
        fastcl.patch(model, tokenizer=CharTokenizer(), gate_text="nowhere.txt")
    assert not hasattr(model, "fastcl") and not any(isinstance(m, fastcl.FastLinear) for m in model.modules())
    with pytest.raises(fastcl.PatchError, match="gate_text need the tokenizer"):
        fastcl.patch(tiny_model("llama"), gate_text=str(own))
    with pytest.raises(ValueError, match="gate_text must name a shipped text"):
        patched(gate_text=" ")


class ChatCharTokenizer(CharTokenizer):
    """CharTokenizer with a chat template: enough for the answer probe's framed questions."""

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self(f"<u>{messages[0]['content']}<a>")["input_ids"]


def test_gate_answers_ask_none_of_the_probe_or_anchor_questions():
    """The answer probe is a gate, never a score: none of its questions is a benchmark probe or
    an anchor question (the anchor would train on it)."""
    from fastcl.evaluate import load_probes
    from fastcl.guard import read_answers, read_text

    rows = read_answers(guard.GATE_ANSWERS)
    asked = [question.lower() for question, _ in rows]
    assert len(asked) >= 40 and len(set(asked)) == len(asked)
    assert all(len(options) == 4 and len(set(options)) == 4 for _, options in rows)
    assert not {question.lower() for question, _, _ in load_probes()} & set(asked)
    anchored = {line.strip().lower() for name in (guard.ANCHOR_QUESTIONS, guard.ANCHOR_PROMPTS)
                for line in read_text(name).splitlines()}
    assert not anchored & set(asked)


def test_answer_gate_probe_scores_the_answers_and_refuses_a_merge_that_makes_them_unlikely(tmp_path):
    from fastcl.evaluate import ANSWER_FRAME, chat_ids, multiple_choice_scores
    from fastcl.guard import read_answers

    tokenizer = ChatCharTokenizer()
    own = tmp_path / "answers.txt"
    own.write_text("Which is first?\tAlpha\tBeta\n\nWhat comes last?\tOmega here\tPsi\tChi\n", encoding="utf-8")
    model, learner = patched(tokenizer=tokenizer, gate_answers=str(own), gate_answer_tolerance=0.01,
                             gate_tolerance=None, anchor_weight=0.0, protect_directions=0, consolidate_every=0,
                             gate_every=1, gate_backoff=0)
    (probe,) = learner.recipe.gate.probes
    asked = read_answers(str(own))
    assert asked == [("Which is first?", ("Alpha", "Beta")), ("What comes last?", ("Omega here", "Psi", "Chi"))]
    scores = multiple_choice_scores(model, tokenizer, [(q, options, 0) for q, options in asked], frame=ANSWER_FRAME)
    shares = [torch.tensor(row, dtype=torch.float64).softmax(0)[0] for row in scores]
    assert probe.score(model) == pytest.approx(float(sum(shares) / 2))
    learner.learn(*rows(15, 2))  # a small update: it passes
    learner.step()
    assert learner.consolidate().committed
    weights = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    frame = tokenizer(ANSWER_FRAME)["input_ids"]
    for _ in range(5):  # learn a wrong option as each question's answer: the right ones' share falls
        for question, options in asked:
            learner.learn(chat_ids(tokenizer, question) + frame, tokenizer(" " + options[1])["input_ids"])
        learner.step()
    report = learner.consolidate()
    assert not report.committed and report.gate.scores["general_answers_choice"]["drop"] > 0.01
    assert all(torch.equal(m.weight, weights[n]) for n, m in learner.modules.items())


def test_the_benchmark_records_each_checked_merge():
    from fastcl.benchmark import Served

    _, learner = patched(consolidate_every=0, gate_every=2)
    learner.add_probe(lambda m: 0.0, tolerance=1.0, name="constant")
    served = Served(requests=3)
    for _ in range(2):  # the first merge is committed unchecked, the second checked
        learner.learn(*rows(15, 2))
        served.record_gate(learner.consolidate())
    served.record_gate(None)
    assert served.gate_checks == [{"request": 3, "committed": True, "constant": 0.0}]


def test_gate_answers_are_read_at_patch_and_need_the_tokenizer(tmp_path):
    bad = tmp_path / "answers.txt"
    bad.write_text("Which is first?\tAlpha\tBeta\nWhat comes last?\tOmega\n", encoding="utf-8")
    model = tiny_model("llama")
    with pytest.raises(fastcl.PatchError, match="gate_answers: .* line 2: expected a question, its answer and at "
                                                "least one wrong option, tab-separated; got 'What comes last\\?"):
        fastcl.patch(model, tokenizer=ChatCharTokenizer(), gate_answers=str(bad), gate_answer_tolerance=0.1)
    assert not hasattr(model, "fastcl") and not any(isinstance(m, fastcl.FastLinear) for m in model.modules())
    with pytest.raises(fastcl.PatchError, match="gate_answer_tolerance, gate_answers need the tokenizer"):
        fastcl.patch(model, gate_answer_tolerance=0.1, gate_answers="gate_answers.txt")
    with pytest.raises(ValueError, match="gate_answer_tolerance must be >= 0 or None"):
        patched(gate_answer_tolerance=-1.0)
    with pytest.raises(fastcl.PatchError, match="gate_answers ask questions in the chat format: the tokenizer needs "
                                                "apply_chat_template"):
        fastcl.patch(model, tokenizer=CharTokenizer(), gate_answer_tolerance=0.1)
    assert not hasattr(model, "fastcl") and not any(isinstance(m, fastcl.FastLinear) for m in model.modules())
    _, learner = patched(tokenizer=ChatCharTokenizer(), gate_answers=str(bad))  # off: the file is not read
    assert [p.name for p in learner.recipe.gate.probes] == ["general_text_loglik"]


def test_a_learner_that_cannot_be_built_leaves_the_model_as_it_was(monkeypatch):
    """patch() is all or nothing even where the recipe fails to build after the layers are in."""
    import fastcl.learner

    model = tiny_model("llama")
    before = {name: type(module) for name, module in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    def broken(*args, **kwargs):
        raise RuntimeError("the recipe could not be built")

    monkeypatch.setattr(fastcl.learner, "Recipe", broken)
    with pytest.raises(RuntimeError, match="the recipe could not be built"):
        fastcl.patch(model, rank=4)
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not hasattr(model, "fastcl")
    monkeypatch.undo()
    assert fastcl.patch(model, rank=4).modules  # and it patches again


def test_without_a_tokenizer_the_text_guards_are_off_and_reported():
    model, learner = patched()
    assert learner.config.anchor_weight == 0 and learner.config.gate_tolerance is None
    assert learner.recipe.anchor is None and not learner.recipe.gate.probes
    assert any("no tokenizer" in note for note in learner.report.notes)


def record_self_study(learner) -> list:
    """Wrap the recipe's sampler so a test sees the self-generated requests it made."""
    made, sample = [], learner.recipe.self_study

    def recorded(items):
        extra = sample(items)
        made.extend(extra)
        return extra

    learner.recipe.self_study = recorded
    return made


def test_self_study_samples_more_answers_with_the_context_and_learns_them():
    teacher, student, response = rows(30, 1)[0], rows(31, 1)[0], rows(32, 1)[0]
    model, learner = patched(step_every=0, gain_threshold=-float("inf"), self_study=3, self_study_tokens=6)
    made = record_self_study(learner)
    report = learner.learn(teacher, response, student)
    assert len(made) == 3
    for item in made:
        assert item.teacher == teacher and item.student == student and 1 <= len(item.response) <= 6
        # The teacher's own log-probabilities (untempered), as a forward over the served prompt scores them.
        torch.testing.assert_close(-item.teacher_logprobs, response_losses(model, teacher, item.response),
                                   rtol=1e-4, atol=1e-4)
    assert len({tuple(i.response) for i in made}) > 1  # sampled, not three greedy copies
    # With every token above the threshold, all samples were learned beside the served answer.
    assert report.tokens_learned == len(response)
    assert learner.counters.tokens_pending == len(response) + sum(len(i.response) for i in made)
    assert {"self_study", "self_study_generate"} <= set(learner.stats()["seconds"])


def test_self_study_is_seeded_per_request_and_skips_requests_without_a_student():
    teacher, student, response = rows(33, 1)[0], rows(34, 1)[0], rows(35, 1)[0]
    runs = []
    for _ in range(2):
        _, learner = patched(step_every=0, self_study=2, self_study_tokens=6)
        made = record_self_study(learner)
        learner.learn(teacher, response)  # no student prompt: nothing to study
        assert made == []
        learner.learn([teacher, teacher], [response, response], [student, student])
        runs.append([i.response for i in made])
    assert runs[0] == runs[1]  # the same learner seed and stream: the same samples
    assert runs[0][:2] != runs[0][2:]  # the second request of the batch draws its own


def test_sampled_answers_end_after_their_first_end_of_sequence_token():
    from fastcl.self_study import sample_answers

    model = tiny_model("llama")
    prompt = rows(36, 1)[0]
    model.generation_config.eos_token_id = None
    free = sample_answers(model, prompt, 2, 1.0, 8, seed=5)
    first = free[0][0]
    assert [len(r) for r, _ in free] == [8, 8]
    stop = first[3]
    model.generation_config.eos_token_id = stop
    cut = sample_answers(model, prompt, 2, 1.0, 8, seed=5)
    assert cut[0][0] == first[: first.index(stop) + 1]
    assert len(cut[0][1]) == len(cut[0][0])


def test_self_study_options_are_validated():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="self_study learns its samples by context gain"):
        fastcl.patch(model, self_study=2, objective="next_token")
    with pytest.raises(ValueError, match="self_study_temperature must be positive"):
        fastcl.patch(model, self_study=2, self_study_temperature=0)
    with pytest.raises(ValueError, match="self_study_tokens must be an integer >= 1"):
        fastcl.patch(model, self_study=2, self_study_tokens=0)
    assert not hasattr(model, "fastcl")


def test_grounded_learns_only_response_tokens_found_in_the_removed_context():
    """The context is the served prompt minus what it shares with the student prompt at both
    ends (the chat template's start, the question and the template's end)."""
    head, question, tail = [1, 2], [3, 4], [5]
    context = [10, 11, 12]
    teacher, student = head + context + question + tail, head + question + tail
    response = [11, 3, 12, 20, 1, 10]  # 11, 12, 10 occur in the context; 3 and 1 only in the shared parts
    assert fastcl.LearnerConfig().grounded is None
    for setting in (None, True):  # None, the default: on with objective="context_gain"
        _, learner = patched(step_every=0, gain_threshold=-float("inf"), grounded=setting)
        assert learner.config.learns_grounded
        assert learner.learn(teacher, response, student).tokens_learned == 3
    _, everything = patched(step_every=0, gain_threshold=-float("inf"), grounded=False)
    assert everything.learn(teacher, response, student).tokens_learned == len(response)
    from fastcl.recipe import Interaction, in_context
    item = Interaction(teacher, student, response, 1.0)
    assert in_context(item).tolist() == [True, False, True, False, False, True]
    assert in_context(item) is item.found_in_context  # kept for replay
    with pytest.raises(ValueError, match="grounded filters the tokens context gain learns"):
        patched(grounded=True, objective="next_token")
    _, distilled = patched(objective="distill")  # the default does not apply there, and is no error
    assert not distilled.config.learns_grounded
    for wrong in ("yes", 1):  # 1 would otherwise read as True in one place and as off in another
        with pytest.raises(ValueError, match="grounded must be None"):
            patched(grounded=wrong)


def test_the_default_recipe_moves_what_the_answer_copied_from_its_context_into_the_weights():
    """grounded as shipped (None): an answer copied from the context is learned after the
    context-free prompt; a word the context never held, in the same answer, is not."""
    head, question, tail = [1, 2], [3, 4], [5]
    context = [10, 11, 12, 13, 14]
    teacher, student = head + context + question + tail, head + question + tail
    copied, invented = [12, 13, 14], 30
    response = copied + [invented]
    model, learner = patched(grounded=None, gain_threshold=-float("inf"))
    before = response_losses(model, student, response)
    for _ in range(10):
        learner.learn(teacher, response, student)
    after = response_losses(model, student, response)
    assert learner.counters.consolidations == 10
    assert float(after[:3].mean()) < float(before[:3].mean()) - 0.5
    # The invented word's loss moves only through what the copied ones share with it, far less.
    assert float(before[3] - after[3]) < 0.5 * float((before[:3] - after[:3]).mean())


def test_contrast_margin_loss_is_the_hinge_over_other_requests_tokens():
    """Checked against a loop over the pairs, value and gradient (float64 gradcheck): the answer
    itself, a request's own tokens and ids already `margin` below the answer cost nothing; every
    other pair pushes its id down and the answer up."""
    from fastcl.loss import Contrast, contrast_margin_loss
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(48), dtype=torch.float64)
    targets = torch.tensor([3, 7, 7, 1, 9])
    positions = torch.tensor([True, False, True, True, True])
    pool = torch.tensor([1, 3, 7, 20])
    excluded = torch.zeros(5, 4, dtype=torch.bool)
    excluded[3, 3] = True  # position 3's request has id 20 in its own response
    weight = torch.tensor([1.0, 1.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    contrast = Contrast(pool, excluded, positions, 1.5)

    def ours(z):
        return contrast_margin_loss(z.log_softmax(-1), targets, positions, contrast, weight)

    logq = logits.log_softmax(-1)
    expected, active = 0.0, 0
    for r in positions.nonzero().flatten().tolist():
        for n, token in enumerate(pool.tolist()):
            if token != targets[r] and not excluded[r, n]:
                term = float(logq[r, token] - logq[r, targets[r]]) + contrast.margin
                expected += float(weight[r]) * max(0.0, term)
                active += term > 0
    z = logits.clone().requires_grad_(True)
    loss = ours(z)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert 0 < active < 12  # some pairs inside the margin, some outside: both cases are exercised
    loss.backward()
    assert z.grad[1].abs().max() == 0  # not a chosen position
    assert torch.autograd.gradcheck(ours, (logits.clone().requires_grad_(True),))


def test_contrast_margin_pushes_another_requests_taught_token_below_the_answer():
    """With no gain left to learn, a replayed request still gets a gradient from a buffered
    request's taught tokens, and the step moves them away from its answer; without the option,
    or with nothing taught by the buffered request, or its tokens below contrast_min_gain, the same
    replay learns nothing."""
    teacher_a, student_a, response_a, teacher_b, student_b = rows(49, 5, low=4, high=6)
    response_b = rows(50, 1, low=4, high=5)[0]
    intruders = torch.tensor(sorted(set(response_a) - set(response_b)))
    ids = torch.tensor([student_b + response_b])
    positions = torch.arange(len(student_b) - 1, len(student_b) + len(response_b) - 1)

    def gap(model):  # intruders' mean log-probability against the answer's, at the answer's positions
        with torch.no_grad():
            logprobs = model(ids).logits[0].log_softmax(-1)[positions]
        return float((logprobs[:, intruders] - logprobs.gather(-1, torch.tensor(response_b)[:, None])).mean())

    for margin, taught, least in ((0.0, True, 0.0), (50.0, False, 0.0), (50.0, True, 6.0), (50.0, True, 0.0)):
        model, learner = patched(step_every=0, contrast_margin=margin, lr=3e-2, anchor_weight=0.0,
                                 contrast_min_gain=least, gain_threshold=1e9)  # nothing left to learn by gain
        recipe = learner.recipe
        a, b = (recipe.interactions(t, r, s, 1.0, torch.zeros(len(r)))[0]
                for t, s, r in ((teacher_a, student_a, response_a), (teacher_b, student_b, response_b)))
        for item in (a, b):  # as if every token had been taught with 5 nats (or none of the buffered one's)
            item.taught = torch.full((len(item.response),), item is b or taught)
            item.taught_gain = 5.0 * item.taught
        recipe.replay.append(a)
        assert recipe.accumulate([b], "replay") == 0
        contrasted = bool(margin) and taught and least <= 5.0
        assert any(m.grad_B.any() for m in learner.modules.values()) == contrasted
        if contrasted:
            before = gap(model)
            learner.counters.tokens_pending = 1  # as if the step's served request had learned a token
            assert learner.step()
            assert gap(model) < before - 0.1
    with pytest.raises(ValueError, match="contrast_margin is in nats"):
        patched(contrast_margin=-1.0)
    with pytest.raises(ValueError, match="contrast_min_gain is in nats"):
        patched(contrast_margin=1.0, contrast_min_gain=-1.0)
    with pytest.raises(ValueError, match="contrast_margin applies to objective='context_gain'"):
        patched(contrast_margin=1.0, objective="next_token")


def test_entity_span_is_the_longest_run_the_question_shares_with_its_context():
    from fastcl.recipe import Interaction, entity_span, swapped_prompt
    head, tail = [1, 2], [5]

    def item(context, question):
        return Interaction(head + context + question + tail, head + question + tail, [7], 1.0)

    a = item([10, 40, 41, 11, 3], [3, 40, 41, 4])  # shares 3 alone and the run 40 41
    b = item([50, 51, 52, 12], [6, 50, 51, 52, 4])
    assert entity_span(a) == (3, 5) and a.entity == (3, 5)  # kept for replay
    assert swapped_prompt(a, b) == head + [3, 50, 51, 52, 4] + tail
    assert swapped_prompt(b, a) == head + [6, 40, 41, 4] + tail
    assert swapped_prompt(a, item([40, 41, 9], [8, 40, 41])) is None  # the same entity: no negative
    lone = item([10, 11, 12], [3, 10, 4, 12])  # only single tokens shared: no entity found
    assert entity_span(lone) is None and lone.entity == () and swapped_prompt(a, lone) is None


def test_swap_negatives_lowers_the_answer_after_another_entitys_question():
    """With a buffered request about another entity, the step keeps raising the answer after
    its own question and lowers it after the same question about the other entity, against the
    same step without the option; with nothing to swap in, or no token above swap_min_gain, the
    option changes nothing."""
    head, tail = [1, 2], [5]
    own_context, own_question = [10, 40, 41, 11, 12, 13], [3, 40, 41, 4]
    other_context, other_question = [20, 50, 51, 21], [3, 50, 51, 4]
    response = [11, 12, 13]
    teacher, student = head + own_context + own_question + tail, head + own_question + tail
    swapped = head + other_question + tail

    def learned(weight, buffered=True, least=-float("inf")):
        model, learner = patched(swap_negatives=weight, swap_min_gain=least, gain_threshold=-float("inf"),
                                 replay_per_step=0, anchor_weight=0.0, lr=3e-2)
        if buffered:
            learner.recipe.replay.append(learner.recipe.interactions(
                head + other_context + other_question + tail, [21], head + other_question + tail, 1.0)[0])
        before = response_loss(model, student, response), response_loss(model, swapped, response)
        learner.learn(teacher, response, student)
        return before, (response_loss(model, student, response), response_loss(model, swapped, response))

    (own_0, swap_0), (own_plain, swap_plain) = learned(0.0)
    _, (own_neg, swap_neg) = learned(1.0)
    assert own_plain < own_0 - 0.1 and own_neg < own_0 - 0.05  # the answer is learned either way
    assert swap_plain < swap_0  # without the option the step raises it after the other question too
    assert swap_neg > swap_plain + 0.05  # with it, less (or not at all)
    assert learned(1.0, buffered=False)[1] == pytest.approx(learned(0.0, buffered=False)[1], abs=1e-6)
    # swap_min_gain: tokens taught with less context gain are not pushed down
    assert learned(1.0, least=1e9)[1] == pytest.approx((own_plain, swap_plain), abs=1e-6)
    with pytest.raises(ValueError, match="swap_negatives is a weight"):
        patched(swap_negatives=-1.0)
    with pytest.raises(ValueError, match="swap_negatives applies to objective='context_gain'"):
        patched(swap_negatives=1.0, objective="next_token")


def test_learn_at_the_entity_learns_from_its_positions_only():
    """learn_at="entity": dB comes from the entity's rows of the student prompt only (another
    gradient than learning at every position, still one that learns the answer); a request with
    no entity learns at every position; the layers' masks are cleared after each pass."""
    head, tail = [1, 2], [5]
    teacher, student = head + [10, 40, 41, 11, 12, 13] + [3, 40, 41, 4] + tail, head + [3, 40, 41, 4] + tail
    lone_teacher, lone_student = head + [10, 11, 12, 13] + [3, 40, 4] + tail, head + [3, 40, 4] + tail
    response = [11, 12, 13]

    def accumulated(learn_at, prompts=(teacher, student)):
        model, learner = patched(learn_at=learn_at, gain_threshold=-float("inf"), replay_per_step=0,
                                 anchor_weight=0.0, step_every=100, consolidate_every=0)
        learner.learn(prompts[0], response, prompts[1])
        assert all(m.sketch_mask is None for m in learner.modules.values())
        return torch.cat([m.grad_B.flatten() for m in learner.modules.values()])

    every, entity, last = accumulated("all"), accumulated("entity"), accumulated("entity_last")
    assert entity.norm() > 0 and last.norm() > 0
    assert not torch.allclose(entity, every) and not torch.allclose(last, entity)
    assert torch.equal(accumulated("entity", (lone_teacher, lone_student)),
                       accumulated("all", (lone_teacher, lone_student)))

    model, learner = patched(learn_at="entity", gain_threshold=-float("inf"), replay_per_step=0, anchor_weight=0.0,
                             lr=3e-2)
    before = response_loss(model, student, response)
    for _ in range(3):
        learner.learn(teacher, response, student)
    assert response_loss(model, student, response) < before - 0.1
    with pytest.raises(ValueError, match="learn_at must be one of"):
        patched(learn_at="subject")
    with pytest.raises(ValueError, match="learn_at='entity' applies to objective='context_gain'"):
        patched(learn_at="entity", objective="next_token")


def test_learn_at_mask_of_a_padded_batch_never_selects_padding():
    """A row with no entity learns at its own tokens, not at the padding after them."""
    from fastcl.batching import prompt_response_batch
    from fastcl.recipe import Interaction
    head, tail = [1, 2], [5]
    named = Interaction(head + [10, 40, 41, 11] + [3, 40, 41, 4, 6, 6] + tail, head + [3, 40, 41, 4, 6, 6] + tail,
                        [11], 1.0)
    lone = Interaction(head + [10, 11] + [3, 4] + tail, head + [3, 4] + tail, [11], 1.0)
    batch = prompt_response_batch([named.student, lone.student], [[11], [11]], 0)
    _, learner = patched(learn_at="entity")
    mask = learner.recipe._sketch_mask([named, lone], batch, "entity")
    assert mask[0].nonzero().flatten().tolist() == [3, 4]
    assert mask[1].nonzero().flatten().tolist() == list(range(len(lone.student) + 1))


def test_entity_answer_weight_adds_the_answering_positions_below_the_entity():
    """The rows that predict the response learn at the weight, the entity's at 1, and a row with
    no entity still learns everywhere at 1; a fitted A reads only the rows at 1."""
    from fastcl.batching import prompt_response_batch
    from fastcl.recipe import Interaction
    head, tail = [1, 2], [5]
    named = Interaction(head + [10, 40, 41, 11] + [3, 40, 41, 4] + tail, head + [3, 40, 41, 4] + tail, [11, 12], 1.0)
    lone = Interaction(head + [10, 11] + [3, 4] + tail, head + [3, 4] + tail, [11, 12], 1.0)
    batch = prompt_response_batch([named.student, lone.student], [[11, 12], [11, 12]], 0)
    _, learner = patched(learn_at="entity", entity_answer_weight=0.25)
    mask = learner.recipe._sketch_mask([named, lone], batch, "entity")
    end = len(named.student)  # the student prompt's last token predicts the response's first
    assert {i: float(v) for i, v in enumerate(mask[0]) if v} == {3: 1.0, 4: 1.0, end - 1: 0.25, end: 0.25}
    assert mask[1].nonzero().flatten().tolist() == list(range(len(lone.student) + 2)) and mask[1].max() == 1.0
    with pytest.raises(ValueError, match="entity_answer_weight"):
        patched(learn_at="entity", entity_answer_weight=1.0)
