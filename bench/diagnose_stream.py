"""Where a continual run loses its facts: closed-book accuracy on the served phrasing beside the
held-out ones, right after each fact was learned ("immediate") beside the end of the stream,
and by position in the stream. The development companion of bench/continual.py (use streams
10+ for development; 1-3 are the reported ones).

    python bench/diagnose_stream.py --seeds 10 12 --companies 10 --ablation lr=3e-3
    python bench/diagnose_stream.py --seeds 14 15 16 17 18 19 --companies 20 --ablation rank=64 lr=1.5e-3 --against

--against [KEY=VALUE ...] runs a second recipe on the same streams (bare --against: the default)
and prints the paired differences with their standard error. Runs are deterministic, so saved
output can be compared instead of rerun: --compare OURS.jsonl THEIRS.jsonl pairs the JSON lines
of two earlier runs (this script's stdout) by stream and learner seed and prints the same differences.

"general_after" is the general-knowledge probes after the stream (the base model scores 0.452):
the development runs and the reported ones have disagreed on it before.

"answer_probability" (before -> after) is the true option's mean share of a softmax over the
options' scores: graded, it moves before a pick flips, so two recipes' difference in it is less
noisy than in accuracy over the same 160 items.

If served-phrasing accuracy is as low as held-out, the facts are not learned (not a transfer
problem); if "immediate" is high and the end is low, later traffic overwrote them.
"served_states_value_by_quarter" is the share of the answers served during the stream (document
in context, fast weights live) that name the asked value, by quarter of the stream; with
--served-base, "base_states_value_by_quarter" is the same for the base model answering without
learning: if learning lowers it, learning damages what is served, and so what it learns next.
"swapped_company" (before -> after) asks each fact's held-out questions about the stream's next
company, with the fact's options: how often the fact's own value is picked for a company it does
not belong to. What "after" gains beyond this is knowledge of which company has the value; what
this gains too is a learned value's pull on any question of its kind.
"binding" (floor, ceiling, after) asks the held-out questions with the stream's other values of
the attribute as distractors (fastcl.benchmark.binding_items): all options learned, so a hit
needs the value's company.
"wrong_is_learned_value" (before -> after) is the share of wrong held-out picks that are the
value some other company of the stream has for that attribute: if it rises after learning, the
model answers with learned values whichever company is asked about (interference).

--trajectory N follows each fact through the stream: every N requests, every fact served so far
is scored on its held-out phrasings (accuracy and answer probability), beside how often replay
has drawn it and the gate's refusals and halvings by request ("trajectory"); "end_by_replays"
groups the facts' end-of-stream accuracy by how often they were replayed. It asks whether a
fact that ends near the floor was never learned, was learned and then overwritten, or was
dropped by the gate. About 2 more minutes a stream at N = 10.

--rehearse measures the stream's end, then lets the learner rehearse (learner.rehearse(): one
pass over its replay buffer, the least-replayed requests first, as a server would while idle)
and measures again under "rehearsal", with the rehearsal's steps and seconds: both figures come
from one run, so their difference carries no stream-to-stream noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import fastcl
from fastcl import benchmark as B
from fastcl import evaluate as E
from fastcl.facts import DOMAINS, fact_stream
from fastcl.info import machine_differences

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continual import DEFAULT, describe_pairs, parse_overrides, run_machine  # noqa: E402


def held_out(model, tokenizer, fact) -> float:
    return E.multiple_choice_accuracy(model, tokenizer, [(q, fact.options, fact.answer_index) for q in fact.eval_questions])


def held_out_picks(model, tokenizer, facts) -> tuple[list[int], float]:
    """The option picked for every held-out phrasing of every fact, in order; and the answer's
    mean probability over the options (E.answer_probability)."""
    items = [(q, f.options, f.answer_index) for f in facts for q in f.eval_questions]
    scores = E.multiple_choice_scores(model, tokenizer, items)
    return [E.best_option(row) for row in scores], E.mean_answer_probability(scores, items)


def per_fact_accuracy(facts, picks) -> list[float]:
    out, i = [], 0
    for f in facts:
        n = len(f.eval_questions)
        out.append(sum(p == f.answer_index for p in picks[i:i + n]) / n)
        i += n
    return out


def wrong_is_learned_value(facts, picks) -> float:
    """Of the wrong held-out picks, the share that are another company's value for the same
    attribute in this stream (NaN if no pick is wrong)."""
    asked = [f for f in facts for _ in f.eval_questions]
    wrong = [(f, f.options[p]) for f, p in zip(asked, picks) if p != f.answer_index]
    learned = {(f.attribute, f.value) for f in facts}
    return sum((f.attribute, value) in learned for f, value in wrong) / len(wrong) if wrong else float("nan")


def per_fact_scores(model, tokenizer, facts) -> tuple[list[float], list[float]]:
    """Per fact: held-out accuracy and mean answer probability over its held-out phrasings."""
    items = [(q, f.options, f.answer_index) for f in facts for q in f.eval_questions]
    scores = E.multiple_choice_scores(model, tokenizer, items)
    probabilities = [E.answer_probability(row, item[2]) for row, item in zip(scores, items)]
    per_fact, i = [], 0
    for f in facts:
        per_fact.append(round(sum(probabilities[i:i + len(f.eval_questions)]) / len(f.eval_questions), 4))
        i += len(f.eval_questions)
    accuracy = per_fact_accuracy(facts, [E.best_option(row) for row in scores])
    return [round(a, 3) for a in accuracy], per_fact


class Trajectory:
    """--trajectory: keeps each fact's request as the learner holds it (whose `replays` the recipe
    counts) and the gate's verdicts per request, and scores every served fact every `every`
    requests. It only reads the learner, so the learner's draws and figures are unchanged."""

    def __init__(self, model, tokenizer, facts, learner, every: int):
        self.model, self.tokenizer, self.facts, self.every = model, tokenizer, facts, every
        self.learner, self.recipe = learner, learner.recipe
        self.requests: list = []  # per fact served, its Interaction (None without a replay buffer)
        self.checkpoints: list[dict] = []
        self.gate_events: list[list[int]] = []  # [request index, refusals, halvings] where either moved

    @property
    def replays(self) -> list[int]:
        return [item.replays if item is not None else 0 for item in self.requests]

    def after_learn(self, index: int, counters_before: tuple[int, int]) -> None:
        # step_every=1: the request just learned is the buffer's newest
        self.requests.append(self.recipe.replay[-1] if self.recipe.replay else None)
        counters = self.learner.counters
        moved = (counters.gate_refusals - counters_before[0], counters.gate_halved - counters_before[1])
        if any(moved):
            self.gate_events.append([index, *moved])
        if (index + 1) % self.every == 0:
            accuracy, probability = per_fact_scores(self.model, self.tokenizer, self.facts[:index + 1])
            self.checkpoints.append({"served": index + 1, "accuracy": accuracy, "probability": probability,
                                     "replays": self.replays})

    def summary(self, end_accuracy: list[float]) -> dict:
        """Taken at the stream's end, before any rehearse() adds replays of its own."""
        buckets = {"0": (0, 0), "1-2": (1, 2), "3-5": (3, 5), "6+": (6, 10 ** 9)}
        replays, by_replays = self.replays, {}
        for name, (low, high) in buckets.items():
            chosen = [a for a, r in zip(end_accuracy, replays) if low <= r <= high]
            by_replays[name] = [len(chosen), round(sum(chosen) / len(chosen), 3) if chosen else None]
        return {"end_by_replays": by_replays, "replays": replays, "gate_events": self.gate_events,
                "trajectory": self.checkpoints}


def states_value(tokenizer, facts, answers) -> list[bool]:
    """Per served answer: does it name the asked value (case-insensitive)."""
    return [fact.value.lower() in tokenizer.decode(answer).lower() for fact, answer in zip(facts, answers)]


def diagnose(model, tokenizer, seed: int, companies: int, options: dict, served_base: bool = False,
             trajectory_every: int = 0, rehearse: bool = False, domain: str = "companies") -> dict:
    """One stream served, learned and measured; the model is left as it came."""
    with B.restored(model):
        return _diagnose(model, tokenizer, seed, companies, options, served_base, trajectory_every, rehearse, domain)


def _diagnose(model, tokenizer, seed, companies, options, served_base, trajectory_every, rehearse, domain) -> dict:
    facts = fact_stream(companies, seed=seed, domain=domain)
    base_states = states_value(tokenizer, facts, B.serve(model, tokenizer, None, facts).answers) if served_base else None
    served_items = [(f.served_question, f.options, f.answer_index) for f in facts]
    picks, probability_before = held_out_picks(model, tokenizer, facts)
    floor, confused_before = per_fact_accuracy(facts, picks), wrong_is_learned_value(facts, picks)
    served_floor = E.multiple_choice_hits(model, tokenizer, served_items)
    controls = B.Controls.measure(model, tokenizer, facts, seed)
    ceiling = B.measure(model, tokenizer, facts, in_context=True, general=False)["mc"]
    learner = B.patch_for_stream(model, tokenizer, seed, options)
    immediate = []
    learn = learner.learn
    if trajectory_every and learner.config.step_every != 1:
        raise ValueError("--trajectory follows requests into the replay buffer one step at a time: it needs step_every=1")
    trajectory = Trajectory(model, tokenizer, facts, learner, trajectory_every) if trajectory_every else None

    def learn_then_score(*args, **kwargs):
        counters = (learner.counters.gate_refusals, learner.counters.gate_halved)
        report = learn(*args, **kwargs)
        immediate.append(held_out(model, tokenizer, facts[len(immediate)]))
        if trajectory is not None:
            trajectory.after_learn(len(immediate) - 1, counters)
        return report

    learner.learn = learn_then_score
    with tqdm(total=len(facts), desc=f"stream {seed}: serving and learning", unit="request") as progress:
        served = B.serve(model, tokenizer, learner, facts, progress=progress)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    quarter = max(1, len(facts) // 4)
    by_quarter = lambda xs: [round(mean(xs[i: i + quarter]), 3) for i in range(0, len(xs), quarter)]  # noqa: E731

    def by_attribute(xs: list[float]) -> dict:
        """Per attribute: a founder (pool of 900) rarely meets another learned value among its
        options, a year (70) sometimes, a city or product (30 each) often."""
        return {a: round(mean([x for x, f in zip(xs, facts) if f.attribute == a]), 3)
                for a in DOMAINS[domain].attributes}

    def end_of_stream() -> tuple[dict, list[float], list[int]]:
        picks, probability_after = held_out_picks(model, tokenizer, facts)
        after, confused_after = per_fact_accuracy(facts, picks), wrong_is_learned_value(facts, picks)
        stats = learner.stats()
        probes = E.load_probes()
        swapped_after, binding_after = controls.after(model, tokenizer)
        return {
            "after": mean(after), "recovered": B.gap_recovered(mean(after), mean(floor), ceiling),
            "answer_probability": [round(probability_before, 4), round(probability_after, 4)],
            "served_after": mean(E.multiple_choice_hits(model, tokenizer, served_items)),
            "swapped_company": [round(controls.swapped_before, 3), round(swapped_after, 3)],
            "binding": [round(controls.binding_floor, 3), round(controls.binding_ceiling, 3), round(binding_after, 3)],
            "after_by_quarter": by_quarter(after),
            "after_by_attribute": by_attribute(after),
            "wrong_is_learned_value": [round(confused_before, 3), round(confused_after, 3)],
            "perplexity_after": round(E.perplexity(model, tokenizer, E.load_text("general_text.txt")), 2),
            "general_after": round(E.multiple_choice_accuracy(model, tokenizer, probes), 3),
            "general_framed_after": round(E.multiple_choice_accuracy(model, tokenizer, probes, frame=E.ANSWER_FRAME), 3),
            "gate_refusals": stats["gate_refusals"], "gate_halved": stats["gate_halved"],
            "gate_repaired": stats["gate_repaired"],
        }, after, picks

    measured, after, picks = end_of_stream()
    followed = {"immediate_by_fact": [round(x, 3) for x in immediate], "end_by_fact": after, "end_picks": picks,
                **trajectory.summary(after)} if trajectory is not None else {}
    rehearsed = {}
    if rehearse:
        start = time.perf_counter()
        report = learner.rehearse()
        rehearsed = {"rehearsal": {"steps": report.steps, "requests": report.requests,
                                   "seconds": round(time.perf_counter() - start, 1),
                                   "serving_learn_seconds": round(served.learn_seconds, 1),
                                   **end_of_stream()[0]}}
    return {
        "seed": seed, "domain": domain, "floor": mean(floor), "floor_by_attribute": by_attribute(floor),
        "ceiling": ceiling, **measured,
        "served_floor": mean(served_floor), "immediate": mean(immediate),
        "served_states_value_by_quarter": by_quarter(states_value(tokenizer, facts, served.answers)),
        **({"base_states_value_by_quarter": by_quarter(base_states)} if base_states is not None else {}),
        **followed,
        **rehearsed,
    }


def comparison(recipes: list[dict], results: list[list[dict]], streams: str) -> str:
    """The first recipe minus the second, measure by measure: mean, standard error, per stream."""
    lines = [f"{recipes[0]} minus {recipes[1]}, {streams}:"]
    for key in ("recovered", "answer_probability", "general_after", "perplexity_after"):
        differences, mean, error = B.paired_difference(results[0], results[1], key)
        lines.append(f"  {key:20s} {mean:+.4f} +- {error:.4f} (standard error)   per stream: "
                     + " ".join(f"{d:+.4f}" for d in differences))
    return "\n".join(lines)


def compare_saved(ours_path: str, theirs_path: str) -> str:
    """comparison() over two saved runs, on the streams both ran under the same learner seed."""
    def load(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
        return {(row["seed"], B.learner_seed(row["seed"], row["options"])): row for row in rows}

    ours, theirs = load(ours_path), load(theirs_path)
    pairs = sorted(set(ours) & set(theirs))
    if not pairs:
        raise SystemExit(f"no stream is in both {ours_path} and {theirs_path} under the same learner seed")
    first = [next(iter(ours.values())), next(iter(theirs.values()))]
    recipes = [row["options"] for row in first]
    text = comparison(recipes, [[ours[p] for p in pairs], [theirs[p] for p in pairs]],
                      describe_pairs(pairs, "streams"))
    # Another CPU serves and learns differently (its ISA, bf16 input gradients): say so first.
    differences = machine_differences(*(row.get("machine") for row in first))
    if differences:
        text = ("warning: the two runs are from different machines or settings, so part of each difference may "
                "be the machine's: " + "; ".join(differences) + "\n" + text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 12])
    parser.add_argument("--companies", type=int, default=10, help="entities a stream, 4 facts each")
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="companies",
                        help="the fact domain (people: held out from development, a check only)")
    parser.add_argument("--ablation", nargs="*", help="patch() overrides as key=json")
    parser.add_argument("--against", nargs="*", help="a second recipe (patch() overrides as key=json) run on the "
                        "same streams; the paired differences are printed at the end")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the model serves and learns (cuda: a GPU)")
    parser.add_argument("--served-base", action="store_true", help="also serve the stream with the base model "
                        "(no learning) and report how often its answers name the asked value (about 1.5 min)")
    parser.add_argument("--trajectory", type=int, default=0, metavar="N", help="every N requests, score every "
                        "fact served so far, with replay counts and gate verdicts (see above)")
    parser.add_argument("--rehearse", action="store_true", help="after the stream is measured, learner.rehearse() "
                        "(one pass over the replay buffer, least replayed first) and measure again "
                        "(\"rehearsal\"): the same run before and after, so the difference has no stream noise")
    parser.add_argument("--compare", nargs=2, metavar=("OURS", "THEIRS"), help="compare two saved runs (JSON "
                        "lines of this script's output) instead of running anything")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare_saved(*args.compare))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipes = [{**DEFAULT, **parse_overrides(args.ablation)}]
    if args.against is not None:
        recipes.append({**DEFAULT, **parse_overrides(args.against)})
    model, tokenizer = fastcl.models.load_default(device=args.device)
    results: list[list[dict]] = [[] for _ in recipes]
    for seed in args.seeds:
        for options, done in zip(recipes, results):
            start = time.perf_counter()
            done.append(diagnose(model, tokenizer, seed, args.companies, options, args.served_base,
                                 args.trajectory, args.rehearse, args.domain))
            seconds = round(time.perf_counter() - start)
            print(json.dumps({"options": options, **done[-1], "seconds": seconds,
                              "machine": run_machine(args.device, options)}), flush=True)
    if len(recipes) == 2:
        print(comparison(recipes, results, f"streams {args.seeds}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
