"""Two saved runs of one stream, answer by answer: where their exact-match recall differs.

    python bench/exact_answers.py X_default_seed41.json X_previous_seed41.json

Reads bench/continual.py's JSON (runs saved since 2026-12-07 keep each closed-book greedy answer,
"exact_answers_after", and the recall by attribute, "exact_after[attribute]"). Prints both runs'
recall by attribute, then every held-out question that one run answered with the true value and
the other did not, with both answers: whether a fall in exact match is one kind of value, a
value named in part (a founder's first name alone), or the answer's frame ("X makes Y." against
"X is famous for producing a wide range of goods").
"""

from __future__ import annotations

import argparse
import json

from fastcl.facts import fact_stream


def load_run(path: str) -> tuple[dict, str]:
    with open(path) as handle:
        saved = json.load(handle)
    run = saved["runs"][0]
    if not run.get("exact_answers_after"):
        raise SystemExit(f"{path}: no greedy answers saved (run bench/continual.py without --no-exact, at a "
                         "version that saves 'exact_answers_after')")
    return run, saved.get("domain", "companies")


def held_out_questions(seed: int, domain: str, answers: int) -> list:
    """(fact, question) in the order the answers were saved (fastcl.evaluate.fact_items')."""
    per_entity = sum(len(f.eval_questions) for f in fact_stream(1, seed, domain=domain))
    asked = [(f, q) for f in fact_stream(answers // per_entity, seed, domain=domain) for q in f.eval_questions]
    if len(asked) != answers:
        raise SystemExit(f"{answers} saved answers do not fit stream {seed}'s facts ({per_entity} an entity)")
    return asked


def report(first: str, second: str) -> str:
    (a, domain), (b, other_domain) = load_run(first), load_run(second)
    if (a["seed"], domain) != (b["seed"], other_domain) or len(a["exact_answers_after"]) != len(b["exact_answers_after"]):
        raise SystemExit("the two runs served different streams: compare runs of one stream")
    lines = [f"stream {a['seed']} ({domain}): exact match {a['exact_after']:.3f} ({first}) vs "
             f"{b['exact_after']:.3f} ({second})"]
    for key in (k for k in a if k.startswith("exact_after[")):
        lines.append(f"  {key[len('exact_after['):-1]}: {a[key]:.3f} vs {b.get(key, float('nan')):.3f}")
    asked = held_out_questions(a["seed"], domain, len(a["exact_answers_after"]))
    for (fact, question), mine, theirs in zip(asked, a["exact_answers_after"], b["exact_answers_after"]):
        hits = [fact.value.lower() in answer.lower() for answer in (mine, theirs)]
        if hits[0] != hits[1]:
            marks = ["+" if hit else "-" for hit in hits]
            lines.append(f"{fact.attribute} {fact.value!r}: {question}\n  {marks[0]} {mine!r}\n  {marks[1]} {theirs!r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="a bench/continual.py --json file (its first run)")
    parser.add_argument("second", help="another run of the same stream")
    args = parser.parse_args(argv)
    print(report(args.first, args.second))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
