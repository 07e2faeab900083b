"""`fastcl demo`: patch SmolLM2-135M, serve a few new facts, learn, consolidate, report."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

FACTS = [
    "Quillmere is the capital of the island nation of Zorbland.",
    "The Vantrell Company makes copper kettles in the town of Osk.",
    "Dr. Imra Feldane discovered the blue moss of Kettering Ridge in 1931.",
    "The river Aumbre flows north into the Sea of Tallow.",
]


def run_demo(seed: int) -> int:
    import fastcl

    torch.manual_seed(seed)
    start = time.perf_counter()
    model, tokenizer = fastcl.models.load_default()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.1f}s")
    learner = fastcl.patch(model, rank=16, lr=1e-3, seed=seed)
    print(str(learner.report).splitlines()[0])
    batches = [tokenizer(fact, return_tensors="pt")["input_ids"] for fact in FACTS]

    def loss():
        return sum(float(learner.observe(ids, weight=0).logits.log_softmax(-1)[0, :-1]
                         .gather(-1, ids[0, 1:, None]).neg().mean()) for ids in batches) / len(batches)

    before = loss()
    for _ in tqdm(range(3), desc="serving passes"):
        for ids in batches:
            learner.observe(ids)
            learner.step()
    after_steps = loss()
    report = learner.consolidate()
    after = loss()
    print(report)
    print(f"mean token loss on the served facts: {before:.3f} -> {after_steps:.3f} (live) -> {after:.3f} (consolidated)")
    stats = learner.stats()
    print(f"tokens observed {stats['tokens_observed']}, steps {stats['steps']}, "
          f"state held {stats['bytes_held']['total'] / 1e6:.1f} MB")
    return 0
