"""On a GPU, end to end: is learning from served tokens cheap there too?

The model is randomly initialised with a real model's shapes (no weights are downloaded; speed
does not depend on their values), in bf16. Over the same batch of random tokens, one after the
other in one run, timed with CUDA events (median of --repeat after --warmup):

    forward          the plain no-grad forward of the unpatched model (serving alone)
    observe[b]       learner.observe() with backend b (triton, cuda, torch): serving plus learning
    peft_step        a PEFT LoRA r=16 training step over the same tokens (forward, backward, AdamW)
    full_step        a full fine-tuning step (only where it fits: --full-step)

and greedy generation (tokens/s) with the unpatched model, a patched one with a live adapter
(B != 0, each backend) and one right after consolidation. It prints a markdown table of the
ratios the CPU benchmark reports (bench/report.py) and writes the numbers as JSON with --json.

    python bench/gpu_end_to_end.py --model SmolLM2-135M --batch 8 --seq 512 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as w  # noqa: E402
from bench_distributed import llama_config  # noqa: E402 (the shapes, from the model cards)

from fastcl.ops import backends  # noqa: E402


def median_ms(fn, warmup: int, repeat: int, cuda: bool = True) -> float:
    """Median wall time of fn() in ms: CUDA events around GPU work, the host clock otherwise
    (--device cpu only checks that this script runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def step_ms(observe, step, repeat: int, cuda: bool) -> float:
    """Median time of step() alone, each after an untimed observe() that fills the accumulators.
    (Timing observe + step and subtracting observe's median gave negative figures on an H200:
    the difference of two host-bound medians is noise.)"""
    times = []
    for _ in range(repeat + 1):
        observe()
        times.append(median_ms(step, 0, 1, cuda))
    return statistics.median(times[1:])  # the first step builds the optimizer's state


def build(name: str, device: str) -> torch.nn.Module:
    import transformers as tf

    with torch.device(device):
        model = tf.LlamaForCausalLM(llama_config(name))
    return model.to(torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M", choices=["SmolLM2-135M", "Llama-3-8B"],
                        help="Llama-3-8B: 16 GB a copy, and the generation part holds five copies at once "
                             "(an H200, without --full-step)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--full-step", action="store_true", help="also time a full fine-tuning step (AdamW state: 16 B/param)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cpu only checks that the script runs (tiny sizes)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_end_to_end.py needs a CUDA device (bench/test_bench_end_to_end.py is the CPU benchmark)")

    torch.manual_seed(0)
    cuda = args.device == "cuda"
    time_ms = lambda fn, warmup=args.warmup, repeat=args.repeat: median_ms(fn, warmup, repeat, cuda)  # noqa: E731
    base = build(args.model, args.device)
    ids = w.token_batch(base.config.vocab_size, args.batch, args.seq).to(args.device)
    usable = [b for b in ("triton", "cuda", "torch") if backends.status(b, args.device)[0]]
    skipped = {b: backends.status(b, args.device)[1] for b in ("triton", "cuda") if b not in usable}
    ms = {}
    ms["forward"] = time_ms(w.serving(copy.deepcopy(base), ids).run)
    learner = None
    for backend in usable:
        side, learner = w.observing(copy.deepcopy(base), ids, backend=backend)
        ms[f"observe[{backend}]"] = time_ms(side.run)
        ms[f"step[{backend}]"] = step_ms(side.run, learner.step, args.repeat, cuda)
        del side
    peft_model = w.peft_lora(copy.deepcopy(base), w.leaf_names(learner))
    ms["peft_step"] = time_ms(w.training_step(peft_model, ids).run)
    del peft_model
    if args.full_step:
        ms["full_step"] = time_ms(w.training_step(w.full_fine_tuning(copy.deepcopy(base)), ids).run)
    if cuda:
        torch.cuda.empty_cache()

    prompt = ids[:1, :32]
    tokens_per_s = {}
    variants = {"unpatched": base}
    for backend in usable:
        variants[f"live_adapter[{backend}]"] = w.observing(copy.deepcopy(base), prompt, backend=backend)[0].model
    merged = w.observing(copy.deepcopy(base), prompt, backend=usable[0])[1]
    merged.consolidate()
    variants["consolidated"] = merged.model
    if "torch" in usable:  # what fastcl._serving's C++ decode closure wins over the Python one
        variants["live_adapter[torch, Python closure]"] = variants["live_adapter[torch]"]
    for name, model in variants.items():
        run = w.generation(model, prompt, args.new_tokens)
        if name.endswith("Python closure]"):
            run = w.with_decode_closure(run, model, "python")
        tokens_per_s[name] = args.new_tokens / (time_ms(run, 1, max(3, args.repeat // 3)) / 1e3)

    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, model=args.model,
                  batch=args.batch, seq=args.seq, dtype="bfloat16", rank=w.RANK, ms=ms,
                  generate_tokens_per_s=tokens_per_s, new_tokens=args.new_tokens, skipped_backends=skipped,
                  adapter_flop_share=w.adapter_flop_share(variants[f"live_adapter[{usable[0]}]"], learner))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(markdown(result))


def markdown(r: dict) -> str:
    ms, fwd = r["ms"], r["ms"]["forward"]
    lines = [f"{r['model']} shapes (random weights), {r['batch']}x{r['seq']} tokens, bf16, rank {r['rank']}, "
             f"{r['device']}, torch {r['torch']}",
             "", "| workload | ms | / forward | extra over forward | peft_step / extra |", "|---|---:|---:|---:|---:|"]
    for name, t in ms.items():
        extra = t - fwd
        ratio = f"{ms['peft_step'] / extra:.2f}" if name.startswith("observe") and extra > 0 else ""
        extra_text = f"{extra / fwd:.2f}" if name.startswith("observe") else ""
        lines.append(f"| {name} | {t:.2f} | {t / fwd:.2f} | {extra_text} | {ratio} |")
    base = r["generate_tokens_per_s"]["unpatched"]
    lines += ["", f"Greedy generation, {r['new_tokens']} new tokens, batch 1 (adapter FLOP share "
              f"{100 * r['adapter_flop_share']:.2f}%):", "", "| variant | tokens/s | overhead |", "|---|---:|---:|"]
    for name, tps in r["generate_tokens_per_s"].items():
        lines.append(f"| {name} | {tps:.1f} | {100 * (base / tps - 1):+.1f}% |")
    if r["skipped_backends"]:
        lines += ["", "Backends not run: " + "; ".join(f"{b}: {why}" for b, why in r["skipped_backends"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
