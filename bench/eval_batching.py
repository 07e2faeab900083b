"""The benchmark's measures batched against the same measures one prompt at a time, side by side
in one process on the default model: the scores must agree (same picks, same exact-match texts)
and the batched ones should take less time.

    python bench/eval_batching.py                          # companies seed 1: 160 held-out items, 124 probes, 80 questions
    python bench/eval_batching.py --threads 2 --questions 40

`fastcl.evaluate` scores multiple choice and generates exact-match answers EVAL_BATCH prompts at a
time; `batch=1` is the same code one prompt at a time (a forward for the shared prefix and one per
option length beside the prompt's, where the one-prompt-at-a-time code it replaced ran two per
item, so the ratio here overstates the change against that old code, which this script cannot
import).
"""

from __future__ import annotations

import argparse
import time

import torch

from fastcl import evaluate as E
from fastcl.facts import DOMAINS, fact_stream
from fastcl import models
from fastcl.info import describe_machine, machine


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def compare_scores(model, tokenizer, name: str, items, frame: str = "") -> str:
    prompts, options = E.option_inputs(tokenizer, items, frame)
    alone, alone_s = timed(lambda: E.batched_option_logprobs(model, prompts, options, batch=1))
    together, together_s = timed(lambda: E.batched_option_logprobs(model, prompts, options))
    diff = max(abs(a - b) for ra, rb in zip(alone, together) for a, b in zip(ra, rb))
    moved = sum(E.best_option(ra) != E.best_option(rb) for ra, rb in zip(alone, together))
    return (f"| {name} | {len(items)} | {alone_s:.1f} | {together_s:.1f} | {alone_s / together_s:.2f} | "
            f"{moved} picks differ, max score difference {diff:.1e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="companies")
    parser.add_argument("--questions", type=int, default=80, help="held-out questions answered by generation")
    parser.add_argument("--items", type=int, default=None, help="the first N items of each MC measure (default all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_default()
    model.eval()
    facts = fact_stream(20, seed=args.seed, domain=args.domain)
    print(describe_machine(machine()) + f", EVAL_BATCH {E.EVAL_BATCH}")
    print("| measure | items | one at a time, s | batched, s | ratio | agreement |")
    print("|---|---:|---:|---:|---:|---|")
    closed, in_context, probes = (items[:args.items] for items in
                                  (E.fact_items(facts, False), E.fact_items(facts, True), E.load_probes()))
    print(compare_scores(model, tokenizer, "closed-book MC", closed), flush=True)
    print(compare_scores(model, tokenizer, "closed-book MC, answer frame", closed, E.ANSWER_FRAME), flush=True)
    print(compare_scores(model, tokenizer, "general probes", probes), flush=True)
    print(compare_scores(model, tokenizer, "in-context MC", in_context), flush=True)
    prompts = [E.chat_ids(tokenizer, q) for f in facts for q in f.eval_questions][:args.questions]
    alone, alone_s = timed(lambda: E.greedy_answers(model, tokenizer, prompts, 24, batch=1))
    together, together_s = timed(lambda: E.greedy_answers(model, tokenizer, prompts, 24))
    differ = sum(a != b for a, b in zip(alone, together))
    print(f"| exact-match generation (24 tokens) | {len(prompts)} | {alone_s:.1f} | {together_s:.1f} | "
          f"{alone_s / together_s:.2f} | {differ} answers differ |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
