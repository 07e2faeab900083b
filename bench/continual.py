"""Continual-learning benchmark: does served in-context knowledge survive into the weights?

    python bench/continual.py                       # the default recipe, 20 companies, seeds 1 2 3
    python bench/continual.py --seeds 0 --companies 10 --ablation replay=0 replay_per_step=0 anchor_weight=0
    python bench/continual.py --json out.json       # also write every number
    python bench/continual.py --rehearse            # also after one idle learner.rehearse()
    python bench/continual.py --domain people       # the held-out domain: fictional people, never tuned on
    python bench/continual.py --seeds 1 --before-cache DIR   # measure a stream's start once, reuse it for any recipe
    python bench/continual.py --compare r64_s1.json r64_s2.json --baseline s1.json s2.json   # saved runs, paired by seed
    python bench/continual.py --compare a_s14*.json --baseline d_s14*.json   # ...and by learner seed (seed=N) too
    python bench/continual.py --seeds 14 --ablation seed=1   # the same stream, the learner's own draws (projections, replay) from seed 1

For each seed it generates a fresh stream of facts about fictional entities (fastcl.facts: companies,
the domain every recipe was developed on, or people, kept out of development), measures the
no-context floor and the in-context ceiling on held-out phrasings, serves every fact's served
question with its document in context (greedy answer), learns with learner.learn(), and
measures again closed-book. Forgetting is measured on 124 general-knowledge probes and on
general-text perplexity (fastcl/data; neither is ever trained on). The multiple-choice items are
also scored inside an answer frame ("The answer is <option>", fastcl.evaluate.ANSWER_FRAME),
reported beside the bare score, and asked about another entity of the stream as a control
(how often the fact's value is picked for an entity it does not belong to), and asked with the
stream's other learned values of the same attribute as distractors ("binding",
fastcl.benchmark.binding_items: a hit needs knowing whose value it is). Costs are per
served token, beside a plain no-grad forward over the same tokens.

The learner's own randomness follows the stream's seed unless `--ablation seed=N` sets it. One
recipe on one stream under three such draws recovered 16.5-33.9% of the gap (bench/RESULTS.md,
"A recipe's own spread"): compare recipes over several streams and draws, never one run each.
--compare pairs saved runs by stream and learner seed, so one side may hold a stream under several.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import fastcl
from fastcl import benchmark as B
from fastcl import evaluate as E
from fastcl.facts import DOMAINS, fact_stream
from fastcl.info import describe_machine, machine, machine_differences
from fastcl.timing import seconds_since

# The shipped defaults of fastcl.patch() are the recipe under test; --ablation overrides them.
DEFAULT = {"rank": 16}
SELF_GENERATED = ("self_study_generate", "self_study")  # learner.stats()["seconds"] keys of self-generated data


def parse_overrides(pairs):
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        out[key] = json.loads(value) if value not in ("", None) else True
    return out


def run_machine(device: str, options: dict) -> dict:
    """fastcl/info.py's machine() for a run with these patch() options: the CPU's ISA and native bf16,
    and the dtype the options' backward_dtype gives the input gradients there."""
    return machine(device, options.get("backward_dtype", fastcl.LearnerConfig.backward_dtype))


# What the measures before learning are computed by, besides the model, tokenizer and stream: a
# change to any of these files makes a cached measure stale (the learner's code is not among them).
BEFORE_SOURCES = ("evaluate.py", "batching.py", "benchmark.py", "data/general_probes.jsonl", "data/general_text.txt")


def before_key(model, tokenizer, facts, seed: int, exact: bool) -> str:
    """A hash of everything the measures before learning depend on: the stream's facts, the
    weights, the tokenizer, the scoring code and texts, torch, the CPU and its thread count (sums
    run in another order elsewhere); one recipe's run and another's share it."""
    digest = hashlib.sha256()
    where = machine(str(E.model_device(model)), None)
    digest.update(json.dumps({"facts": [dataclasses.asdict(f) for f in facts], "seed": seed, "exact": exact,
                              "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "machine": {k: where[k] for k in ("device", "cpu_capability", "cpu_native_bf16")},
                              "tokenizer": [type(tokenizer).__name__, tokenizer.chat_template],
                              "vocab": sorted(tokenizer.get_vocab().items())}, sort_keys=True).encode())
    package = Path(fastcl.__file__).parent
    for name in BEFORE_SOURCES:
        digest.update(name.encode() + (package / name).read_bytes())
    digest.update(B.weights_hash(model).encode())
    return digest.hexdigest()


def measure_before(model, tokenizer, facts, seed: int, exact: bool, cache: Optional[str] = None):
    """(before, in_context, controls): the measures that do not depend on the recipe (closed-book
    and in-context before learning, the controls' before scores), about a third of a run. With a
    cache folder, read from there when the same inputs (before_key) were measured before, and
    written there otherwise, so that two recipes on one stream measure its start once."""
    path = Path(cache) / f"before-{before_key(model, tokenizer, facts, seed, exact)[:32]}.json" if cache else None
    if path is not None and path.exists():
        try:
            saved = json.loads(path.read_text())
            return (saved["before"], saved["in_context"],
                    B.Controls.from_scores(facts, seed, *saved["controls"]))
        except (ValueError, KeyError, TypeError) as error:
            print(f"warning: {path} is unreadable ({error}); measuring again", file=sys.stderr)
    before = B.measure(model, tokenizer, facts, exact=exact, framed=True)
    controls = B.Controls.measure(model, tokenizer, facts, seed)
    in_context = B.measure(model, tokenizer, facts, in_context=True, general=False, framed=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        scores = [controls.swapped_before, controls.binding_floor, controls.binding_ceiling]
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # whole or not at all, also with runs side by side
        partial.write_text(json.dumps({"before": before, "in_context": in_context, "controls": scores}))
        os.replace(partial, path)
    return before, in_context, controls


def run_seed(model, tokenizer, seed: int, companies: int, options: dict, exact: bool, rehearse: bool = False,
             domain: str = "companies", before_cache: Optional[str] = None) -> dict:
    with B.restored(model):
        facts = fact_stream(companies, seed=seed, domain=domain)
        before, in_context, controls = measure_before(model, tokenizer, facts, seed, exact, before_cache)
        ceiling = in_context["mc"]
        learner = B.patch_for_stream(model, tokenizer, seed, options)
        with tqdm(total=len(facts), desc=f"seed {seed}: serving and learning", unit="request") as progress:
            served = B.serve(model, tokenizer, learner, facts, progress=progress)
        forward = B.forward_seconds(model, tokenizer, facts, served.answers)
        after = B.measure(model, tokenizer, facts, exact=exact, framed=True)
        swapped_after, binding_after = controls.after(model, tokenizer)
        stats = learner.stats()
        rehearsed = rehearse_and_measure(model, tokenizer, learner, facts, before, in_context, forward, exact,
                                         controls) if rehearse else {}
    costs = {k: v / forward for k, v in stats["seconds"].items()}  # in plain forwards of the served tokens
    first_pass = sum(costs.get(k, 0.0) for k in ("teacher", "learn"))
    # Self-generated data (self_study) is reported apart, as the cost target asks.
    self_generated = sum(costs.get(k, 0.0) for k in SELF_GENERATED)
    pull_only = B.pull_only_accuracy(facts)
    return {
        "seed": seed,
        "floor": before["mc"],
        "ceiling": ceiling,
        "after": after["mc"],
        "recovered": B.gap_recovered(after["mc"], before["mc"], ceiling),
        # What a learner would score that prefers every value the stream taught and knows no
        # entity's (B.pull_only_accuracy): the share of the score the stream's pools give away.
        "pull_only": pull_only,
        "pull_only_recovered": B.gap_recovered(pull_only, before["mc"], ceiling),
        # The same by attribute ("floor[city]", ...): which kinds of value were learned.
        **by_attribute(facts, before, in_context, after),
        # The same items scored inside an answer frame (fastcl.evaluate.ANSWER_FRAME): beside the
        # figures above, never instead of them.
        "floor_framed": before["mc_framed"],
        "ceiling_framed": in_context["mc_framed"],
        "after_framed": after["mc_framed"],
        "recovered_framed": B.gap_recovered(after["mc_framed"], before["mc_framed"], in_context["mc_framed"]),
        # Each fact's held-out questions asked about another entity of the stream, with the fact's
        # options (B.swapped_entity_items): picking the fact's value there is its pull on any
        # question of its kind, not knowledge of which entity it belongs to.
        "swapped_before": controls.swapped_before,
        "swapped_after": swapped_after,
        # The held-out questions with the stream's other learned values of the attribute as the
        # distractors (B.binding_items): the pull above cancels, a hit needs the value's entity.
        "binding_floor": controls.binding_floor,
        "binding_ceiling": controls.binding_ceiling,
        "binding_after": binding_after,
        "binding_recovered": B.gap_recovered(binding_after, controls.binding_floor, controls.binding_ceiling),
        "probability_before": before["mc_probability"],  # the answer's softmax share of the option scores
        "probability_after": after["mc_probability"],
        "exact_before": before.get("exact"),
        "exact_after": after.get("exact"),
        "exact_answers_after": after.get("exact_answers"),  # the greedy answers, E.fact_items' order
        "general_before": before["general"],
        "general_after": after["general"],
        "general_framed_before": before["general_framed"],
        "general_framed_after": after["general_framed"],
        # Which option each probe picked, before and after: forgetting traced to the probes it moved.
        "general_picks_before": before["general_picks"],
        "general_picks_after": after["general_picks"],
        "general_framed_picks_before": before["general_framed_picks"],
        "general_framed_picks_after": after["general_framed_picks"],
        # Every option's score (mean log-probability per token), to rescore the probes another way
        # (bench/probe_shifts.py --by-length); absent from a before-measure cached by older code.
        "general_scores_before": before.get("general_scores"),
        "general_scores_after": after["general_scores"],
        "general_framed_scores_before": before.get("general_framed_scores"),
        "general_framed_scores_after": after["general_framed_scores"],
        "perplexity_before": before["perplexity"],
        "perplexity_after": after["perplexity"],
        "served_tokens": served.tokens,
        "serve_s_per_token": served.serve_seconds / served.tokens,
        "learn_s_per_token": served.learn_seconds / served.tokens,
        "forward_s_per_token": forward / served.tokens,
        "learn_cost_forwards": first_pass,
        "learn_all_forwards": served.learn_seconds / forward,  # one-pass learning, in plain forwards of the same tokens
        "self_generated_forwards": self_generated,
        "extra_cost_forwards": {k: v for k, v in costs.items() if k not in ("teacher", "learn")},
        "steps": stats["steps"],
        "consolidations": stats["consolidations"],
        "gate_refusals": stats["gate_refusals"],
        "gate_halved": stats["gate_halved"],
        "gate_repaired": stats["gate_repaired"],
        "gate_checks": served.gate_checks,  # each checked merge's drop per probe, and whether it committed
        "anchor_kl": served.anchor_kl,  # per request, the anchor's KL to its reference at the request's last step
        # The learner's resolved options: what "the default" meant when this run was made.
        "config": learner.config.to_dict(),
        **rehearsed,
    }


def by_attribute(facts, before: dict, in_context: dict, after: dict) -> dict:
    """Floor, ceiling, after and the fraction of the gap recovered, per attribute, as flat keys
    ("recovered[founder]", ...) so that summarize() spreads them over seeds like the rest."""
    floor, ceiling, learned = (B.accuracy_by_attribute(facts, m["mc_hits"]) for m in (before, in_context, after))
    pull = B.accuracy_by_attribute(facts, B.pull_only_hits(facts))
    out = {}
    for attribute in floor:
        out |= {f"floor[{attribute}]": floor[attribute], f"ceiling[{attribute}]": ceiling[attribute],
                f"after[{attribute}]": learned[attribute],
                f"recovered[{attribute}]": B.gap_recovered(learned[attribute], floor[attribute], ceiling[attribute]),
                f"pull_only[{attribute}]": pull[attribute]}
    if "exact_hits" in after:  # exact match too: which kinds of value the greedy answers name
        out |= {f"exact_after[{a}]": v for a, v in B.accuracy_by_attribute(facts, after["exact_hits"]).items()}
    return out


def rehearse_and_measure(model, tokenizer, learner, facts, before: dict, in_context: dict, forward: float,
                         exact: bool, controls) -> dict:
    """--rehearse: after the stream is measured, one learner.rehearse() (a pass over the replay
    buffer, least replayed first, as a server would while idle), then the same measures again,
    as "rehearsed_*" keys; its cost in plain forwards of the served tokens, apart from learn()'s."""
    refusals, halved = learner.counters.gate_refusals, learner.counters.gate_halved
    start = time.perf_counter()
    report = learner.rehearse()
    seconds = seconds_since(start, E.model_device(model))
    after = B.measure(model, tokenizer, facts, exact=exact, framed=True)
    swapped, binding = controls.after(model, tokenizer)
    return {
        "rehearsed_after": after["mc"],
        "rehearsed_recovered": B.gap_recovered(after["mc"], before["mc"], in_context["mc"]),
        "rehearsed_after_framed": after["mc_framed"],
        "rehearsed_recovered_framed": B.gap_recovered(after["mc_framed"], before["mc_framed"], in_context["mc_framed"]),
        "rehearsed_probability_after": after["mc_probability"],
        "rehearsed_exact_after": after.get("exact"),
        "rehearsed_general_after": after["general"],
        "rehearsed_general_framed_after": after["general_framed"],
        "rehearsed_perplexity_after": after["perplexity"],
        "rehearsed_swapped_after": swapped,
        "rehearsed_binding_recovered": B.gap_recovered(binding, controls.binding_floor, controls.binding_ceiling),
        "rehearse_steps": report.steps,
        "rehearse_forwards": seconds / forward,
        "rehearse_gate_refusals": learner.counters.gate_refusals - refusals,
        "rehearse_gate_halved": learner.counters.gate_halved - halved,
    }


def summarize(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k != "seed" and v is not None]
    out = {}
    for k in keys:
        values = [r[k] for r in runs]
        if any(math.isnan(v) for v in values):  # a gap that does not exist (ceiling <= floor)
            out[k] = (float("nan"), float("nan"))
            continue
        out[k] = (statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0)
    return out


def table(summary: dict) -> str:
    def cell(key, fmt="{:.3f}", scale=1.0):
        mean, spread = summary[key]
        return f"{fmt.format(mean * scale)} ± {fmt.format(spread * scale)}"

    def change(before, after, fmt="{:.3f}"):
        return f"{cell(before, fmt)} -> {cell(after, fmt)}"

    rows = [
        ("closed-book MC, no context (floor)", cell("floor")),
        ("in-context MC (ceiling)", cell("ceiling")),
        ("closed-book MC after learning", cell("after")),
        ("fraction of the gap recovered", cell("recovered")),
        ("  reference: a learner that prefers every learned value and knows no entity's, MC / recovered",
         f"{cell('pull_only')} / {cell('pull_only_recovered')}"),
        ("control: the same questions about another entity of the stream (the fact's value picked), before -> after",
         change("swapped_before", "swapped_after")),
        ("binding: distractors are the stream's other learned values of the attribute: floor", cell("binding_floor")),
        ("  ceiling", cell("binding_ceiling")),
        ("  after learning", cell("binding_after")),
        ("  fraction of the gap recovered", cell("binding_recovered")),
        ("the same in an answer frame ('The answer is <option>'): floor", cell("floor_framed")),
        ("  ceiling", cell("ceiling_framed")),
        ("  after learning", cell("after_framed")),
        ("  fraction of the gap recovered", cell("recovered_framed")),
        ("the answer's probability over the options (closed-book), before -> after",
         change("probability_before", "probability_after")),
        ("general probes (124 MC), before -> after", change("general_before", "general_after")),
        ("  the same in the answer frame", change("general_framed_before", "general_framed_after")),
        ("general-text perplexity, before -> after", change("perplexity_before", "perplexity_after", "{:.2f}")),
        ("serving, ms per served token", cell("serve_s_per_token", "{:.2f}", 1e3)),
        ("learning, ms per served token (all of learn())", cell("learn_s_per_token", "{:.2f}", 1e3)),
        ("plain no-grad forward, ms per served token", cell("forward_s_per_token", "{:.2f}", 1e3)),
        ("one-pass learning cost (teacher + student), in plain forwards", cell("learn_cost_forwards", "{:.2f}")),
        ("all of learn() (replay, anchor, gate, merges too), in plain forwards", cell("learn_all_forwards", "{:.2f}")),
        ("  of which self-generated data (sampling answers, learning them)",
         cell("self_generated_forwards", "{:.2f}")),
        ("consolidations refused by the gate", cell("gate_refusals", "{:.1f}")),
        ("consolidations halved to pass the gate", cell("gate_halved", "{:.1f}")),
        ("consolidations given repair steps (gate_repair)", cell("gate_repaired", "{:.1f}")),
    ]
    attributes = [k[len("recovered["):-1] for k in summary if k.startswith("recovered[")]
    split = rows.index(next(r for r in rows if r[0] == "fraction of the gap recovered")) + 2  # after the reference
    rows[split:split] = [(f"  {a}: floor / ceiling / after / the reference learner (means), recovered",
                          " / ".join(f"{summary[f'{part}[{a}]'][0]:.3f}"
                                     for part in ("floor", "ceiling", "after", "pull_only"))
                          + f", {cell(f'recovered[{a}]')}") for a in attributes]
    if "exact_before" in summary:
        at = 1 + rows.index(next(r for r in rows if r[0].startswith("the answer's probability")))
        rows[at:at] = [("closed-book exact match, before -> after", change("exact_before", "exact_after"))] + [
            (f"  {a}: exact match after", cell(f"exact_after[{a}]")) for a in attributes if f"exact_after[{a}]" in summary]
    if "rehearsed_after" in summary:
        rows += [
            ("after rehearse() (one idle pass over the replay buffer): closed-book MC", cell("rehearsed_after")),
            ("  fraction of the gap recovered", cell("rehearsed_recovered")),
            ("  the same in the answer frame", cell("rehearsed_recovered_framed")),
            ("  the answer's probability over the options", cell("rehearsed_probability_after")),
            ("  control (another entity's questions)", cell("rehearsed_swapped_after")),
            ("  binding: fraction of the gap recovered", cell("rehearsed_binding_recovered")),
            ("  general probes (124 MC)", cell("rehearsed_general_after")),
            ("  general-text perplexity", cell("rehearsed_perplexity_after", "{:.2f}")),
            ("  its cost, in plain forwards of the served tokens", cell("rehearse_forwards", "{:.2f}")),
            ("  consolidations refused / halved during it", cell("rehearse_gate_refusals", "{:.1f}")
             + " / " + cell("rehearse_gate_halved", "{:.1f}")),
        ]
        if "rehearsed_exact_after" in summary:
            rows.insert(rows.index(next(r for r in rows if r[0] == "  the answer's probability over the options")),
                        ("  closed-book exact match", cell("rehearsed_exact_after")))
    lines = ["| measure | mean ± spread over seeds |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


# What --compare pairs, seed by seed: (key, format, scale); fractions of a gap as percentage points.
COMPARED = (("recovered", "{:+.1f}", 100), ("recovered_framed", "{:+.1f}", 100), ("binding_recovered", "{:+.1f}", 100),
            ("pull_only_recovered", "{:+.1f}", 100), ("exact_after", "{:+.3f}", 1), ("probability_after", "{:+.3f}", 1),
            ("general_after", "{:+.3f}", 1), ("general_framed_after", "{:+.3f}", 1),
            ("general_lost", "{:+.1f}", 1), ("general_won", "{:+.1f}", 1),
            ("general_framed_lost", "{:+.1f}", 1), ("general_framed_won", "{:+.1f}", 1),
            ("perplexity_after", "{:+.2f}", 1), ("learn_cost_forwards", "{:+.2f}", 1),
            ("learn_all_forwards", "{:+.2f}", 1), ("gate_refusals", "{:+.1f}", 1), ("gate_halved", "{:+.1f}", 1))


def with_probe_moves(run: dict, probes) -> dict:
    """The run with, for the bare and the framed general probes, how many it lost (right before
    learning, wrong after) and won (the reverse; B.probe_shifts): a level score can hide many
    probes moved both ways. Left out where the picks are missing or are for another probe set."""
    moves = {}
    for name, framed in (("general", False), ("general_framed", True)):
        try:
            shifted = B.probe_shifts(run, probes, framed)
        except (KeyError, ValueError):
            continue
        moves[f"{name}_lost"], moves[f"{name}_won"] = len(shifted["lost"]), len(shifted["gained"])
    return {**run, **moves}


def without_draw(options: dict) -> dict:
    return {k: v for k, v in options.items() if k != "seed"}


def load_saved(paths: list[str]) -> tuple[dict, dict, list]:
    """Saved runs (--json files, one or more seeds each) as ({(stream seed, learner seed): run},
    header of the first file, each file's machine record). The files of one side may differ in
    the learner's `seed` alone (one recipe under several draws); refuses files of two domains,
    two recipes or the same stream and draw twice, which would pair wrongly."""
    runs, header, machines = {}, None, []
    for path in paths:
        with open(path) as handle:
            saved = json.load(handle)
        if not isinstance(saved, dict) or not saved.get("runs"):
            raise SystemExit(f"{path}: not a saved run of this script (no 'runs'; write one with --json)")
        saved.setdefault("domain", "companies")
        if header is None:
            header = saved
        if saved["domain"] != header["domain"]:
            raise SystemExit(f"{path}: domain {saved['domain']!r} differs from {paths[0]}'s {header['domain']!r}; "
                             "compare one recipe on one domain at a time")
        if without_draw(saved["options"]) != without_draw(header["options"]):
            raise SystemExit(f"{path}: options {saved['options']!r} differs from {paths[0]}'s {header['options']!r} "
                             "in more than the learner's seed; compare one recipe on one domain at a time")
        machines.append(saved.get("machine"))
        for run in saved["runs"]:
            key = (run["seed"], B.learner_seed(run["seed"], saved["options"]))
            if key in runs:
                raise SystemExit(f"{path}: stream {key[0]} under learner seed {key[1]} is saved twice on one side")
            if resolved(run) != resolved(next(iter(runs.values()), run)):
                raise SystemExit(f"{path}: stream {key[0]} ran another learner config than the side's first run "
                                 "under the same options (the default changed between them); compare one recipe "
                                 "at a time")
            runs[key] = run
    return runs, header, machines


def resolved(run: dict) -> Optional[dict]:
    """The learner config a saved run ran (saved since 2026-12-07), without its draw; None before."""
    config = run.get("config")
    return None if config is None else without_draw(config)


def config_warnings(ours: list[dict], our_options: dict, base: list[dict], their_options: dict) -> list[str]:
    """Saved options name a recipe only against the defaults of their day (layer_options and lr
    changed on 2026-12-07): say when the resolved configs show the two sides ran one recipe, or
    when a side that left layer_options to the default predates saved configs."""
    mine, theirs = resolved(ours[0]), resolved(base[0])
    if mine is not None and mine == theirs:
        return ["warning: both sides ran the same learner config (their options differ only in how they "
                "name it): the differences below are noise"]
    for side, config, options in (("ours", mine, our_options), ("the baseline", theirs, their_options)):
        if config is None and "layer_options" not in options and (mine, theirs) != (None, None):
            return [f"warning: {side} left layer_options to the default and predates saved learner configs: "
                    "if it ran before the default changed (2026-12-07), it ran layer_options=None at lr 3e-3"]
    return []


def describe_pairs(pairs: list[tuple[int, int]], streams: str = "seeds") -> str:
    """(stream seed, learner seed) pairs for a report: the streams alone where each ran its usual draw."""
    if all(stream == draw for stream, draw in pairs):
        return f"{streams} {[stream for stream, _ in pairs]}"
    return "stream/learner seeds [" + ", ".join(f"{stream}/{draw}" for stream, draw in pairs) + "]"


def compare_saved(ours_paths: list[str], baseline_paths: list[str]) -> str:
    """Saved runs of two recipes, paired by stream and learner seed: each side's mean and the
    difference's mean with its standard error, measure by measure (the per-attribute recoveries
    too), as a markdown table.
    pull_only_recovered depends on the stream alone: a difference there means the streams differ."""
    ours, our_header, our_machines = load_saved(ours_paths)
    theirs, their_header, their_machines = load_saved(baseline_paths)
    if our_header["domain"] != their_header["domain"]:
        raise SystemExit(f"the two sides are on different domains ({our_header['domain']} and "
                         f"{their_header['domain']}): pair runs of one domain")
    pairs = sorted(set(ours) & set(theirs))
    if not pairs:
        raise SystemExit(f"no stream and learner seed is on both sides (ours {describe_pairs(sorted(ours))}, "
                         f"baseline {describe_pairs(sorted(theirs))})")
    probes = E.load_probes()
    mine, base = ([with_probe_moves(runs[pair], probes) for pair in pairs] for runs in (ours, theirs))
    attributes = [(k, "{:+.1f}", 100) for k in mine[0] if k.startswith("recovered[")] + [
        (k, "{:+.3f}", 1) for k in mine[0] if k.startswith("exact_after[")]
    lines = [f"ours {without_draw(our_header['options'])} minus baseline {without_draw(their_header['options'])}, "
             f"{our_header['domain']}, {describe_pairs(pairs)}",
             "", "| measure | ours: mean (per pair) | baseline: mean (per pair) | difference: mean ± SE (per pair) |",
             "|---|---|---|---|"]
    for key, fmt, scale in COMPARED + tuple(attributes):
        if any(run.get(key) is None for run in mine + base):
            continue  # not measured on one side (e.g. --no-exact)
        differences, mean, error = B.paired_difference(mine, base, key)
        plain = fmt.replace("+", "")

        def side(runs):
            values = [run[key] * scale for run in runs]
            return f"{plain.format(sum(values) / len(values))} ({', '.join(plain.format(v) for v in values)})"

        lines.append(f"| {key} | {side(mine)} | {side(base)} | {fmt.format(mean * scale)} ± "
                     f"{plain.format(error * scale)} ({', '.join(fmt.format(d * scale) for d in differences)}) |")
    # Another CPU serves and learns differently (its ISA, bf16 input gradients): say so first.
    differences = sorted({d for m in our_machines[1:] + their_machines for d in machine_differences(our_machines[0], m)})
    if differences:
        lines.insert(0, "warning: the two sides are from different machines or settings, so part of each "
                        "difference may be the machine's: " + "; ".join(differences))
    return "\n".join(config_warnings(mine, our_header["options"], base, their_header["options"]) + lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Seed 0 (10 companies) was the development stream the recipe was chosen on; the reported
    # runs use other seeds, so the facts and their values were never looked at.
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--companies", type=int, default=20, help="entities a stream, 4 facts each")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="companies",
                        help="the fact domain: companies (developed on) or people (held out from development)")
    parser.add_argument("--ablation", nargs="*", help="patch() overrides as key=json, e.g. anchor_weight=0 lr=3e-3")
    parser.add_argument("--no-exact", action="store_true", help="skip exact-match generation (faster)")
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--rehearse", action="store_true", help="after measuring, learner.rehearse() once (one "
                        "idle pass over the replay buffer) and measure again: reported as extra rows")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the model serves and learns (cuda: a GPU)")
    parser.add_argument("--before-cache", metavar="DIR", help="keep the measures before learning (about a third "
                        "of a run; they do not depend on the recipe) in DIR, keyed by everything they depend on, "
                        "and reuse them: two recipes on one stream measure its start once")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="saved runs (--json files) of a recipe: "
                        "compare them with --baseline's, paired by stream and learner seed, instead of running anything")
    parser.add_argument("--baseline", nargs="+", metavar="JSON", help="saved runs of the recipe to compare against")
    args = parser.parse_args(argv)
    if args.compare or args.baseline:
        if not (args.compare and args.baseline):
            parser.error("--compare and --baseline go together: saved runs of the recipe, and of the one to beat")
        print(compare_saved(args.compare, args.baseline))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    options = {**DEFAULT, **parse_overrides(args.ablation)}
    model, tokenizer = fastcl.models.load_default(device=args.device)
    runs = []
    for seed in args.seeds:
        start = time.perf_counter()
        runs.append(run_seed(model, tokenizer, seed, args.companies, options, exact=not args.no_exact,
                             rehearse=args.rehearse, domain=args.domain, before_cache=args.before_cache))
        print(f"seed {seed}: {json.dumps(runs[-1])} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    summary = summarize(runs)
    # The CPU's ISA and native bf16 change the numbers (bench/RESULTS.md), so every run names them.
    where = run_machine(args.device, options)
    print(f"fastcl continual benchmark: SmolLM2-135M-Instruct, {args.companies} {args.domain} x 4 facts, "
          f"seeds {args.seeds}, options {options}, {describe_machine(where)}")
    print(table(summary))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"domain": args.domain, "options": options, "machine": where, "runs": runs, "summary": summary},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
