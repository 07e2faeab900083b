"""What one learn() call does, fact by fact: how much of the context gain it closes, how far it
moves held-out multiple choice, and how much general text it costs. Seconds per variant, so a
recipe change can be looked at before a full bench/continual.py run.

    python bench/one_step.py '{"protect_directions": 0}' '{}' '{"passes": 4}'

Each argument is a set of fastcl.patch() options (JSON); every variant starts from the base
model and learns the same served answers (replay off and the gate off, so each number is the
call's own). Per fact: (mean gain closed on the learned tokens, the gain there before, the
change of the held-out MC margins: correct option's score minus the best distractor's).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import fastcl
from fastcl import benchmark as B
from fastcl import evaluate as E
from fastcl.facts import fact_stream
from fastcl.guard import GATE_TEXT, text_ids


def response_logprobs(model, tokenizer, question: str, response: list[int]) -> torch.Tensor:
    prompt = E.chat_ids(tokenizer, question)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    return logits.float().log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def margins(model, tokenizer, fact) -> list[float]:
    options = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in fact.options]
    out = []
    for question in fact.eval_questions:
        scores = E.option_logprobs(model, E.chat_ids(tokenizer, question), options)
        out.append(scores[fact.answer_index] - max(s for i, s in enumerate(scores) if i != fact.answer_index))
    return out


def run(model, tokenizer, variants: list[dict], seed: int = 10, n_facts: int = 4) -> list[tuple[float, float, list]]:
    """Per variant: (drift in nats per token on the gate's text and on the benchmark's perplexity
    text, per-fact rows). Leaves the model as it was."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gate_ids = text_ids(tokenizer, GATE_TEXT)
    general_ids = text_ids(tokenizer, "general_text.txt")  # never trained on; scored, as the benchmark does
    base_loglik = E.mean_log_likelihood(model, gate_ids)
    base_general = E.mean_log_likelihood(model, general_ids)
    facts = fact_stream((n_facts + 3) // 4, seed=seed)[:n_facts]
    served = []
    for fact in facts:
        teacher = E.chat_ids(tokenizer, E.with_context(fact.document, fact.served_question))
        response, teacher_logprobs = B.answer(model, tokenizer, teacher)
        served.append((fact, teacher, response, teacher_logprobs))
    results = []
    for variant in variants:
        options = {"gate_tolerance": None, "replay": 0, "replay_per_step": 0, **variant}
        learner = fastcl.patch(model, tokenizer=tokenizer, **options)
        rows = []
        for fact, teacher, response, teacher_logprobs in served:
            before = response_logprobs(model, tokenizer, fact.served_question, response)
            learned = (teacher_logprobs - before) > learner.config.gain_threshold
            margins_before = margins(model, tokenizer, fact)
            learner.learn(teacher, response, E.chat_ids(tokenizer, fact.served_question),
                          teacher_logprobs=teacher_logprobs)
            after = response_logprobs(model, tokenizer, fact.served_question, response)
            closed = float((after - before)[learned].mean()) if learned.any() else 0.0
            gain = float((teacher_logprobs - before)[learned].mean()) if learned.any() else 0.0
            moved = [round(b - a, 2) for a, b in zip(margins_before, margins(model, tokenizer, fact))]
            rows.append((round(closed, 2), round(gain, 2), moved))
        results.append((base_loglik - E.mean_log_likelihood(model, gate_ids),
                        base_general - E.mean_log_likelihood(model, general_ids), rows))
        fastcl.unpatch(model, merge=False)
        model.load_state_dict(original)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=["{}"], help="patch() options as JSON, one per variant")
    parser.add_argument("--seed", type=int, default=10, help="fact stream (10+: development streams)")
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tokenizer = fastcl.models.load_default()
    results = run(model, tokenizer, [json.loads(v) for v in args.variants], args.seed, args.facts)
    for variant, (drift, general, rows) in zip(args.variants, results):
        print(f"{variant}: drift {drift:.4f} nats/token on the gate text, {general:.4f} on the perplexity text; "
              f"per fact (closed, gain, held-out margin change): {rows}", flush=True)
    print("summary: variant | drift on the gate text | on the perplexity text | gain closed | held-out margin change"
          " (the last two: means over facts)")
    for variant, (drift, general, rows) in zip(args.variants, results):
        closed = sum(r[0] for r in rows) / len(rows)
        moved = sum(sum(r[2]) / len(r[2]) for r in rows) / len(rows)
        print(f"{variant} | {drift:.4f} | {general:.4f} | {closed:.2f} | {moved:+.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
