"""Benchmark scripts that CI cannot run for real (they need a GPU) still run here, at toy sizes,
so that they do not rot between the sessions that are lent one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_weights_unchanged, load_bench, tiny_model, weights_copy

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_end_to_end_runs_on_the_cpu_at_toy_sizes(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_end_to_end.py"), "--device", "cpu", "--batch", "1", "--seq", "8",
         "--new-tokens", "2", "--warmup", "0", "--repeat", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["ms"]) >= {"forward", "observe[torch]", "step[torch]", "peft_step"}
    # step[...] is a difference of two timings (observe+step minus observe): it can be noise.
    assert all(result["ms"][k] > 0 for k in ("forward", "observe[torch]", "peft_step"))
    assert set(result["generate_tokens_per_s"]) == {"unpatched", "live_adapter[torch]", "consolidated",
                                                    "live_adapter[torch, Python closure]"}
    assert "| observe[torch] |" in proc.stdout


def test_profile_observe_runs_with_random_weights_at_toy_sizes():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_observe.py"), "--random-weights", "--batch", "1", "--seq", "8",
         "--rows", "3"], capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for phase in ("no-grad forward", "forward with grad", "loss gradient", "backward"):
        assert phase in proc.stdout and f"floor: {phase}" in proc.stdout
    assert "extra cost of learning, observe()" in proc.stdout and "extra cost of learning, floor" in proc.stdout
    assert "observe() under the profiler" in proc.stdout and "aten::mm" in proc.stdout


def test_triton_config_sweep_runs_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "triton_config_sweep.py"), "--device", "cpu", "--rows", "7", "40",
         "--dtypes", "float32", "--workers", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    # One config a kernel under the interpreter: the decode forward at M = 7, the prefill one at
    # M = 40, the other three at both, two shapes each.
    assert len(results) == 16 and {r["result"] for r in results} == {"ok"}
    assert {r["kernel"] for r in results} == {"_fwd_prefill", "_fwd_decode", "_shrink", "_bwd", "_grad_b"}
    assert all(0 <= e < 1e-4 for r in results for e in r["errors"].values())


def test_generation_bounds_runs_its_variants_and_restores_the_class():
    """The diagnosis script (it swaps FastLinear.forward for two of its variants) runs every
    variant at a toy length and prints its line."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "generation_bounds.py"), "--variant", "merged", "lean_python", "python_closure",
         "aten_closure", "live", "--rounds", "1", "--new-tokens", "1"],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for variant in ("merged", "lean_python", "python_closure", "aten_closure", "live"):
        assert any(line.startswith(variant) and "against unpatched" in line for line in proc.stdout.splitlines())
    assert "merged copies built in" in proc.stdout


def test_diagnose_stream_compares_saved_runs(tmp_path):
    def row(seed, recovered, probability):
        return json.dumps({"options": {"rank": 16}, "seed": seed, "recovered": recovered,
                           "answer_probability": [0.2, probability], "general_after": 0.45, "perplexity_after": 15.5})

    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    ours.write_text("\n".join(["not json: a progress line", row(14, 0.30, 0.40), row(15, 0.20, 0.30),
                               row(99, 0.9, 0.9)]))
    theirs.write_text("\n".join([row(15, 0.10, 0.35), row(14, 0.25, 0.30)]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "diagnose_stream.py"), "--compare", str(ours),
                           str(theirs)], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "streams [14, 15]" in proc.stdout, "only streams in both files are paired"
    recovered = next(line for line in proc.stdout.splitlines() if "recovered" in line)
    assert "+0.0750" in recovered and "+0.0500 +0.1000" in recovered, recovered
    probability = next(line for line in proc.stdout.splitlines() if "answer_probability" in line)
    assert "+0.0250" in probability, "pairs of [before, after] compare the afters"


def test_diagnose_stream_compare_pairs_a_stream_under_the_same_learner_seed(tmp_path):
    """A stream run under another draw of the learner (seed=N in the options) pairs only with a
    run under that draw, never with the stream's usual one."""
    def row(seed, options, recovered):
        return json.dumps({"options": options, "seed": seed, "recovered": recovered, "answer_probability": 0.3,
                           "general_after": 0.45, "perplexity_after": 15.5})

    diagnose_stream = load_bench("diagnose_stream")
    ours, theirs, usual = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl", tmp_path / "usual.jsonl"
    ours.write_text("\n".join([row(14, {"rank": 64, "seed": 1}, 0.30), row(15, {"rank": 64, "seed": 1}, 0.20)]))
    theirs.write_text("\n".join([row(14, {"rank": 16, "seed": 1}, 0.10), row(15, {"rank": 16}, 0.90)]))
    report = diagnose_stream.compare_saved(str(ours), str(theirs))
    assert "stream/learner seeds [14/1]" in report, report
    assert "+0.2000 +- nan" in next(line for line in report.splitlines() if "recovered" in line)
    usual.write_text(row(14, {"rank": 16}, 0.10))
    with pytest.raises(SystemExit, match="under the same learner seed"):
        diagnose_stream.compare_saved(str(ours), str(usual))


def test_diagnose_stream_warns_when_saved_runs_come_from_different_machines(tmp_path):
    from fastcl.info import machine

    here = machine("cpu", "auto")
    elsewhere = {**here, "cpu_capability": "ANOTHER"}

    def run(path, where):
        path.write_text(json.dumps({"options": {"rank": 16}, "seed": 14, "recovered": 0.3, "answer_probability": 0.4,
                                    "general_after": 0.45, "perplexity_after": 15.5, "machine": where}))
        return str(path)

    diagnose_stream = load_bench("diagnose_stream")
    same = diagnose_stream.compare_saved(run(tmp_path / "a", here), run(tmp_path / "b", dict(here)))
    assert "warning" not in same and "recovered" in same
    differ = diagnose_stream.compare_saved(run(tmp_path / "a", here), run(tmp_path / "b", elsewhere))
    assert differ.startswith("warning: the two runs are from different machines"), differ
    assert f"cpu_capability: {here['cpu_capability']!r} != 'ANOTHER'" in differ.splitlines()[0]
    unrecorded = diagnose_stream.compare_saved(run(tmp_path / "a", here), run(tmp_path / "b", None))
    assert "machine not recorded for theirs" in unrecorded.splitlines()[0]


def test_continual_compares_saved_runs_seed_by_seed(tmp_path):
    """--compare pairs two recipes' saved runs by seed (only seeds on both sides), prints each
    side's mean and the difference with its standard error, and refuses pairings that mislead."""
    from fastcl.info import machine

    continual = load_bench("continual")
    here = machine("cpu", "auto")
    measures = {key: 0.5 for key, _, _ in continual.COMPARED}

    def saved(name, options, runs, domain="companies", where=here):
        path = tmp_path / name
        path.write_text(json.dumps({"domain": domain, "options": options, "machine": where,
                                    "runs": [{**measures, "exact_after": None, **run} for run in runs]}))
        return str(path)

    ours = [saved("o1", {"rank": 64}, [{"seed": 1, "recovered": 0.40, "recovered[city]": 0.2}]),
            saved("o2", {"rank": 64}, [{"seed": 2, "recovered": 0.30, "recovered[city]": 0.1}])]
    baseline = [saved("b", {"rank": 16}, [{"seed": s, "recovered": r, "recovered[city]": 0.1}
                                          for s, r in ((1, 0.30), (2, 0.30), (3, 0.90))])]
    report = continual.compare_saved(ours, baseline)
    assert "seeds [1, 2]" in report.splitlines()[0] and "warning" not in report
    row = next(line for line in report.splitlines() if line.startswith("| recovered |"))
    assert row == "| recovered | 35.0 (40.0, 30.0) | 30.0 (30.0, 30.0) | +5.0 ± 5.0 (+10.0, +0.0) |", row
    assert "| recovered[city] | 15.0 (20.0, 10.0) |" in report
    assert "| exact_after |" not in report, "a measure one side did not take is left out"
    with pytest.raises(SystemExit, match="different domains"):
        continual.compare_saved(ours, [saved("p", {"rank": 16}, [{"seed": 1}], domain="people")])
    with pytest.raises(SystemExit, match="stream 1 under learner seed 1 is saved twice"):
        continual.compare_saved(ours + [ours[0]], baseline)
    with pytest.raises(SystemExit, match="options .* differs"):
        continual.compare_saved(ours + [saved("o3", {"rank": 8}, [{"seed": 3}])], baseline)
    with pytest.raises(SystemExit, match="no stream and learner seed is on both sides"):
        continual.compare_saved([saved("o4", {"rank": 64}, [{"seed": 9}])], baseline)
    elsewhere = saved("e", {"rank": 16}, [{"seed": 1}], where={**here, "cpu_native_bf16": not here["cpu_native_bf16"]})
    assert continual.compare_saved(ours, [elsewhere]).startswith("warning: the two sides are from different machines")

    # The resolved config (saved since the default changed) tells recipes apart where options cannot.
    preset, plain = {"seed": 1, "lr": 1.5e-3, "layer_options": "mlp"}, {"seed": 1, "lr": 3e-3, "layer_options": None}
    new_default = saved("n", {"rank": 16}, [{"seed": 1, "config": preset}])
    same = continual.compare_saved([saved("x", {"rank": 16, "lr": 1.5e-3}, [{"seed": 1, "config": preset}])],
                                   [new_default])
    assert same.startswith("warning: both sides ran the same learner config"), same
    assert "warning" not in continual.compare_saved([saved("y", {"rank": 16, "layer_options": None},
                                                          [{"seed": 1, "config": plain}])], [new_default])
    assert "the baseline left layer_options to the default and predates" in continual.compare_saved([new_default],
                                                                                                   baseline)
    explicit = saved("z", {"rank": 16, "layer_options": None}, [{"seed": 1}])
    assert "warning" not in continual.compare_saved([new_default], [explicit]), "its options name its recipe"
    with pytest.raises(SystemExit, match="stream 2 ran another learner config"):
        continual.compare_saved([new_default, saved("m", {"rank": 16}, [{"seed": 2, "config": plain}])], baseline)


def test_continual_compare_pairs_one_stream_under_several_learner_seeds(tmp_path):
    """Runs of one stream under other draws of the learner (--ablation seed=N) pair with the
    baseline's run under the same draw: not with the stream's usual draw, and never dropped as a
    second run of one seed. Options may differ in `seed` alone within a side."""
    from fastcl.info import machine

    continual = load_bench("continual")
    measures = {key: 0.5 for key, _, _ in continual.COMPARED}

    def saved(name, options, seed, recovered):
        path = tmp_path / name
        path.write_text(json.dumps({"domain": "companies", "options": options, "machine": machine("cpu", "auto"),
                                    "runs": [{**measures, "exact_after": None, "seed": seed, "recovered": recovered}]}))
        return str(path)

    ours = [saved("o", {"rank": 64}, 14, 0.50), saved("o1", {"rank": 64, "seed": 1}, 14, 0.20),
            saved("o2", {"seed": 2, "rank": 64}, 14, 0.40)]
    baseline = [saved("b", {"rank": 16}, 14, 0.30), saved("b1", {"rank": 16, "seed": 1}, 14, 0.10),
                saved("b9", {"rank": 16, "seed": 9}, 14, 0.90)]
    report = continual.compare_saved(ours, baseline)
    first = report.splitlines()[0]
    assert "stream/learner seeds [14/1, 14/14]" in first and "'seed'" not in first, first
    row = next(line for line in report.splitlines() if line.startswith("| recovered |"))
    assert row == "| recovered | 35.0 (20.0, 50.0) | 20.0 (10.0, 30.0) | +15.0 ± 5.0 (+10.0, +20.0) |", row
    with pytest.raises(SystemExit, match="differs from .* in more than the learner's seed"):
        continual.compare_saved(ours + [saved("o3", {"rank": 8, "seed": 3}, 14, 0.1)], baseline)
    with pytest.raises(SystemExit, match="stream 14 under learner seed 14 is saved twice"):
        continual.compare_saved(ours + [saved("o14", {"rank": 64, "seed": 14}, 14, 0.1)], baseline)


def test_continual_compare_counts_the_general_probes_each_run_lost_and_won(tmp_path):
    """--compare also counts the probes a run lost (right before, wrong after) and won, from the
    saved picks: two runs level on the score can have moved different probes."""
    from fastcl.evaluate import load_probes

    continual = load_bench("continual")
    probes = load_probes()
    answers = [answer for _, _, answer in probes]
    wrong = [(a + 1) % 4 for a in answers]
    right_then_wrong = {"general_framed_picks_before": answers, "general_framed_picks_after": wrong[:3] + answers[3:]}
    moved = continual.with_probe_moves({"seed": 1, **right_then_wrong}, probes)
    assert (moved["general_framed_lost"], moved["general_framed_won"]) == (3, 0)
    assert "general_lost" not in moved, "no bare picks saved, no count"
    won = continual.with_probe_moves({"general_picks_before": wrong[:2] + answers[2:], "general_picks_after": answers},
                                     probes)
    assert (won["general_lost"], won["general_won"]) == (0, 2)
    assert "general_framed_lost" not in continual.with_probe_moves(
        {"general_framed_picks_before": answers[:-1], "general_framed_picks_after": answers[:-1]}, probes), \
        "picks of another probe file are not counted"

    def saved(name, options, picks_after):
        path = tmp_path / name
        path.write_text(json.dumps({"domain": "companies", "options": options, "runs": [
            {"seed": 1, "recovered": 0.3, "general_framed_picks_before": answers,
             "general_framed_picks_after": picks_after}]}))
        return str(path)

    report = continual.compare_saved([saved("o", {"rank": 64}, wrong[:5] + answers[5:])],
                                     [saved("b", {"rank": 16}, answers)])
    assert "| general_framed_lost | 5.0 (5.0) | 0.0 (0.0) | +5.0 ± nan (+5.0) |" in report, report


def test_continual_reuses_the_measures_before_learning_only_for_the_same_inputs(monkeypatch, tmp_path, smollm):
    """--before-cache: a second run on the same stream, weights and scoring reads what the first
    measured; other weights, another stream or exact match on measure again; a damaged file is
    measured again, not trusted."""
    from fastcl.facts import fact_stream

    continual = load_bench("continual")
    _, tokenizer = smollm
    model = tiny_model("llama")
    calls = []

    def fake_measure(model, tokenizer, facts, *, in_context=False, **kwargs):
        calls.append(in_context)
        return {"mc": 0.9 if in_context else 0.25, "mc_hits": [in_context, True], "calls": len(calls)}

    def fake_controls(model, tokenizer, facts, seed):
        calls.append("controls")
        return continual.B.Controls.from_scores(facts, seed, 0.1, 0.2, 0.8)

    monkeypatch.setattr(continual.B, "measure", fake_measure)
    monkeypatch.setattr(continual.B.Controls, "measure", fake_controls)
    facts = fact_stream(1, seed=1)
    first = continual.measure_before(model, tokenizer, facts, 1, False, cache=str(tmp_path))
    assert len(calls) == 3 and len(list(tmp_path.glob("before-*.json"))) == 1
    again = continual.measure_before(model, tokenizer, facts, 1, False, cache=str(tmp_path))
    assert len(calls) == 3, "the same inputs were measured again"
    assert again[:2] == first[:2] and again[0]["calls"] == 1
    assert (again[2].swapped, again[2].binding, again[2].binding_ceiling) == \
        (first[2].swapped, first[2].binding, 0.8)
    continual.measure_before(model, tokenizer, fact_stream(1, seed=2), 2, False, cache=str(tmp_path))
    continual.measure_before(model, tokenizer, facts, 1, True, cache=str(tmp_path))
    assert len(calls) == 9 and len(list(tmp_path.glob("before-*.json"))) == 3
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    changed = continual.measure_before(model, tokenizer, facts, 1, False, cache=str(tmp_path))
    assert len(calls) == 12 and changed[0]["calls"] == 10, "other weights must be measured again"
    for path in tmp_path.glob("before-*.json"):
        path.write_text("{not json")
    continual.measure_before(model, tokenizer, facts, 1, False, cache=str(tmp_path))
    assert len(calls) == 15
    continual.measure_before(model, tokenizer, facts, 1, False)
    assert len(calls) == 18 and len(list(tmp_path.glob("*.tmp"))) == 0


def test_continual_records_the_machine_and_its_input_gradients(monkeypatch, tmp_path, capsys):
    """Every continual run names the CPU's ISA and the input gradients' dtype the recipe resolved
    to (bf16 on CPUs with native bf16 by default): the same seed learns differently across them."""
    continual = load_bench("continual")
    monkeypatch.setattr(continual.fastcl.models, "load_default", lambda device: (None, None))
    monkeypatch.setattr(continual, "run_seed", lambda *args, **kwargs: {"seed": 1})
    monkeypatch.setattr(continual, "summarize", lambda runs: {})
    monkeypatch.setattr(continual, "table", lambda summary: "")
    for setting, dtype in (("null", "float32"), ('"bfloat16"', "bfloat16")):
        out = tmp_path / f"{dtype}.json"
        assert continual.main(["--seeds", "1", "--json", str(out), "--ablation", f"backward_dtype={setting}"]) == 0
        where = json.loads(out.read_text())["machine"]
        assert where["input_gradients"] == dtype and where["cpu_capability"]
        assert f"input gradients in {dtype}" in capsys.readouterr().out


def test_report_prints_both_input_gradient_precisions():
    report = load_bench("report")

    def bench(workload, seconds, **info):
        return {"extra_info": {"workload": workload, "saved_activation_bytes": 1e6, **info},
                "stats": {"median": seconds}, "group": "end_to_end SmolLM2-135M 2x128 tokens"}

    observe_info = dict(tokens=256, state_bytes=3e6, state_bytes_per_layer=1e5, decoder_layers=30,
                        kv_cache_bytes_per_token=46e3, input_gradient_dtype="torch.bfloat16")
    run = {"benchmarks": [bench("forward", 1.0), bench("observe", 2.0, **observe_info), bench("observe_fp32", 2.5),
                          bench("peft_step", 3.0), bench("full_step", 4.0)]}
    table = report.end_to_end(run)
    assert "| extra cost of learning (observe - forward) / forward | 1.00 |" in table
    assert "| offline PEFT step / (observe - forward) | 3.00 |" in table
    assert "| the same two with fp32 input gradients (observe_fp32) | 1.50, 2.00 |" in table
    assert "torch.bfloat16" in table and "| observe_fp32 | 2500.0 ms | 2.50 |" in table


def test_report_takes_generation_overhead_round_by_round():
    report = load_bench("report")
    seconds = {"unpatched": [1.0, 2.0, 1.0], "live_adapter": [1.1, 2.1, 1.05], "consolidated": [1.0, 2.02, 1.0],
               "as_loaded": [0.9, 1.9, 0.95]}
    run = {"benchmarks": [{"extra_info": {"generation_seconds": seconds, "adapter_flop_share": 0.036, "new_tokens": 32,
                                          "prompt_tokens": 9}, "stats": {"median": 4.0}}]}
    table = report.generation(run)
    # Paired, round by round (+10%, +5%, +5%): +5%, not the +10% of comparing the medians (1.1 / 1.0).
    assert "| live_adapter | 29.1 | +5.0% | <= 6.6% (FLOP share 3.6% + 3 points) |" in table
    assert "| consolidated | 32.0 | +0.0% | <= 1% |" in table
    assert "| unpatched | 32.0 | +0.0% |" in table
    assert "| as_loaded | 33.7 | -5.0% | (the unpatched model as loaded" in table and "the 4 models" in table


def test_served_answers_counts_stated_and_partly_learnable_values(smollm):
    """A value stated verbatim, one paraphrased (part of its tokens), and one missing."""
    from fastcl.facts import fact_stream

    _, tokenizer = smollm
    served_answers = load_bench("served_answers")
    products = [f for f in fact_stream(20, seed=4) if f.attribute == "product" and f.value.endswith("s")
                and " " in f.value][:3]
    texts = [f"It makes {products[0].value}.", f"It makes a {products[1].value[:-1]}.", "No idea."]
    answers = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    counts = served_answers.by_attribute(tokenizer, products, answers)
    assert set(counts) == {"product"}
    assert counts["product"]["stated"] == round(1 / 3, 3) and counts["product"]["all_tokens"] == round(1 / 3, 3)
    assert counts["product"]["some_tokens"] == round(2 / 3, 3)  # the paraphrase keeps its first word


def test_continual_serves_the_domain_it_is_given(monkeypatch, capsys):
    """--domain reaches the stream (no model needed: the stream is drawn before anything runs),
    and an unknown domain stops at the command line."""
    import torch

    continual = load_bench("continual")
    drawn = {}

    class Drawn(Exception):
        pass

    def stream(n, seed, domain):
        drawn.update(n=n, seed=seed, domain=domain)
        raise Drawn

    monkeypatch.setattr(continual, "fact_stream", stream)
    with pytest.raises(Drawn):
        continual.run_seed(torch.nn.Linear(1, 1), None, seed=4, companies=3, options={}, exact=False, domain="people")
    assert drawn == {"n": 3, "seed": 4, "domain": "people"}
    with pytest.raises(SystemExit):
        continual.main(["--domain", "pets"])
    assert "invalid choice: 'pets'" in capsys.readouterr().err
    # the development scripts take the same flag
    diagnose_stream = load_bench("diagnose_stream")
    monkeypatch.setattr(diagnose_stream, "fact_stream", stream)
    with pytest.raises(Drawn):
        diagnose_stream.diagnose(torch.nn.Linear(1, 1), None, seed=5, companies=2, options={}, domain="people")
    assert drawn == {"n": 2, "seed": 5, "domain": "people"}
    for script in (diagnose_stream, load_bench("served_answers")):
        with pytest.raises(SystemExit):
            script.main(["--domain", "pets"])
        assert "invalid choice: 'pets'" in capsys.readouterr().err


def test_probe_shifts_lists_the_probes_a_run_moved(tmp_path, capsys):
    from fastcl.evaluate import load_probes

    probe_shifts = load_bench("probe_shifts")
    probes = load_probes()
    answers = [answer for _, _, answer in probes]
    wrong = [(answer + 1) % len(options) for _, options, answer in probes]
    seville = next(i for i, (_, options, _) in enumerate(probes) if "Seville" in options)  # a people hometown
    framed_after = list(answers)
    framed_after[seville] = probes[seville][1].index("Seville")  # lost, to a value people draw from
    framed_after[0] = wrong[0]  # lost, to an ordinary distractor
    framed_before = list(answers)
    framed_before[1] = wrong[1]  # gained
    run = {"seed": 2, "general_framed_picks_before": framed_before, "general_framed_picks_after": framed_after,
           "general_picks_before": answers, "general_picks_after": answers}
    path = tmp_path / "p2.json"
    path.write_text(json.dumps({"domain": "people", "runs": [run]}))
    assert probe_shifts.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "people, seed 2: 2 lost, 1 gained; 1 of the lost now pick a people value" in out
    assert f"lost   #{seville:3d}" in out and "-> 'Seville'" in out and "gained #  1" in out
    assert probe_shifts.main([str(path), "--bare"]) == 0
    assert "0 lost, 0 gained" in capsys.readouterr().out
    path.write_text(json.dumps({"domain": "people", "runs": [{"seed": 2}]}))  # a run from before picks were saved
    assert probe_shifts.main([str(path)]) == 1
    assert "general_framed_picks_before" in capsys.readouterr().err


class WordTokenizer:
    """One token a word: enough for option lengths."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] * len(text.split())}

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [0]


def test_probe_shifts_by_length_counts_moves_by_length_and_rescores_by_total(tmp_path, capsys):
    """A probe lost to a longer option is counted so; saved scores whose per-token mean favours a
    two-word distractor while its total does not rescore to the answer."""
    from fastcl.evaluate import load_probes

    probe_shifts = load_bench("probe_shifts")
    probes = load_probes()
    lengths = probe_shifts.option_lengths(WordTokenizer(), probes, framed=True)
    index, longer = next((i, j) for i, row in enumerate(lengths) for j, n in enumerate(row)
                         if n > row[probes[i][2]])
    answers = [answer for _, _, answer in probes]
    after = list(answers)
    after[index] = longer
    scores = [[0.0 if k == answer else -5.0 for k in range(len(options))] for _, options, answer in probes]
    moved = [row[:] for row in scores]
    moved[index][probes[index][2]] = -1.0  # the answer: -1 a token
    moved[index][longer] = -0.8  # the per-token mean prefers the longer option (total -0.8 x its tokens)
    assert lengths[index][longer] * -0.8 < -1.0 * lengths[index][probes[index][2]]
    run = {"seed": 4, "general_framed_picks_before": answers, "general_framed_picks_after": after,
           "general_framed_before": 1.0, "general_framed_after": 1 - 1 / len(probes),
           "general_framed_scores_before": scores, "general_framed_scores_after": moved}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"domain": "companies", "runs": [run]}))
    out = probe_shifts.by_length([str(path)], WordTokenizer())
    assert "seed 4: lost to a longer / as long / shorter option: 1 / 0 / 0" in out
    assert "by total log-probability 1.000 -> 1.000 (per-token mean 1.000 -> 0.992)" in out
    del run["general_framed_scores_before"]
    path.write_text(json.dumps({"domain": "companies", "runs": [run]}))
    assert "by total log-probability (not saved) -> 1.000" in probe_shifts.by_length([str(path)], WordTokenizer())


def test_stream_fingerprint_repeats_and_tells_runs_apart(fresh_smollm):
    """The same prefix learned twice hashes the same; another recipe hashes differently."""
    model, tokenizer = fresh_smollm
    fingerprint = load_bench("stream_fingerprint").fingerprint
    before = weights_copy(model)
    first = fingerprint(model, tokenizer, seed=3, requests=1, options={"rank": 8})
    assert_weights_unchanged(model, before, "fingerprint")
    assert fingerprint(model, tokenizer, seed=3, requests=1, options={"rank": 8}) == first
    other = fingerprint(model, tokenizer, seed=3, requests=1, options={"rank": 8, "lr": 1e-2})
    assert other["weights"] != first["weights"] and other["answers"] == first["answers"], \
        "a larger step changes what is learned, not the first answer (served before any learning)"
    assert first["consolidations"] == 1


def test_eval_batching_finds_the_batched_measures_equal_to_one_at_a_time(monkeypatch, capsys, smollm):
    eval_batching = load_bench("eval_batching")
    monkeypatch.setattr(eval_batching.models, "load_default", lambda: smollm)
    assert eval_batching.main(["--items", "3", "--questions", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 6  # the header and five measures
    assert all("| 0 picks differ" in row for row in rows[1:5])
    assert rows[5].endswith("| 0 answers differ |") and "| 3 |" in rows[5]


def test_continual_splits_exact_match_by_attribute_and_prints_it():
    """exact_after[attribute]: the greedy answers' hits grouped like the MC items, so a fall in
    exact match can be traced to the kind of value (e.g. years) that carries it."""
    from fastcl.facts import fact_stream

    continual = load_bench("continual")
    facts = fact_stream(2, seed=3)
    hits = [f.attribute == "year" for f in facts for _ in f.eval_questions]  # only the years named
    mc = {"mc_hits": [False] * len(hits)}
    split = continual.by_attribute(facts, mc, mc, {**mc, "exact_hits": hits})
    assert split["exact_after[year]"] == 1.0 and split["exact_after[city]"] == 0.0
    assert "exact_after[city]" not in continual.by_attribute(facts, mc, mc, mc), "not measured: left out"

    class Summary(dict):  # every other measure at 0.5
        def __missing__(self, key):
            return (0.5, 0.0)

    summary = Summary(continual.summarize([{**split, "exact_before": 0.0, "exact_after": 0.25}]))
    lines = continual.table(summary).splitlines()
    exact_row = next(i for i, line in enumerate(lines) if "exact match, before -> after" in line)
    assert "year: exact match after" in " ".join(lines[exact_row + 1: exact_row + 5])


def test_exact_answers_lists_the_questions_two_runs_answered_differently(tmp_path):
    from fastcl.facts import fact_stream

    exact_answers = load_bench("exact_answers")
    asked = [(f, q) for f in fact_stream(2, seed=5) for q in f.eval_questions]

    def saved(name, named):  # the true value in the answers at `named`, something else elsewhere
        answers = [f"It is {f.value}." if i in named else "I do not know." for i, (f, _) in enumerate(asked)]
        path = tmp_path / name
        path.write_text(json.dumps({"domain": "companies", "runs": [
            {"seed": 5, "exact_after": len(named) / len(asked), "exact_after[city]": 0.5, "exact_answers_after": answers}]}))
        return str(path)

    report = exact_answers.report(saved("a", {0, 1}), saved("b", {1, 2}))
    assert "city: 0.500 vs 0.500" in report
    named = [line for line in report.splitlines() if line.startswith("  + ")]
    assert len(named) == 2, report  # questions 0 and 2, by one run each; question 1 is named by both
    assert asked[0][1] in report and asked[2][1] in report and asked[1][1] not in report
    with pytest.raises(SystemExit, match="no greedy answers saved"):
        (tmp_path / "old").write_text(json.dumps({"runs": [{"seed": 5, "exact_after": 0.1}]}))
        exact_answers.report(str(tmp_path / "old"), saved("b", {1}))


def test_replicas_stream_refuses_a_split_the_rounds_cannot_keep_and_prints_the_baseline_beside(tmp_path):
    replicas_stream = load_bench("replicas_stream")
    for argv in (["--replicas", "1"], ["--replicas", "3", "--companies", "20"]):  # 80 facts over 3
        with pytest.raises(SystemExit):
            replicas_stream.main(argv)
    saved = tmp_path / "one.json"
    saved.write_text(json.dumps({"runs": [{"seed": 7}]}))
    with pytest.raises(SystemExit):  # the baseline holds no run of the stream
        replicas_stream.main(["--seed", "41", "--baseline", str(saved)])
    run = {"seed": 41, "domain": "companies", "replicas": 2, "recovered": 0.4, "after": 0.5,
           "binding_recovered": 0.3, "exact_after": 0.25, "general_after": 0.46, "perplexity_after": 15.5,
           "gate_refusals": 0, "floor": 0.25, "ceiling": 0.875, "general_before": 0.452,
           "perplexity_before": 15.34, "requests_per_replica": 40, "serving_seconds": 300.0}
    lines = replicas_stream.table(run, {**run, "recovered": 0.398, "exact_after": None}).splitlines()
    assert "| recovered (the issue's score) | 40.0% | 39.8% |" in lines
    assert "| exact match after | 0.250 | - |" in lines
    assert "| closed-book after | 0.500 |" in replicas_stream.table(run, None).splitlines()


def test_scoring_speed_compares_two_versions_scores_and_times(tmp_path, capsys):
    scoring_speed = load_bench("scoring_speed")
    old = {"seconds": {"probes": 3.0}, "scores": {"probes": [[-1.0, -2.0], [-3.0, -1.0]]}}
    new = {"seconds": {"probes": 2.0}, "scores": {"probes": [[-1.0, -2.0], [-1.0, -3.0]]}}  # the second pick moved
    for name, saved in (("old.json", old), ("new.json", new)):
        (tmp_path / name).write_text(json.dumps(saved))
    assert scoring_speed.main(["--compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == "| probes | 2 | 3.0 | 2.0 | 1.50 | 1 picks differ, scores within 2.0e+00 |"
    with pytest.raises(SystemExit):
        scoring_speed.main(["--compare", str(tmp_path / "old.json")])
