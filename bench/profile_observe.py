"""Where observe() spends its time on SmolLM2-135M, 2 x 128 tokens: proportions, not speeds.

    FASTCL_BENCH_THREADS=1 .venv/bin/python bench/profile_observe.py [--rows 25]
    python bench/profile_observe.py --device cuda --batch 8 --seq 512 [--backend triton]

Prints the phases of one observe() timed apart (the no-grad forward of the same model, the
forward with grad, the loss's gradient, the backward); beside them the floor, the same phases
on an unpatched copy that backpropagates the same loss gradient to its input embeddings (what
any learning from these tokens costs without fastcl: dX through every layer); and
torch.profiler's operators by self time with their share of the total (CPU time; on a GPU,
CUDA time, and CPU time beside it).
Shares stay meaningful on a loaded machine, where absolute times do not. On a GPU the model is
SmolLM2-135M's shapes with random weights in bf16 (bench/gpu_end_to_end.py; the GGUF does not
travel to a lent GPU), unless --real-weights.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import fastcl.loss
import fastcl.models
import workloads as w
from gpu_end_to_end import build
from fastcl.inputs import validate_request
from fastcl.loss import next_token_gradient


def phases(model, ids, repeats: int = 5, plain=None) -> dict[str, float]:
    """Median seconds of each phase of observe(), run by hand in the same order; with `plain` (an
    unpatched copy), the floor's phases too: its no-grad forward, and its forward, loss gradient
    and backward to the input embeddings."""
    request = validate_request(ids, None, None, 1.0, model.config.vocab_size, ids.device)
    names = ["no-grad forward", "forward with grad", "loss gradient", "backward"]
    if plain is not None:
        names += ["floor: no-grad forward", "floor: forward with grad", "floor: loss gradient", "floor: backward"]
        embeddings = plain.get_input_embeddings()(ids).detach()
    times: dict[str, list[float]] = {name: [] for name in names}

    def clock() -> float:  # GPU work is asynchronous: wait for it before reading the clock
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def learning_phases(run, inputs) -> list[float]:
        marks = [clock()]
        with torch.no_grad():
            run(**inputs)
        marks.append(clock())
        out = run(**inputs)
        marks.append(clock())
        grad, _ = next_token_gradient(out.logits, request)
        marks.append(clock())
        out.logits.backward(grad.grad)
        marks.append(clock())
        return [end - start for start, end in zip(marks, marks[1:])]

    for _ in range(repeats + 1):
        seconds = learning_phases(model, {"input_ids": ids})
        if plain is not None:
            seconds += learning_phases(plain, {"inputs_embeds": embeddings.clone().requires_grad_(True)})
        for name, value in zip(names, seconds):
            times[name].append(value)
    return {name: sorted(v[1:])[len(v) // 2] for name, v in times.items()}  # the first run warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=w.BATCH)
    parser.add_argument("--seq", type=int, default=w.SEQ)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2's shapes, random bf16 weights "
                        "(the default on a GPU, where the GGUF is not installed)")
    parser.add_argument("--real-weights", action="store_true", help="load SmolLM2 on a GPU too")
    parser.add_argument("--loss-chunk-mb", type=float, help="logits per chunk of the loss gradient, in MB "
                        f"(default {fastcl.loss.CHUNK_BYTES >> 20} on a CPU, {fastcl.loss.GPU_CHUNK_BYTES >> 20} on a GPU)")
    args = parser.parse_args()
    if args.loss_chunk_mb:
        fastcl.loss.CHUNK_BYTES = fastcl.loss.GPU_CHUNK_BYTES = int(args.loss_chunk_mb * (1 << 20))
    if os.environ.get("FASTCL_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTCL_BENCH_THREADS"]))
    if args.random_weights or (args.device != "cpu" and not args.real_weights):
        model = build("SmolLM2-135M", args.device)
    else:
        model = fastcl.models.load_default()[0].to(args.device)
    ids = w.token_batch(model.config.vocab_size, args.batch, args.seq).to(args.device)
    plain = copy.deepcopy(model).requires_grad_(False)
    _, learner = w.observing(model, ids, backend=args.backend)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    p = phases(model, ids, plain=plain)
    del plain
    forward = p["floor: no-grad forward"]  # the end-to-end benchmark's denominator: the unpatched forward
    for name, seconds in p.items():
        print(f"{name:26s} {seconds * 1e3:8.1f} ms  {seconds / forward:5.2f} x unpatched forward")
    for label, prefix in (("observe()", ""), ("floor", "floor: ")):
        extra = sum(p[prefix + n] for n in ("forward with grad", "loss gradient", "backward")) - forward
        print(f"extra cost of learning, {label:9s} (phases - unpatched forward) / unpatched forward: "
              f"{extra / forward:.2f}")
    learner.observe(ids)
    cuda = ids.is_cuda
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        learner.observe(ids)
        if cuda:
            torch.cuda.synchronize()
    # On a GPU: operators by self CUDA time, with their self CPU time beside it (host-bound
    # work shows as CPU time far above CUDA time).
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=lambda e: -self_time(e))
    total = sum(self_time(e) for e in events)
    cpu_total = sum(e.self_cpu_time_total for e in events)
    print(f"\nobserve() under the profiler: {total / 1e3:.1f} ms of self {'CUDA' if cuda else 'CPU'} time"
          + (f", {cpu_total / 1e3:.1f} ms of self CPU time" if cuda else ""))
    for e in events[:args.rows]:
        cpu = f"  cpu {e.self_cpu_time_total / 1e3:8.1f} ms" if cuda else ""
        print(f"{100 * self_time(e) / total:5.1f}%  {self_time(e) / 1e3:8.1f} ms{cpu}  {e.count:5d}x  {e.key[:80]}")


if __name__ == "__main__":
    main()
