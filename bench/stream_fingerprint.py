"""Does this checkout, on this machine, learn bit for bit what another one did?

    python bench/stream_fingerprint.py                    # companies seed 1, first 8 requests (about 4 min)
    python bench/stream_fingerprint.py --seed 2 --requests 4 --domain people --ablation lr=1e-3

Serves the first N requests of a bench/continual.py stream with the default recipe (or the
given overrides), learns from them as the benchmark does, and prints a hash of the weights
(merged and fast) and of the served answers, with the machine (fastcl/info.py's machine()). Two
checkouts that print the same line learn identically on that prefix; run it at two commits to
find the one that changed learning, or on two machines to see whether they differ (the
eighteenth session found that way that a benchmark change came from the CPU: bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import fastcl
from fastcl import benchmark as B
from fastcl.facts import DOMAINS, fact_stream
from fastcl.info import describe_machine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual import DEFAULT, parse_overrides, run_machine  # noqa: E402


def fingerprint(model, tokenizer, seed: int, requests: int, options: dict, domain: str = "companies",
                entities: int = 20) -> dict:
    """Serve and learn the first `requests` facts of the stream; the hashes of what that left.
    The model is restored afterwards."""
    facts = list(fact_stream(entities, seed=seed, domain=domain))[:requests]
    with B.restored(model):
        learner = B.patch_for_stream(model, tokenizer, seed, options)
        served = B.serve(model, tokenizer, learner, facts)
        counters = learner.counters
        return {"weights": B.weights_hash(model)[:16],
                "answers": hashlib.sha256(json.dumps(served.answers).encode()).hexdigest()[:16],
                "consolidations": counters.consolidations, "gate_refusals": counters.gate_refusals}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=8, help="how many of the stream's first requests to serve")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="companies")
    parser.add_argument("--ablation", nargs="*", help="patch() overrides as key=json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error(f"--requests must be at least 1, got {args.requests}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    options = {**DEFAULT, **parse_overrides(args.ablation)}
    model, tokenizer = fastcl.models.load_default()
    result = fingerprint(model, tokenizer, args.seed, args.requests, options, args.domain)
    where = run_machine("cpu", options)
    print(json.dumps({"seed": args.seed, "requests": args.requests, "domain": args.domain, "options": options,
                      **result, "machine": where}))
    print(f"# {describe_machine(where)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
