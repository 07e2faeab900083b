"""The demo and the continual benchmark, end to end on SmolLM2-135M with a one-company stream."""

import matplotlib.image
import pytest

import fastcl
import fastcl.demo
import fastcl.evaluate
from helpers import assert_weights_unchanged, load_bench, weights_copy

pytestmark = pytest.mark.real_model


@pytest.fixture(autouse=True)
def shorter_evaluation(monkeypatch):
    """Fewer general probes and shorter texts (perplexity, anchor, gate): the same code paths in
    a fraction of the time. The full evaluation is bench/continual.py's job."""
    probes, text = fastcl.evaluate.load_probes, fastcl.evaluate.load_text
    monkeypatch.setattr(fastcl.evaluate, "load_probes", lambda *a: probes(*a)[:20])
    monkeypatch.setattr(fastcl.evaluate, "load_text", lambda name: text(name)[:1500])


def test_demo_prints_the_table_and_writes_the_plot(fresh_smollm, monkeypatch, capsys, tmp_path):
    model, tokenizer = fresh_smollm
    monkeypatch.setattr(fastcl.models, "load_default", lambda: (model, tokenizer))
    out = tmp_path / "demo.png"
    assert fastcl.demo.run_demo(seed=5, companies=1, out=str(out), checkpoints=2) == 0
    printed = capsys.readouterr().out
    for row in ("closed-book, held-out phrasings", "in-context (the ceiling)", "general-knowledge probes",
                "general-text perplexity", "recovered"):
        assert row in printed, f"the demo's table lacks {row!r}"
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    learner = model.fastcl
    assert learner.stats()["requests"] >= 4  # one company: four facts served and learned
    assert learner.stats()["consolidations"] + learner.stats()["gate_refusals"] >= 1


def test_continual_seed_reports_every_measure_and_restores_the_model(fresh_smollm):
    model, tokenizer = fresh_smollm
    original = weights_copy(model)
    continual = load_bench("continual")
    run = continual.run_seed(model, tokenizer, seed=7, companies=1, options={"rank": 8}, exact=False, rehearse=True)
    for key in ("floor", "ceiling", "after", "floor_framed", "ceiling_framed", "after_framed", "general_before",
                "general_after", "general_framed_before", "general_framed_after", "rehearsed_after",
                "rehearsed_general_after"):
        assert 0.0 <= run[key] <= 1.0, key
    # graded: a softmax share, so strictly inside (0, 1)
    assert all(0.0 < run[key] < 1.0 for key in ("probability_before", "probability_after"))
    assert run["ceiling"] > run["floor"], "the document in context should help: the stream is broken"
    assert run["perplexity_after"] > 1.0 and run["served_tokens"] > 0 and run["learn_all_forwards"] > 0
    assert run["self_generated_forwards"] == 0  # self_study is off: nothing to report apart
    # one company: the control's "other company" is itself, so it scores the held-out items again
    assert (run["swapped_before"], run["swapped_after"]) == (run["floor"], run["after"])
    # and the binding items have no other company's value to offer: the answer alone, always a hit
    assert (run["binding_floor"], run["binding_ceiling"], run["binding_after"]) == (1.0, 1.0, 1.0)
    # rehearse(): one pass over the four buffered requests in steps of replay_per_step + 1 = 4
    assert run["rehearse_steps"] == 1 and run["rehearse_forwards"] > 0 and run["rehearsed_perplexity_after"] > 1.0
    assert run["rehearsed_swapped_after"] == run["rehearsed_after"]  # the control, rescored after it
    # one company, one fact of each attribute: the attributes' scores average to the overall one
    attributes = [k[len("after["):-1] for k in run if k.startswith("after[")]
    assert attributes == ["founder", "city", "product", "year"]
    assert sum(run[f"after[{a}]"] for a in attributes) / 4 == pytest.approx(run["after"])
    assert sum(run[f"floor[{a}]"] for a in attributes) / 4 == pytest.approx(run["floor"])
    # the probes' picks, before and after, give back their accuracies
    probes = fastcl.evaluate.load_probes()  # the fixture's shorter list, as measure() saw it
    for when in ("before", "after"):
        picks = run[f"general_picks_{when}"]
        assert len(picks) == len(probes) and all(0 <= p < len(options) for p, (_, options, _) in zip(picks, probes))
        assert sum(p == answer for p, (_, _, answer) in zip(picks, probes)) / len(probes) == pytest.approx(
            run[f"general_{when}"])
        framed = run[f"general_framed_picks_{when}"]
        assert sum(p == answer for p, (_, _, answer) in zip(framed, probes)) / len(probes) == pytest.approx(
            run[f"general_framed_{when}"])
        for view in ("general", "general_framed"):  # every option's score, the picks their best
            scores = run[f"{view}_scores_{when}"]
            assert [max(range(len(row)), key=row.__getitem__) for row in scores] == run[f"{view}_picks_{when}"]
    assert not hasattr(model, "fastcl"), "run_seed must unpatch the model"
    assert_weights_unchanged(model, original, "run_seed")
    summary = continual.summarize([run, run])
    assert "  city: floor / ceiling / after / the reference learner (means), recovered" in continual.table(summary)
    # one company: no other learned value among any item's options, so the reference learner is always right
    assert run["pull_only"] == 1.0 and all(run[f"pull_only[{a}]"] == 1.0 for a in attributes)
    assert summary["after"] == (run["after"], 0.0)
    assert "fraction of the gap recovered" in continual.table(summary)
    assert "answer frame" in continual.table(summary)
    assert "probability over the options" in continual.table(summary)
    assert "self-generated data" in continual.table(summary)
    assert "after rehearse()" in continual.table(summary)
    assert "binding" in continual.table(summary)
    # with exact match, its row follows the answer probability's
    lines = continual.table({**summary, "exact_before": (0.0, 0.0), "exact_after": (0.25, 0.0)}).splitlines()
    exact_row = next(i for i, line in enumerate(lines) if "exact match, before -> after" in line)
    assert "probability over the options" in lines[exact_row - 1]


def test_one_step_reports_drift_and_learning_per_variant(fresh_smollm):
    model, tokenizer = fresh_smollm
    original = weights_copy(model)
    one_step = load_bench("one_step")
    (drift, general_drift, rows), = one_step.run(model, tokenizer, [{"rank": 8}], seed=10, n_facts=1)
    closed, gain, moved = rows[0]
    assert gain > 0.5 and closed > 0, "one learn() call should close part of a fact's context gain"
    assert abs(drift) < 1.0 and abs(general_drift) < 1.0 and len(moved) == 2
    assert drift != general_drift, "the gate's text and the perplexity text are different texts"
    assert_weights_unchanged(model, original, "one_step")


def test_diagnose_stream_scores_served_held_out_and_immediate(fresh_smollm):
    model, tokenizer = fresh_smollm
    original = weights_copy(model)
    diagnose_stream = load_bench("diagnose_stream")
    result = diagnose_stream.diagnose(model, tokenizer, seed=7, companies=1, options={"rank": 8},
                                      trajectory_every=2, rehearse=True)
    for key in ("floor", "ceiling", "after", "served_floor", "served_after", "immediate", "general_after",
                "general_framed_after"):
        assert 0.0 <= result[key] <= 1.0, key
    assert len(result["after_by_quarter"]) == 4  # 4 facts, one per quarter
    assert len(result["wrong_is_learned_value"]) == 2  # before -> after (NaN where no pick is wrong)
    assert all(0.0 < p < 1.0 for p in result["answer_probability"]) and len(result["answer_probability"]) == 2
    # --trajectory 2: the first two facts scored after two requests, all four after four, with the
    # replay draws counted per fact (steps 1-3 draw up to replay_per_step = 3 of 1, 2, 3 buffered)
    assert [c["served"] for c in result["trajectory"]] == [2, 4]
    assert [len(c["accuracy"]) for c in result["trajectory"]] == [2, 4]
    assert result["replays"] == [3, 2, 1, 0]
    assert result["trajectory"][-1]["accuracy"] == result["end_by_fact"]
    # one company: the "next" company is itself, so the swapped questions are the held-out ones
    assert result["swapped_company"] == [result["floor"], result["after"]]
    assert result["binding"] == [1.0, 1.0, 1.0]  # one company: the answer is the only option
    # --rehearse: the same run measured again after one pass over the buffer
    rehearsal = result["rehearsal"]
    assert rehearsal["steps"] == 1 and rehearsal["requests"] == 4
    assert rehearsal["answer_probability"][0] == result["answer_probability"][0]
    assert 0.0 <= rehearsal["after"] <= 1.0 and rehearsal["perplexity_after"] > 1.0
    assert not hasattr(model, "fastcl")
    assert_weights_unchanged(model, original, "diagnose")
