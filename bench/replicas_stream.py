"""Replicas learning a fact stream together, with the default recipe (a fitted A in blocks).

    python bench/replicas_stream.py --replicas 2 --seed 41 --before-cache DIR --json out.json
    python bench/replicas_stream.py --replicas 2 --seed 41 --baseline bench/runs/2026-12-07/F_preset_seed41.json
    python bench/replicas_stream.py --replicas 2 --seed 41 --ablation layer_options=null   # a group without a fitted A

N replicas (gloo processes on this machine, one torch thread each) serve bench/continual.py's
stream between them: replica i serves facts i, i + N, ... with the document in context and
learns with learner.learn() (the default recipe; in a group each fitted layer's A holds one
block a replica, fastcl.distributed), in lockstep rounds since learn() steps and consolidates as
a collective. Replica 0 then scores the model (every replica holds the same weights, checked at
each consolidation) as bench/continual.py scores one learner: closed-book accuracy on every
fact's held-out phrasings against the floor and ceiling, binding, exact match, the general
probes and perplexity. --baseline names continual.py's --json of the same stream served by one
learner, printed beside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = (("recovered", "recovered (the issue's score)", "{:.1%}"), ("after", "closed-book after", "{:.3f}"),
        ("binding_recovered", "binding recovered", "{:.1%}"), ("exact_after", "exact match after", "{:.3f}"),
        ("general_after", "general probes after", "{:.3f}"), ("perplexity_after", "perplexity after", "{:.2f}"),
        ("gate_refusals", "merges refused", "{}"))


def serve_share(rank: int, world: int, tmp: str, args) -> None:
    """One replica: serve its share of the stream; replica 0 measures before and after."""
    import torch.distributed as dist
    from tqdm import tqdm

    import continual
    import fastcl
    from fastcl import benchmark as B
    from fastcl.facts import fact_stream

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # the replicas share the machine's cores
    # Replica 0 measures for minutes while the others wait at a barrier.
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(hours=2))
    try:
        model, tokenizer = fastcl.models.load_default()
        facts = fact_stream(args.companies, seed=args.seed, domain=args.domain)
        if rank == 0:
            before, in_context, controls = continual.measure_before(model, tokenizer, facts, args.seed, True,
                                                                    args.before_cache)
        dist.barrier()
        learner = B.patch_for_stream(model, tokenizer, args.seed, continual.parse_overrides(args.ablation))
        start = time.perf_counter()
        with tqdm(total=len(facts) // world, desc=f"replica {rank}: serving and learning", unit="request",
                  disable=rank != 0) as progress:
            served = B.serve(model, tokenizer, learner, facts[rank::world], progress=progress)
        seconds = time.perf_counter() - start
        if rank == 0:
            after = B.measure(model, tokenizer, facts, exact=True)
            _, binding_after = controls.after(model, tokenizer)
            stats = learner.stats()
            run = {"seed": args.seed, "domain": args.domain, "replicas": world, "options": args.ablation,
                   "floor": before["mc"],
                   "ceiling": in_context["mc"], "after": after["mc"],
                   "recovered": B.gap_recovered(after["mc"], before["mc"], in_context["mc"]),
                   "binding_after": binding_after,
                   "binding_recovered": B.gap_recovered(binding_after, controls.binding_floor,
                                                        controls.binding_ceiling),
                   "exact_before": before["exact"], "exact_after": after["exact"],
                   "general_before": before["general"], "general_after": after["general"],
                   "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
                   "steps": stats["steps"], "consolidations": stats["consolidations"],
                   "gate_refusals": stats["gate_refusals"], "serving_seconds": seconds,
                   "requests_per_replica": served.requests, "notes": learner.report.notes,
                   "config": learner.config.to_dict()}
            Path(tmp, "run.json").write_text(json.dumps(run))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def table(run: dict, baseline: dict | None) -> str:
    options = f", {' '.join(run['options'])}" if run.get("options") else ""
    head = f"| seed {run['seed']} ({run['domain']}) | {run['replicas']} replicas{options} |"
    lines = [head + (" --baseline |" if baseline else ""),
             "|---|---|" + ("---|" if baseline else "")]
    for key, label, form in ROWS:
        ours = form.format(run[key])
        theirs = f" {form.format(baseline[key])} |" if baseline and baseline.get(key) is not None else \
            (" - |" if baseline else "")
        lines.append(f"| {label} | {ours} |{theirs}")
    lines.append(f"floor {run['floor']:.3f}, ceiling {run['ceiling']:.3f}; general before {run['general_before']:.3f}, "
                 f"perplexity before {run['perplexity_before']:.2f}; {run['requests_per_replica']} requests a replica "
                 f"in {run['serving_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seed", type=int, default=41)
    parser.add_argument("--companies", type=int, default=20, help="entities in the stream (4 facts each)")
    parser.add_argument("--domain", default="companies")
    parser.add_argument("--before-cache", default=None, help="as bench/continual.py's: reuse the stream's start")
    parser.add_argument("--baseline", default=None, help="bench/continual.py --json of the same stream, one learner")
    parser.add_argument("--ablation", nargs="*", default=[], help="patch() options over the defaults, as "
                        "bench/continual.py's: key=JSON")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one learner: bench/continual.py)")
    if (4 * args.companies) % args.replicas:
        parser.error(f"the stream's {4 * args.companies} facts do not split evenly over {args.replicas} replicas, "
                     "and the replicas learn in lockstep rounds")
    baseline = None
    if args.baseline:
        runs = json.loads(Path(args.baseline).read_text())["runs"]
        baseline = next((r for r in runs if r["seed"] == args.seed), None)
        if baseline is None:
            parser.error(f"{args.baseline} holds no run of seed {args.seed}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(serve_share, args=(args.replicas, tmp, args), nprocs=args.replicas, start_method="spawn")
        run = json.loads(Path(tmp, "run.json").read_text())
    print(table(run, baseline))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [run]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
