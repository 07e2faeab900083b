"""SmolLM2-135M on the CPU, end to end: is learning from served tokens cheap?

Over the same 2 x 128 tokens, one after the other in one run:

    forward     the plain no-grad forward of the unpatched model (serving alone)
    observe     learner.observe(): the same forward, plus learning from it (rank 16), defaults
    observe_fp32  the same with backward_dtype=None: input gradients in fp32 too (fastcl.precision;
                the default runs them in bf16 on CPUs with native bf16, elsewhere the two are one)
    peft_step   a PEFT LoRA r=16 training step (forward with labels, backward, AdamW step)
    full_step   a full fine-tuning step (the same, every parameter trained)
    step        learner.step(): Adam on the fast weights, once per many observe() calls

and greedy generation with the unpatched model, the patched one with a live adapter (B != 0),
and the patched one right after consolidation. Each benchmark's extra_info carries what the
report needs besides time: saved-activation bytes, state and KV-cache bytes, the adapter's FLOP
share. bench/report.py turns the JSON into the ratios the issue asks for:

    FASTCL_BENCH_THREADS=1 .venv/bin/pytest bench/test_bench_end_to_end.py \
        --benchmark-json=bench/last-run.json
    .venv/bin/python bench/report.py bench/last-run.json
"""

from __future__ import annotations

import copy
import itertools
import os
import time

import pytest
import torch

import fastcl.models
import workloads as w

pytestmark = pytest.mark.real_model

ROUNDS = int(os.environ.get("FASTCL_BENCH_ROUNDS", "5"))
NEW_TOKENS = 32
GROUP = f"end_to_end SmolLM2-135M {w.BATCH}x{w.SEQ} tokens"


@pytest.fixture(scope="module")
def smollm():
    try:
        return fastcl.models.load_default()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"the default model is not installed: {exc}")


@pytest.fixture(scope="module")
def sides(smollm):
    """Four copies of the model, one per workload, all reading the same tokens."""
    model, _ = smollm
    ids = w.token_batch(model.config.vocab_size)
    observe, learner = w.observing(copy.deepcopy(model), ids)
    out = {
        "forward": w.serving(copy.deepcopy(model), ids),
        "observe": observe,
        "observe_fp32": w.observing(copy.deepcopy(model), ids, backward_dtype=None)[0],
        "peft_step": w.training_step(w.peft_lora(copy.deepcopy(model), w.leaf_names(learner)), ids),
        "full_step": w.training_step(w.full_fine_tuning(copy.deepcopy(model)), ids),
    }
    return out, learner, ids


@pytest.mark.parametrize("workload", ["forward", "observe", "observe_fp32", "peft_step", "full_step"])
def test_end_to_end(benchmark, sides, workload):
    by_name, learner, ids = sides
    side = by_name[workload]
    benchmark.group = GROUP
    benchmark.extra_info.update(
        workload=workload,
        tokens=ids.numel(),
        threads=torch.get_num_threads(),
        # Counted on one extra call, outside the timing (see workloads.saved_activation_bytes).
        saved_activation_bytes=w.saved_activation_bytes(side.run, side.model),
    )
    if workload == "observe":
        learner.step()  # so the optimizer holds its state: the bytes below are those of a live learner
        held = learner.stats()["bytes_held"]
        layers = side.model.config.num_hidden_layers
        benchmark.extra_info.update(
            state_bytes=held["total"] - held["rollback"],
            state_bytes_per_layer=(held["total"] - held["rollback"]) / layers,
            state_breakdown=held,
            decoder_layers=layers,
            patched_layers=len(learner.modules),
            kv_cache_bytes_per_token=w.kv_cache_bytes_per_token(side.model),
            input_gradient_dtype=str(next(iter(learner.modules.values())).dx_dtype or "activations' own"),
        )
    benchmark.pedantic(side.run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def test_learner_step(benchmark, sides):
    """step() once per many observe() calls: its cost is amortised over the tokens between steps."""
    by_name, learner, _ = sides
    observe = by_name["observe"].run
    benchmark.group = GROUP
    benchmark.extra_info.update(workload="step", threads=torch.get_num_threads())

    def stepped():
        assert learner.step(), "nothing was accumulated: the benchmark would time an empty step"

    def accumulate():
        observe()  # untimed: step() needs accumulated tokens

    benchmark.pedantic(stepped, setup=accumulate, rounds=ROUNDS, iterations=1, warmup_rounds=0)


@pytest.fixture(scope="module")
def generators(smollm):
    model, tokenizer = smollm
    ids = w.token_batch(model.config.vocab_size)
    # The unpatched side is a deep copy made beside the other two, so all three hold their
    # tensors the same way; the loaded model's come from one GGUF conversion. It is timed too
    # ("as_loaded"), so the report shows what that placement alone does in the same run.
    unpatched = copy.deepcopy(model)
    live, learner = w.learned_copy(model, ids, consolidate=False)
    merged, _ = w.learned_copy(model, ids, consolidate=True)
    prompt = tokenizer(w.PROMPT, return_tensors="pt")["input_ids"]
    share = w.adapter_flop_share(live, learner)
    return {"unpatched": unpatched, "live_adapter": live, "consolidated": merged, "as_loaded": model}, prompt, share


GENERATION_VARIANTS = ("unpatched", "live_adapter", "consolidated", "as_loaded")
GENERATION_ROUNDS = 15


def test_generate(benchmark, generators):
    """The models in alternating rounds (the order rotates every round), so that a drift of
    the machine's speed shows in all of them alike: a generation overhead of a few points is what is
    judged here, and separate benchmarks a minute apart differed by as much. The timed figure is
    one round of all of them; extra_info keeps each one's seconds per round for the report."""
    models, prompt, share = generators
    runs = {name: w.generation(models[name], prompt, NEW_TOKENS) for name in GENERATION_VARIANTS}
    seconds = {name: [] for name in GENERATION_VARIANTS}
    rounds = itertools.count()

    def one_round():
        shift = next(rounds) % len(GENERATION_VARIANTS)
        for name in GENERATION_VARIANTS[shift:] + GENERATION_VARIANTS[:shift]:
            start = time.perf_counter()
            out = runs[name]()
            seconds[name].append(time.perf_counter() - start)
            assert out.shape[1] == prompt.shape[1] + NEW_TOKENS, "generation stopped early: tokens/s would be wrong"

    one_round()  # warm-up, not recorded
    for times in seconds.values():
        times.clear()
    benchmark.group = f"generate SmolLM2-135M {NEW_TOKENS} tokens"
    # Single rounds' ratios spread over about +-5 points here: the median of 15 is what is judged.
    benchmark.pedantic(one_round, rounds=max(ROUNDS, GENERATION_ROUNDS), iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(generation_seconds=seconds, new_tokens=NEW_TOKENS, prompt_tokens=prompt.shape[1],
                                adapter_flop_share=share, threads=torch.get_num_threads())
