"""Where generation with a live adapter loses its time on a CPU, and what the alternatives would
give: greedy decode on SmolLM2-135M, each variant against the unpatched model in alternating
rounds of the same process, median of the rounds.

    FASTCL_BENCH_THREADS=1 .venv/bin/python bench/generation_bounds.py [--variant ...] [--rounds 7]

Variants (the last three are bounds for diagnosis, not product code paths):
  live         the patched model with live fast weights, as served (what the benchmark times;
               its decode closure is C++ when fastcl._serving is built, fastcl.info() says)
  python_closure  live, with the torch backend's decode closure in Python (as without
               fastcl._serving): what the compiled closure wins
  aten_closure live, with fastcl._serving's fused decode loop off (its three ATen calls, as
               before the loop): what the loop wins
  copy         an unpatched deep copy: what a second model's memory placement alone changes
  lean_python  live, with FastLinear.forward cut to the serving call (no checks): the most that
               thinner Python in front of the closure could win
  merged       each layer serves F.linear(x, W + c B A) from a merged copy: no adapter work at
               all, at the price of a second copy of every patched weight, rebuilt whenever B
               changes (the rebuild time is printed too)
Each round times the unpatched model and the variants in a rotating order; the overhead is the
median over rounds of the variant's time against the unpatched model's in the same round.
live, python_closure and aten_closure are timed in the same rounds. Differences of a point or two between
runs are noise here: rerun and compare.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastcl.models
import workloads as w
from fastcl.layers import FastLinear

VARIANTS = ["live", "python_closure", "aten_closure", "copy", "lean_python", "merged"]
CLOSURES = {"python_closure": "python", "aten_closure": "aten"}  # live, decoded by another closure


def variant_model(name: str, model, live):
    """The model to time for `name`, and a function that undoes any class patch it made."""
    if name == "copy":
        return copy.deepcopy(model), lambda: None
    if name == "live" or name in CLOSURES:
        return live, lambda: None
    original = FastLinear.forward
    if name == "lean_python":
        def forward(self, x):
            return original(self, x) if torch.is_grad_enabled() else self._serving_forward(x)(x)
    else:  # merged
        start = time.perf_counter()
        with torch.no_grad():
            for module in live.modules():
                if isinstance(module, FastLinear):
                    module._merged = (module.weight_matrix() + module.delta_weight().to(module.weight.dtype)).detach()
        print(f"merged copies built in {(time.perf_counter() - start) * 1e3:.0f} ms "
              "(paid again after every step that changes B)")

        def forward(self, x):
            return original(self, x) if torch.is_grad_enabled() else F.linear(x, self._merged, self.bias)
    FastLinear.forward = forward

    def undo():
        FastLinear.forward = original
        for module in live.modules():
            module.__dict__.pop("_merged", None)
    return live, undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if os.environ.get("FASTCL_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTCL_BENCH_THREADS"]))
    model, tokenizer = fastcl.models.load_default()
    model.eval()
    live, _ = w.learned_copy(model, w.token_batch(model.config.vocab_size), consolidate=False)
    prompt = tokenizer(w.PROMPT, return_tensors="pt")["input_ids"]
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, {args.new_tokens} new tokens, "
          f"adapter FLOP share {w.adapter_flop_share(live, live.fastcl):.1%}")
    # live and the closure variants serve the same model without patching the class: timed
    # together, so their differences are measured side by side; each other variant on its own.
    together = [n for n in ["live", *CLOSURES] if n in args.variant]
    groups = ([together] if together else []) + [[n] for n in args.variant if n not in together]
    for group in groups:
        runs, undos = {"unpatched": w.generation(model, prompt, args.new_tokens)}, []
        for name in group:
            timed, undo = variant_model(name, model, live)
            undos.append(undo)
            runs[name] = w.generation(timed, prompt, args.new_tokens)
            if name in CLOSURES:
                runs[name] = w.with_decode_closure(runs[name], timed, CLOSURES[name])
        names = list(runs)
        seconds = {k: [] for k in names}
        try:
            for i in range(args.rounds + 1):  # the first round warms up
                # The order rotates: whichever runs right after another model pays for its cold caches.
                for key in names[i % len(names):] + names[:i % len(names)]:
                    start = time.perf_counter()
                    runs[key]()
                    seconds[key].append(time.perf_counter() - start)
        finally:
            for undo in undos:
                undo()
        base = seconds["unpatched"][1:]
        for name in group:
            ratio = statistics.median(t / u for t, u in zip(seconds[name][1:], base))
            print(f"{name:12s} {statistics.median(seconds[name][1:]) * 1e3:8.1f} ms against unpatched "
                  f"{statistics.median(base) * 1e3:8.1f} ms: {ratio - 1:+.1%} (median of same-round ratios)")


if __name__ == "__main__":
    main()
