"""Which general-knowledge probes a continual run moved, and to what.

    python bench/probe_shifts.py p1.json p2.json              # the answer frame (default)
    python bench/probe_shifts.py p1.json --bare               # the probes asked bare
    python bench/probe_shifts.py p1.json --by-length          # moves by option length, and rescored

Reads bench/continual.py's JSON (each run's "general_framed_picks_before/after", or the bare
"general_picks_*"), lists every probe that went from right to wrong ("lost") or wrong to right
("gained") with the option picked before and after, and counts how many of the new wrong picks
are values the run's fact domain draws from (fastcl.facts.DOMAINS): a learned value's pull on
questions it has nothing to do with, as opposed to drift of another kind.

With --by-length: per run, how many moves went to a longer, an equally long or a shorter option
(in tokens, as the probes score them) than the one picked before. A probe's score is the mean
log-probability per token, and an option's later tokens are easy once its first is given, so a
change in how sure the model is of an answer's first token flips probes by length; a run's
probe score moving with length is that, not knowledge. Where the run saved every option's
score ("general_framed_scores_*"), the probes are also rescored by total log-probability.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from fastcl.benchmark import probe_shifts
from fastcl.evaluate import ANSWER_FRAME, accuracy_of_scores, load_probes, option_inputs
from fastcl.facts import DOMAINS


def domain_values(domain: str) -> set[str]:
    return {value.lower() for pool in DOMAINS[domain].pools.values() for value in pool}


def report(files: list[str], framed: bool = True) -> str:
    probes = load_probes()
    lines, lost_to = [], Counter()
    for path in files:
        with open(path) as handle:
            result = json.load(handle)
        domain = result.get("domain", "companies")
        values = domain_values(domain)
        for run in result["runs"]:
            moved = probe_shifts(run, probes, framed)
            into_domain = sum(probes[i][1][now].lower() in values for i, _, now in moved["lost"])
            lines.append(f"{path}: {domain}, seed {run['seed']}: {len(moved['lost'])} lost, "
                         f"{len(moved['gained'])} gained; {into_domain} of the lost now pick a {domain} value")
            for kind in ("lost", "gained"):
                for index, was, now in moved[kind]:
                    question, options, _ = probes[index]
                    lines.append(f"  {kind:6s} #{index:3d} {question!r}: {options[was]!r} -> {options[now]!r}")
                    if kind == "lost":
                        lost_to[options[now]] += 1
    if lost_to:
        lines.append("wrong picks after, most common: "
                     + ", ".join(f"{option!r} x{count}" for option, count in lost_to.most_common(10)))
    return "\n".join(lines)


def default_tokenizer():
    from transformers import AutoTokenizer

    from fastcl.models import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def option_lengths(tokenizer, probes, framed: bool) -> list[list[int]]:
    """Tokens per option, tokenized as the probes are scored."""
    _, options = option_inputs(tokenizer, probes, ANSWER_FRAME if framed else "")
    return [[len(option) for option in row] for row in options]


def by_length(files: list[str], tokenizer, framed: bool = True) -> str:
    probes = load_probes()
    lengths = option_lengths(tokenizer, probes, framed)
    key = "general_framed" if framed else "general"
    lines, totals = [], Counter()
    for path in files:
        with open(path) as handle:
            result = json.load(handle)
        for run in result["runs"]:
            moved = probe_shifts(run, probes, framed)
            counts = Counter()
            for kind in ("lost", "gained"):
                for index, was, now in moved[kind]:
                    change = lengths[index][now] - lengths[index][was]
                    counts[kind, "longer" if change > 0 else "shorter" if change < 0 else "as long"] += 1
            totals.update(counts)
            line = f"{path}: seed {run['seed']}: " + by_size(counts)
            rescored = [rescore(run.get(f"{key}_scores_{when}"), lengths, probes) for when in ("before", "after")]
            if rescored[1] is not None:
                line += ("; by total log-probability "
                         + " -> ".join("(not saved)" if r is None else f"{r:.3f}" for r in rescored)
                         + f" (per-token mean {run[f'{key}_before']:.3f} -> {run[f'{key}_after']:.3f})")
            lines.append(line)
    lines.append("all runs: " + by_size(totals))
    return "\n".join(lines)


def by_size(counts: Counter) -> str:
    return "; ".join(f"{kind} to a longer / as long / shorter option: "
                     + " / ".join(str(counts[kind, size]) for size in ("longer", "as long", "shorter"))
                     for kind in ("lost", "gained"))


def rescore(scores, lengths, probes):
    """Accuracy with each option scored by its total log-probability (mean x tokens); None
    without saved scores."""
    if scores is None:
        return None
    totals = [[mean * n for mean, n in zip(row, row_lengths)] for row, row_lengths in zip(scores, lengths)]
    return accuracy_of_scores(totals, probes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="bench/continual.py --json outputs")
    parser.add_argument("--bare", action="store_true", help="the probes asked bare instead of in the answer frame")
    parser.add_argument("--by-length", action="store_true", help="count the moves by option length (loads the "
                        "default model's tokenizer) and rescore by total log-probability where scores were saved")
    args = parser.parse_args(argv)
    try:
        if args.by_length:
            print(by_length(args.files, default_tokenizer(), framed=not args.bare))
        else:
            print(report(args.files, framed=not args.bare))
    except (KeyError, ValueError) as error:
        print(f"probe_shifts: {error} (runs from before the picks were saved lack them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
