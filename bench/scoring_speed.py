"""Times fastcl.evaluate's multiple-choice scoring on the benchmark's measures and on the answer
gate's questions, and saves every score, so two versions of the code can be compared: run it once
under each (PYTHONPATH pointing at a worktree of the other revision), then --compare the files.

    git worktree add /tmp/old 198185b
    PYTHONPATH=/tmp/old python bench/scoring_speed.py old.json
    python bench/scoring_speed.py new.json
    python bench/scoring_speed.py --compare old.json new.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def measure(path: str, repeats: int) -> None:
    import fastcl
    from fastcl import evaluate as E, models
    from fastcl.facts import fact_stream
    from fastcl.guard import GATE_ANSWERS, read_answers

    model, tokenizer = models.load_default()
    model.eval()
    closed = E.fact_items(fact_stream(20, seed=1), False)
    measures = {"closed-book MC": (closed, ""), "closed-book MC, answer frame": (closed, E.ANSWER_FRAME),
                "general probes": (E.load_probes(), ""),
                "the answer gate's questions": ([(q, o, 0) for q, o in read_answers(GATE_ANSWERS)], E.ANSWER_FRAME)}
    out = {"fastcl": fastcl.__file__, "seconds": {}, "scores": {}}
    for name, (items, frame) in measures.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out["scores"][name] = E.multiple_choice_scores(model, tokenizer, items, frame)
            times.append(time.perf_counter() - start)
        out["seconds"][name] = min(times)
        print(f"{name}: {len(items)} items, best of {repeats}: {min(times):.2f} s", flush=True)
    with open(path, "w") as f:
        json.dump(out, f)


def compare(old_path: str, new_path: str) -> None:
    old, new = (json.load(open(p)) for p in (old_path, new_path))
    print("| measure | items | old, s | new, s | ratio | agreement |\n|---|---:|---:|---:|---:|---|")
    for name, old_scores in old["scores"].items():
        new_scores = new["scores"][name]
        differ = max(abs(a - b) for ra, rb in zip(old_scores, new_scores) for a, b in zip(ra, rb))
        moved = sum(ra.index(max(ra)) != rb.index(max(rb)) for ra, rb in zip(old_scores, new_scores))
        o, n = old["seconds"][name], new["seconds"][name]
        print(f"| {name} | {len(old_scores)} | {o:.1f} | {n:.1f} | {o / n:.2f} | "
              f"{moved} picks differ, scores within {differ:.1e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="where to save (one file), or two saved files with --compare")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.compare:
        if len(args.files) != 2:
            parser.error("--compare takes two saved files: the old version's, then the new one's")
        compare(*args.files)
    else:
        torch.set_num_threads(args.threads)
        measure(args.files[0], args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
