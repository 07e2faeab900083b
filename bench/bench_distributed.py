"""Replicas over torch.distributed: bytes per step, a timed step on gloo, and the async error.

    python bench/bench_distributed.py            # prints the tables (about a minute on 2 CPU cores)
    python bench/bench_distributed.py --write    # and writes them into bench/RESULTS.md ("## Distributed")

1. Bytes per step, counted from the real patched modules of SmolLM2-135M and Llama-3-8B built
   on the meta device (no weights allocated), checked against the formula sum(d_out) * r * 4.
2. A timed step() with 2 gloo processes on loopback: the tiny test model and a randomly
   initialised model with SmolLM2-135M's shapes, against a full-gradient all-reduce of the same
   layers on the same processes.
3. The error of asynchronous mode (sync_every=N) against synchronous learning, 2 replicas with
   different traffic, on the tiny model.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from fastcl.info import cpu_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny_model / random_ids, shared with the test suite

WORLD = 2
RANKS = (8, 16, 64)


def llama_config(name: str):
    import transformers as tf

    if name == "SmolLM2-135M":
        return tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    if name == "Llama-3-8B":
        return tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256)
    raise ValueError(name)


# (d_in, d_out) of q, k, v, o, gate, up, down per decoder block, from the model cards.
SHAPES = {
    "SmolLM2-135M": (30, [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]),
    "Llama-3-8B": (32, [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336),
                        (14336, 4096)]),
}


# ----------------------------------------------------------------------------- 1. bytes
def bytes_table() -> list[dict]:
    import transformers as tf  # noqa: F401  (imported before patching on meta)

    import fastcl
    from fastcl.distributed import bytes_per_step

    rows = []
    for name in SHAPES:
        for rank in RANKS:
            with torch.device("meta"):
                model = tf.LlamaForCausalLM(llama_config(name))
            learner = fastcl.patch(model, rank=rank)
            counted = bytes_per_step(learner, WORLD)
            blocks, shapes = SHAPES[name]
            formula_sync = blocks * sum(d_out for _, d_out in shapes) * rank * 4 + 24
            formula_full = blocks * sum(d_in * d_out for d_in, d_out in shapes) * 4
            assert (counted["fastcl_sync"], counted["full_gradient"]) == (formula_sync, formula_full), (
                name, rank, counted, formula_sync, formula_full)
            rows.append({"model": name, "rank": rank, **counted})
    return rows


# ----------------------------------------------------------------------------- 2 and 3: processes
def _entry(rank, tmp):
    import torch.distributed as dist

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    result = {"timing": [time_steps(rank, "tiny llama"), time_steps(rank, "SmolLM2-135M")],
              "async": async_error(rank)}
    torch.save(result, os.path.join(tmp, f"result{rank}.pt"))
    dist.destroy_process_group()


def _median_ms(fn, repeat: int, setup=None) -> float:
    import torch.distributed as dist

    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        dist.barrier()  # both replicas start together: time the step, not the wait for the other
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_steps(rank: int, name: str) -> dict:
    import torch.distributed as dist
    import transformers as tf

    import fastcl
    from helpers import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama") if name == "tiny llama" else tf.LlamaForCausalLM(llama_config(name)).eval()
    learner = fastcl.patch(model, rank=16)
    repeat = 20 if name == "tiny llama" else 7

    def fill():
        # step() costs the same whatever the values: fill the accumulators instead of serving.
        for m in learner.modules.values():
            m.grad_B.normal_()
        learner.counters.tokens_pending = 64

    out = {"model": name, "layers": len(learner.modules)}
    learner.replicas.process_group = False
    out["local_ms"] = _median_ms(learner.step, repeat, setup=fill)
    learner.replicas.process_group = None  # the default (gloo) group
    bytes_before = learner.replicas.stats.bytes_sent
    out["sync_ms"] = _median_ms(learner.step, repeat, setup=fill)
    out["bytes_per_step"] = (learner.replicas.stats.bytes_sent - bytes_before) // repeat
    grads = [m.grad_B for m in learner.modules.values()]
    out["allreduce_ms"] = _median_ms(lambda: learner.replicas._all_reduce_sum(grads, dist.group.WORLD), repeat)
    full = torch.zeros(sum(m.in_features * m.out_features for m in learner.modules.values()))
    out["full_bytes"] = full.numel() * 4
    out["full_allreduce_ms"] = _median_ms(lambda: dist.all_reduce(full), 3 if name == "tiny llama" else 2)
    return out


def async_error(rank: int) -> list[dict]:
    """Two replicas serve different fixed texts, 16 steps with a consolidation every 8: the
    merged update and the loss on both texts, asynchronous against synchronous."""
    import fastcl
    from helpers import random_ids, tiny_model

    texts = [random_ids(batch=2, seq=16, seed=100 + r) for r in range(WORLD)]

    def loss(learner):
        with torch.no_grad():
            values = []
            for ids in texts:
                logp = learner.observe(ids, weight=0).logits.log_softmax(-1)[:, :-1]
                values.append(logp.gather(-1, ids[:, 1:, None]).neg().mean().item())
            return sum(values) / len(values)

    def run(optimizer, lr, sync_every):
        learner = fastcl.patch(tiny_model("llama"), rank=8, optimizer=optimizer, lr=lr, sync_every=sync_every)
        start = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
        for step in range(16):
            learner.observe(texts[rank])
            learner.step()
            if step % 8 == 7:
                learner.consolidate()
        delta = {n: m.weight.detach() - start[n] for n, m in learner.modules.items()}
        return delta, loss(learner)

    rows = []
    before = loss(fastcl.patch(tiny_model("llama"), rank=8))
    for optimizer, lr in (("adam", 1e-2), ("sgd", 0.5)):
        reference, sync_loss = run(optimizer, lr, None)
        norm = sum(d.pow(2).sum() for d in reference.values()).sqrt()
        rows.append({"optimizer": optimizer, "lr": lr, "sync_every": "sync", "error": 0.0, "loss": sync_loss,
                     "loss_before": before})
        for n in (1, 2, 4, 8):
            delta, async_loss = run(optimizer, lr, n)
            error = sum((delta[k] - reference[k]).pow(2).sum() for k in delta).sqrt() / norm
            rows.append({"optimizer": optimizer, "lr": lr, "sync_every": n, "error": float(error), "loss": async_loss,
                         "loss_before": before})
    return rows


def run_processes() -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(tmp,), nprocs=WORLD, join=True)
        return torch.load(os.path.join(tmp, "result0.pt"), weights_only=False)


# ----------------------------------------------------------------------------- report
def mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


def markdown(rows, results, seconds, load) -> str:
    lines = [
        "## Distributed",
        "",
        f"Command: `python bench/bench_distributed.py --write` ({seconds:.0f} s). CPU: {cpu_model()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}, gloo on loopback, {WORLD} processes, 1 thread each; load average "
        f"{load} when it started (the machine is shared).",
        "",
        "### Bytes per synchronous step, per replica",
        "",
        "Counted from the patched modules of each model built on the meta device, and checked against",
        "the formula `layers x sum(d_out) x r x 4` (every patched q, k, v, o, gate, up, down). fastcl",
        "sends one flat fp32 buffer of the d_out x r accumulators plus 16 bytes (token count and",
        "NaN/inf flag); a full-gradient all-reduce sends d_out x d_in fp32 numbers per layer (half",
        "with bf16 gradients; the ratio is unchanged if both use bf16). Both are payloads: a ring",
        "all-reduce moves 2(w-1)/w of its buffer per replica on the wire, for both. Asynchronous",
        "mode sends B and the two Adam moments (3x the buffer) once every `sync_every` steps.",
        "",
        "| model | r | layers | fastcl / step | full gradient / step | ratio | async (Adam) / sync |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['rank']} | {r['layers']} | {mb(r['fastcl_sync'])} | "
                     f"{mb(r['full_gradient'])} | {100 * r['ratio']:.2f}% | {mb(r['async_per_sync'])} |")
    lines += [
        "",
        "### A timed step, 2 gloo processes (rank 16)",
        "",
        "Median of repeated `step()` calls with the accumulators filled with random numbers (a step",
        "costs the same whatever they hold). `local` is the same step with the group switched off",
        "(the Adam update alone); `sync` is the replicated step (one all_gather of counts, one flat",
        "all_reduce, the Adam update); `all_reduce` is the flat accumulator all-reduce alone;",
        "`full-gradient all_reduce` is one all-reduce of an fp32 buffer the size of every patched",
        "weight, on the same processes. The SmolLM2 row is a randomly initialised model with",
        "SmolLM2-135M's shapes. Two processes share 2 cores with other work, so treat the absolute",
        "numbers as rough; the sizes are exact.",
        "",
        "| model | layers | bytes / step | local step | sync step | all_reduce | full-gradient bytes | full-gradient all_reduce |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in results["timing"]:
        lines.append(f"| {t['model']} | {t['layers']} | {mb(t['bytes_per_step'])} | {t['local_ms']:.2f} ms | "
                     f"{t['sync_ms']:.2f} ms | {t['allreduce_ms']:.2f} ms | {mb(t['full_bytes'])} | "
                     f"{t['full_allreduce_ms']:.1f} ms |")
    before = results["async"][0]["loss_before"]
    lines += [
        "",
        "### The error of asynchronous mode",
        "",
        "2 replicas, each serving its own fixed text (2 x 16 tokens), tiny llama, rank 8, 16 steps,",
        "consolidate() every 8. `error` is ||dW_async - dW_sync|| / ||dW_sync|| over the merged",
        "update of every patched layer; `loss` is the mean next-token loss on both replicas' texts",
        f"after learning (before: {before:.3f}). Synchronous learning equals one learner that served",
        "both texts (tests/test_distributed.py).",
        "",
        "| optimizer | lr | sync_every | error vs sync | loss after |",
        "|---|---:|---:|---:|---:|",
    ]
    for a in results["async"]:
        lines.append(f"| {a['optimizer']} | {a['lr']:g} | {a['sync_every']} | {a['error']:.3f} | {a['loss']:.3f} |")
    lines += [
        "",
        "With SGD, sync_every=1 is synchronous learning (token-weighted averaging of one local step",
        "each is one step on the summed gradient); the error grows with the steps between syncs.",
        "With Adam even sync_every=1 differs: each replica normalises its own gradient before the",
        "average. Synchronous mode is the default for that reason.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    """Replace the "## Distributed" section of RESULTS.md (or append it), leaving the rest."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Distributed\n.*?(?=^## |\Z)", re.M | re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the tables into bench/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start, load = time.perf_counter(), load_average()
    rows = bytes_table()
    results = run_processes()
    text = markdown(rows, results, time.perf_counter() - start, load)
    print(text)
    if args.write:
        write_section(text, ROOT / "bench" / "RESULTS.md")
        print(f"written to {ROOT / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
