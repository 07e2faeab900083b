"""Which general-knowledge probes a continual run moved, and to what.

    python bench/probe_shifts.py p1.json p2.json              # the answer frame (default)
    python bench/probe_shifts.py p1.json --bare               # the probes asked bare

Reads bench/continual.py's JSON (each run's "general_framed_picks_before/after", or the bare
"general_picks_*"), lists every probe that went from right to wrong ("lost") or wrong to right
("gained") with the option picked before and after, and counts how many of the new wrong picks
are values the run's fact domain draws from (fastcl.facts.DOMAINS): a learned value's pull on
questions it has nothing to do with, as opposed to drift of another kind.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from fastcl.benchmark import probe_shifts
from fastcl.evaluate import load_probes
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="bench/continual.py --json outputs")
    parser.add_argument("--bare", action="store_true", help="the probes asked bare instead of in the answer frame")
    args = parser.parse_args(argv)
    try:
        print(report(args.files, framed=not args.bare))
    except (KeyError, ValueError) as error:
        print(f"probe_shifts: {error} (runs from before the picks were saved lack them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
