"""`fastcl demo`: SmolLM2-135M learns a short stream of new facts from the traffic it serves.

It serves each fact's question with the fact's document in context, learns from its own
answer with learn(), and shows what the model knows afterwards *without* the document, asked in
phrasings it never served, beside what it still knows in general.
"""

from __future__ import annotations

import time

from tqdm import tqdm

from . import benchmark as B
from . import evaluate as E
from .facts import fact_stream


def _plot(points: list[dict], path: str, ceiling: float, n_probes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [p["tokens"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(tokens, [p["closed"] for p in points], "o-", label="closed-book, held-out phrasings")
    ax.plot(tokens, [p["general"] for p in points], "s-", label=f"general-knowledge probes ({n_probes})")
    ax.axhline(ceiling, color="gray", linestyle="--", label="in-context (the ceiling)")
    ax.set_xlabel("tokens served")
    ax.set_ylabel("accuracy (multiple choice)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("fastcl: SmolLM2-135M learning from served traffic")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(seed: int = 0, companies: int = 6, out: str = "fastcl-demo.png", checkpoints: int = 3,
             domain: str = "companies") -> int:
    """Serve `companies` fictional entities of `domain` (fastcl.facts.DOMAINS), 4 facts each, and
    learn from them; print the before/after table and write the plot to `out`."""
    import fastcl

    start = time.perf_counter()
    model, tokenizer = fastcl.models.load_default()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.0f}s")
    facts = fact_stream(companies, seed=seed, domain=domain)
    probes = E.load_probes()[::3]  # a third of the probes for the curve; all of them before and after
    print(f"measuring before learning ({len(facts)} new facts about fictional {domain}, {len(probes)}-probe curve)...")
    before = B.measure(model, tokenizer, facts, exact=False)
    ceiling = B.measure(model, tokenizer, facts, in_context=True, general=False)["mc"]
    points = [{"tokens": 0, "closed": before["mc"],
               "general": E.multiple_choice_accuracy(model, tokenizer, probes)}]

    learner = B.patch_for_stream(model, tokenizer, seed, {})
    print(str(learner.report).splitlines()[0])

    def checkpoint(_, served):
        points.append({"tokens": served.tokens,
                       "closed": E.multiple_choice_accuracy(model, tokenizer, E.fact_items(facts, False)),
                       "general": E.multiple_choice_accuracy(model, tokenizer, probes)})

    every = max(1, len(facts) // checkpoints)
    with tqdm(total=len(facts), desc="serving and learning", unit="request") as progress:
        served = B.serve(model, tokenizer, learner, facts, progress=progress, every=every, on_checkpoint=checkpoint)
    after = B.measure(model, tokenizer, facts, exact=False)
    if points[-1]["tokens"] != served.tokens:
        checkpoint(len(facts), served)
    stats = learner.stats()

    print()
    print(f"| {'':34} | before | after  |")
    print(f"|{'-' * 36}|--------|--------|")
    print(f"| {'closed-book, held-out phrasings':34} | {before['mc']:6.3f} | {after['mc']:6.3f} |")
    print(f"| {'in-context (the ceiling)':34} | {ceiling:6.3f} |        |")
    general = f"general-knowledge probes ({len(E.load_probes())})"
    print(f"| {general:34} | {before['general']:6.3f} | {after['general']:6.3f} |")
    print(f"| {'general-text perplexity':34} | {before['perplexity']:6.2f} | {after['perplexity']:6.2f} |")
    recovered = B.gap_recovered(after["mc"], before["mc"], ceiling)
    print(f"\nrecovered {recovered:.0%} of the gap between no context and in-context; "
          f"{served.tokens} tokens served in {served.serve_seconds:.0f}s, learning took {served.learn_seconds:.0f}s; "
          f"{stats['steps']} steps, {stats['consolidations']} consolidations, "
          f"{stats['gate_refusals']} refused by the gate, {stats['gate_halved']} halved to pass it; state held {stats['bytes_held']['total'] / 1e6:.0f} MB")
    _plot(points, out, ceiling, len(probes))
    print(f"plot written to {out} ({time.perf_counter() - start:.0f}s in all)")
    return 0
