"""Where observe() spends its time on SmolLM2-135M, 2 x 128 tokens: proportions, not speeds.

    FASTCL_BENCH_THREADS=1 .venv/bin/python bench/profile_observe.py [--rows 25]

Prints the phases of one observe() timed apart (the no-grad forward of the same model, the
forward with grad, the loss's gradient, the backward) and torch.profiler's operators by self
CPU time with their share of the total. Shares stay meaningful on a loaded machine, where
absolute times do not.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import fastcl.models
import workloads as w
from fastcl.inputs import validate_request
from fastcl.loss import next_token_gradient


def phases(model, ids, repeats: int = 5) -> dict[str, float]:
    """Median seconds of each phase of observe(), run by hand in the same order."""
    request = validate_request(ids, None, None, 1.0, model.config.vocab_size, ids.device)
    times: dict[str, list[float]] = {"no-grad forward": [], "forward with grad": [], "loss gradient": [], "backward": []}
    for _ in range(repeats + 1):
        marks = [time.perf_counter()]
        with torch.no_grad():
            model(input_ids=ids)
        marks.append(time.perf_counter())
        out = model(input_ids=ids)
        marks.append(time.perf_counter())
        grad, _ = next_token_gradient(out.logits, request)
        marks.append(time.perf_counter())
        out.logits.backward(grad.grad)
        marks.append(time.perf_counter())
        for name, start, end in zip(times, marks, marks[1:]):
            times[name].append(end - start)
    return {name: sorted(v[1:])[len(v) // 2] for name, v in times.items()}  # the first run warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    args = parser.parse_args()
    if os.environ.get("FASTCL_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTCL_BENCH_THREADS"]))
    model, _ = fastcl.models.load_default()
    ids = w.token_batch(model.config.vocab_size)
    _, learner = w.observing(model, ids)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    p = phases(model, ids)
    for name, seconds in p.items():
        print(f"{name:18s} {seconds * 1e3:8.1f} ms  {seconds / p['no-grad forward']:5.2f} x forward")
    learner.observe(ids)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        learner.observe(ids)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nobserve() under the profiler: {total / 1e3:.1f} ms of self CPU time")
    for e in events[:args.rows]:
        print(f"{100 * e.self_cpu_time_total / total:5.1f}%  {e.self_cpu_time_total / 1e3:8.1f} ms  {e.count:5d}x  {e.key[:80]}")


if __name__ == "__main__":
    main()
