"""The benchmark's fact stream: deterministic, and evaluation phrasings never served."""

import subprocess
import sys

from fastcl import facts as F
from fastcl.evaluate import load_probes, load_text


def test_stream_is_deterministic_across_processes():
    code = "from fastcl import facts as F; print([(f.company, f.value, f.options) for f in F.fact_stream(6, seed=3)])"
    outputs = {
        subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True,
                       text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_facts_are_well_formed():
    facts = F.fact_stream(20, seed=0)
    assert len(facts) == 80 and len({f.company for f in facts}) == 20
    for f in facts:
        assert f.options[f.answer_index] == f.value and len(set(f.options)) == 5
        assert f.value in f.document and f.company in f.document
        assert f.company in f.served_question


def test_evaluation_phrasings_are_never_served():
    served = {q for qs in F.SERVED_QUESTIONS.values() for q in qs}
    held_out = {q for qs in F.EVAL_QUESTIONS.values() for q in qs}
    assert not served & held_out
    for f in F.fact_stream(20, seed=1):
        assert f.served_question not in f.eval_questions


def test_guard_data_is_disjoint_from_evaluation_data():
    """The anchor text trains the forgetting guard; the general text and probes measure
    forgetting. No sentence may be shared."""
    anchor = {s.strip() for s in load_text("anchor_text.txt").split(".") if len(s.strip()) > 20}
    general = {s.strip() for s in load_text("general_text.txt").split(".") if len(s.strip()) > 20}
    assert not anchor & general
    probes = load_probes()
    assert len(probes) >= 100
    assert all(0 <= answer < len(options) for _, options, answer in probes)
