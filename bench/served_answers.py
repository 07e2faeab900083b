"""What the base model's served answers (document in context, no learning) say about the asked
value, per attribute: the teacher every recipe learns from.

    python bench/served_answers.py --seeds 4 14
    python bench/served_answers.py --seeds 1 2 3 --domain people

A value is "stated" if its text occurs in the answer (diagnose_stream.states_value, as its
served_states_value counts it), "all tokens" if every token of the value, spelled as in the
document (after a space), occurs in the answer, and "some tokens" if any does: grounded
learning learns only response tokens found in the context, so a paraphrased value ("a hearing
aid" for "hearing aids") is learned in part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnose_stream import states_value  # noqa: E402
from fastcl.facts import DOMAINS, fact_stream  # noqa: E402

MEASURES = ("stated", "all_tokens", "some_tokens")


def by_attribute(tokenizer, facts, answers) -> dict[str, dict[str, float]]:
    """Per attribute (in the order the stream first asks it), the share of answers meeting each of MEASURES."""
    counts = {f.attribute: dict.fromkeys(("facts", *MEASURES), 0) for f in facts}
    for fact, answer, stated in zip(facts, answers, states_value(tokenizer, facts, answers)):
        answered = set(answer)
        present = [t in answered for t in tokenizer(" " + fact.value, add_special_tokens=False)["input_ids"]]
        row = counts[fact.attribute]
        row["facts"] += 1
        row["stated"] += stated
        row["all_tokens"] += all(present)
        row["some_tokens"] += any(present)
    return {a: {m: round(row[m] / row["facts"], 3) for m in MEASURES} for a, row in counts.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 14])
    parser.add_argument("--companies", type=int, default=20, help="entities a stream, 4 facts each")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="companies")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from fastcl import benchmark as B
    from fastcl.models import load_default

    torch.set_num_threads(args.threads)
    model, tokenizer = load_default()
    for seed in args.seeds:
        facts = fact_stream(args.companies, seed=seed, domain=args.domain)
        answers = B.serve(model, tokenizer, None, facts).answers
        print(json.dumps({"seed": seed, "domain": args.domain, "by_attribute": by_attribute(tokenizer, facts, answers)}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
