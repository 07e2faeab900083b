"""Turn a pytest-benchmark JSON from bench/ into markdown tables of ratios.

    .venv/bin/python bench/report.py bench/last-run.json                 # print
    .venv/bin/python bench/report.py bench/last-run.json --append bench/RESULTS.md --title "..."
    .venv/bin/python bench/report.py bench/last-run.json --full           # every op-level case

Ratios come from medians measured in the same run. The issue's targets are printed beside each
ratio; the header describes the machine (CPU model from /proc/cpuinfo, threads, load average).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

SMOLLM2 = {(576, 576), (576, 192), (576, 1536), (1536, 576)}
MB = 1e6


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _yes_no(flag) -> str:
    return "?" if flag is None else ("yes" if flag else "no")


def header(run: dict) -> str:
    m = run.get("machine_info", {})
    f = m.get("fastcl", {})
    commit = run.get("commit_info", {})
    device = f.get("gpu") or f"{f.get('cpu_model', m.get('cpu', {}).get('brand_raw', '?'))}"
    lines = [
        f"- Machine: {device}, {f.get('cpu_count', '?')} cores, torch {f.get('torch', '?')} "
        f"({f.get('cpu_capability', '?')}, native bf16 {_yes_no(f.get('cpu_native_bf16'))}), "
        f"**{f.get('torch_threads', '?')} torch threads**",
        f"- Load average (1/5/15 min) at start {_load(f.get('loadavg_start'))}, at end {_load(f.get('loadavg_end'))}",
        f"- Run {run.get('datetime', '?')}, commit {commit.get('id', '?')[:10]}"
        f"{' (with uncommitted changes)' if commit.get('dirty') else ''}",
    ]
    return "\n".join(lines)


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "?"


def by_extra(run: dict, key: str) -> dict[str, dict]:
    """Benchmarks that carry extra_info[key], by that value."""
    return {b["extra_info"][key]: b for b in run["benchmarks"] if key in b.get("extra_info", {})}


def median(bench: dict) -> float:
    return bench["stats"]["median"]


def end_to_end(run: dict) -> str:
    e = by_extra(run, "workload")
    needed = ("forward", "observe", "peft_step", "full_step")
    if not all(k in e for k in needed):
        return ""
    t = {k: median(b) for k, b in e.items()}
    fwd, obs, peft, full = (t[k] for k in needed)
    extra = obs - fwd
    saved = {k: b["extra_info"]["saved_activation_bytes"] for k, b in e.items()
             if "saved_activation_bytes" in b["extra_info"]}
    info = e["observe"]["extra_info"]
    tokens = info["tokens"]
    rows = [
        "| workload | median | / forward | saved activations |",
        "|---|---:|---:|---:|",
    ]
    for k in ("forward", "observe", "observe_fp32", "peft_step", "full_step", "step"):
        if k not in t:
            continue
        saved_cell = f"{saved[k] / MB:.1f} MB" if k in saved else "-"
        rows.append(f"| {k} | {t[k] * 1e3:.1f} ms | {t[k] / fwd:.2f} | {saved_cell} |")
    kv = info["kv_cache_bytes_per_token"]
    state = info["state_bytes"]
    lines = [
        f"SmolLM2-135M, {tokens} tokens ({_shape(run)}), medians of one run:",
        "",
        *rows,
        "",
        "| measure | value | target (issue 6) |",
        "|---|---:|---|",
        f"| extra cost of learning (observe - forward) / forward | {extra / fwd:.2f} | <= 1.3 (goal 1.1) |",
        f"| offline PEFT step / (observe - forward) | {peft / extra:.2f} | >= 2.0 |",
        *([f"| the same two with fp32 input gradients (observe_fp32) | {(t['observe_fp32'] - fwd) / fwd:.2f}, "
           f"{peft / (t['observe_fp32'] - fwd):.2f} | |"] if "observe_fp32" in t else []),
        f"| input gradients of observe (backward_dtype default) | {info.get('input_gradient_dtype', '?')} | |",
        f"| full fine-tuning step / (observe - forward) | {full / extra:.2f} | |",
        f"| saved activations, observe / PEFT | {saved['observe'] / saved['peft_step']:.2f} "
        f"({saved['observe'] / MB:.0f} / {saved['peft_step'] / MB:.0f} MB) | <= 0.6 |",
        f"| saved activations per token: observe, PEFT, full | {saved['observe'] / tokens / 1e3:.0f}, "
        f"{saved['peft_step'] / tokens / 1e3:.0f}, {saved['full_step'] / tokens / 1e3:.0f} kB | |",
    ]
    if "step" in t:
        lines.append(f"| step() (Adam on the fast weights) / forward | {t['step'] / fwd:.3f} | once per many observe() |")
    lines += [
        f"| learner state per decoder layer (B, accumulator, A, Adam moments) | "
        f"{info['state_bytes_per_layer'] / MB:.2f} MB | constant in tokens |",
        f"| KV cache per token (all {info['decoder_layers']} layers) | {kv / 1e3:.1f} kB | grows with tokens |",
        f"| whole learner state = KV cache of | {state / kv:.0f} tokens | |",
    ]
    return "\n".join(lines)


def _shape(run: dict) -> str:
    for b in run["benchmarks"]:
        group = b.get("group") or ""
        if group.startswith("end_to_end"):
            return group.split()[2]
    return "?"


def generation(run: dict) -> str:
    """From the interleaved generation benchmark: each model's median round, and its overhead as
    the median over rounds of its time against the unpatched model's in the same round."""
    bench = next((b for b in run["benchmarks"] if "generation_seconds" in b.get("extra_info", {})), None)
    if bench is None:
        return ""
    info = bench["extra_info"]
    seconds, share = info["generation_seconds"], info["adapter_flop_share"]
    targets = {"unpatched": "", "live_adapter": f"<= {100 * share + 3:.1f}% (FLOP share {100 * share:.1f}% + 3 points)",
               "consolidated": "<= 1%", "as_loaded": "(the unpatched model as loaded, not a copy: placement only)"}
    rows = [f"Greedy generation of {info['new_tokens']} tokens after a {info['prompt_tokens']}-token prompt, the "
            f"{len(seconds)} models in alternating rounds ({len(seconds['unpatched'])}); overhead = median over rounds of "
            "time / unpatched time in the same round:", "",
            "| model | tokens/s (median round) | overhead | target |", "|---|---:|---:|---|"]
    for name, times in seconds.items():
        ratios = [t / u for t, u in zip(times, seconds["unpatched"])]
        rows.append(f"| {name} | {info['new_tokens'] / statistics.median(times):.1f} | "
                    f"{100 * (statistics.median(ratios) - 1):+.1f}% | {targets.get(name, '')} |")
    return "\n".join(rows)


def op_level(run: dict, full: bool) -> str:
    cases: dict[tuple, dict[str, float]] = defaultdict(dict)
    shares = {}
    for b in run["benchmarks"]:
        p = b.get("params") or {}
        if "provider" not in p:
            continue
        key = (p["mode"], p["d_in"], p["d_out"], p["r"], p["M"])
        cases[key][p["provider"]] = median(b)
        shares[key] = b["extra_info"].get("adapter_flop_share", float("nan"))
    if not cases:
        return ""
    gpu = [p for p in ("fastcl_triton", "fastcl_cuda") if any(p in c for c in cases.values())]
    return "\n\n".join(_op_level_for(cases, shares, fast, full) for fast in (gpu or ["fastcl_torch"]))


def _op_level_for(cases: dict, shares: dict, fast: str, full: bool) -> str:
    """The op-level table of one fastcl provider against the baselines run beside it."""
    summary: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    detail = [f"| mode | shape | r | M | {fast} / linear - 1 | FLOP share | peft / {fast} | compiled / {fast} "
              "| custom op / fastcl_torch |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(cases, key=lambda k: (k[0], (k[1], k[2]) in SMOLLM2, k[1], k[2], k[3], k[4])):
        c = cases[key]
        if fast not in c:
            continue
        mode, d_in, d_out, r, M = key
        family = "SmolLM2-135M" if (d_in, d_out) in SMOLLM2 else "Llama-3-8B"
        ratios = {
            "overhead": c[fast] / c["linear"] if "linear" in c else float("nan"),
            "peft": c["peft"] / c[fast] if "peft" in c else float("nan"),
            "compiled": c["compiled_reference"] / c[fast] if "compiled_reference" in c else float("nan"),
            "op": c["fastcl_torch_op"] / c["fastcl_torch"] if "fastcl_torch_op" in c and "fastcl_torch" in c
            else float("nan"),
        }
        for name, value in ratios.items():
            summary[(mode, family, M)][name].append(value)
        summary[(mode, family, M)]["share"].append(shares[key])
        detail.append(f"| {mode} | {d_in}x{d_out} | {r} | {M} | {100 * (ratios['overhead'] - 1):+.1f}% | "
                      f"{100 * shares[key]:.1f}% | {ratios['peft']:.2f} | {ratios['compiled']:.2f} | {ratios['op']:.2f} |")
    lines = [
        f"Geometric means over the shapes and ranks run in each row; `{fast} / linear - 1` is the cost "
        "over nn.Linear, to compare with the adapter's FLOP share r (d_in + d_out) / (d_in d_out); "
        f"`peft / {fast}` above 1 means fastcl is faster than PEFT LoRA; `compiled` is the reference "
        "under torch.compile; `custom op / fastcl_torch` is the registered torch.library op (what "
        "torch.compile calls) over the eager path that bypasses its dispatch.",
        "",
        f"| mode | model | M | cases | {fast} / linear - 1 | mean FLOP share | peft / {fast} | compiled / {fast} "
        "| custom op / fastcl_torch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (mode, family, M), v in sorted(summary.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        lines.append(f"| {mode} | {family} | {M} | {len(v['share'])} | {100 * (_geomean(v['overhead']) - 1):+.1f}% | "
                     f"{100 * sum(v['share']) / len(v['share']):.1f}% | {_geomean(v['peft']):.2f} | "
                     f"{_geomean(v['compiled']):.2f} | {_geomean(v['op']):.2f} |")
    if full:
        lines += ["", *detail]
    return "\n".join(lines)


def _geomean(values) -> float:
    values = [v for v in values if v == v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def report(run: dict, full: bool = False, title: str | None = None) -> str:
    parts = [f"## {title}" if title else "", header(run)]
    for name, body in (("End to end", end_to_end(run)), ("Generation", generation(run)),
                       ("Op level", op_level(run, full))):
        if body:
            parts += [f"### {name}", body]
    return "\n\n".join(p for p in parts if p) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="a file written by pytest --benchmark-json")
    parser.add_argument("--append", type=Path, help="append the report to this markdown file")
    parser.add_argument("--title", help="a section title (## ...)")
    parser.add_argument("--full", action="store_true", help="also list every op-level case")
    args = parser.parse_args(argv)
    text = report(load(args.json), args.full, args.title)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    print(text, end="")


if __name__ == "__main__":
    main()
