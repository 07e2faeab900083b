"""The benchmark's fact stream: deterministic, and evaluation phrasings never served."""

import dataclasses
import hashlib
import math
import subprocess
import sys

import pytest

from fastcl import benchmark as B
from fastcl import facts as F
from fastcl.evaluate import load_probes, load_text
from helpers import load_bench


def test_stream_is_deterministic_across_processes():
    code = "from fastcl import facts as F; print([(f.entity, f.value, f.options) for f in F.fact_stream(6, seed=3)])"
    outputs = {
        subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True,
                       text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


@pytest.mark.parametrize("domain", sorted(F.DOMAINS))
def test_facts_are_well_formed(domain):
    facts = F.fact_stream(20, seed=0, domain=domain)
    attributes = F.DOMAINS[domain].attributes
    assert len(facts) == 80 and len({f.entity for f in facts}) == 20
    assert [f.attribute for f in facts[:4]] == list(attributes)
    for f in facts:
        assert f.options[f.answer_index] == f.value and len(set(f.options)) == 5
        assert f.value in f.document and f.entity in f.document
        assert f.entity in f.served_question and all(f.entity in q for q in f.eval_questions)
        assert "{" not in f.document + f.served_question + "".join(f.eval_questions), "an unfilled template field"


@pytest.mark.parametrize("domain", sorted(F.DOMAINS))
def test_evaluation_phrasings_are_never_served(domain):
    spec = F.DOMAINS[domain]
    assert set(spec.served_questions) == set(spec.eval_questions) == set(spec.attributes)
    served = {q for qs in spec.served_questions.values() for q in qs}
    held_out = {q for qs in spec.eval_questions.values() for q in qs}
    assert not served & held_out
    for f in F.fact_stream(20, seed=1, domain=domain):
        assert f.served_question not in f.eval_questions


def test_the_held_out_domain_shares_nothing_with_the_companies():
    """"people" checks a recipe on data it was not tuned to: no attribute, value (years aside),
    name, document or question phrasing of it may come from the companies' domain."""
    companies, people = F.DOMAINS["companies"], F.DOMAINS["people"]
    assert not set(companies.pools) & set(people.pools)
    words = [{v for pool in d.pools.values() for v in pool if not v.isdigit()} for d in (companies, people)]
    assert not words[0] & words[1]
    assert not (set(F.FIRST) | set(F.LAST)) & (set(F.PERSON_FIRST) | set(F.PERSON_LAST))
    assert not set(companies.documents) & set(people.documents)
    phrasings = [{q for qs in (d.served_questions | d.eval_questions).values() for q in qs} for d in (companies, people)]
    assert not phrasings[0] & phrasings[1]
    assert all(p[0] not in "aeiouAEIOU" for p in F.PROFESSIONS), "the documents say 'a {profession}'"


def test_the_companies_stream_is_the_one_every_result_was_reported_on():
    """bench/RESULTS.md's seeds name streams: generalising fact_stream over domains must not
    change a single company, value, option or phrasing of them."""
    digests = {seed: hashlib.sha256(repr([dataclasses.astuple(f) for f in F.fact_stream(20, seed=seed)])
                                    .encode()).hexdigest()[:16] for seed in (1, 2, 3)}
    assert digests == {1: "5ac831c937fcd1ef", 2: "5053a79ea87321d2", 3: "9e03164ce81bc354"}


def test_an_unknown_domain_is_named_in_the_error():
    with pytest.raises(ValueError, match="'pets'.*companies.*people"):
        F.fact_stream(2, domain="pets")


def test_guard_data_is_disjoint_from_evaluation_data():
    """The anchor text trains the forgetting guard and the gate text scores its gate; the general
    text and probes measure forgetting. No sentence may be shared."""
    def sentences(name):
        return {s.strip() for s in load_text(name).split(".") if len(s.strip()) > 20}

    general = sentences("general_text.txt")
    assert general and not sentences("anchor_text.txt") & general and not sentences("gate_text.txt") & general
    probes = load_probes()
    assert len(probes) >= 100
    assert all(0 <= answer < len(options) for _, options, answer in probes)


def test_wrong_picks_that_are_another_companys_learned_value_are_counted():
    """bench/diagnose_stream.py's interference measure, on stand-in picks (no model needed)."""
    diagnose_stream = load_bench("diagnose_stream")

    def city(company, value, options):
        return F.Fact(entity=company, attribute="city", value=value, document="", served_question="",
                      eval_questions=("q1", "q2"), options=options, answer_index=options.index(value))

    facts = [city("X", "Lyon", ("Lyon", "Porto", "Osaka", "Leeds", "Graz")),
             city("Y", "Porto", ("Bilbao", "Porto", "Lyon", "Cork", "Perth"))]
    # X: Porto (Y's city), Osaka (nobody's); Y: right, then Lyon (X's city). 2 of 3 wrong picks.
    assert diagnose_stream.wrong_is_learned_value(facts, [1, 2, 1, 2]) == 2 / 3
    assert diagnose_stream.per_fact_accuracy(facts, [1, 2, 1, 2]) == [0.0, 0.5]
    assert math.isnan(diagnose_stream.wrong_is_learned_value(facts, [0, 0, 1, 1]))


def test_answer_probability_is_the_answers_softmax_share_of_the_option_scores():
    from fastcl.evaluate import accuracy_of_scores, answer_probability, best_option, mean_answer_probability

    assert answer_probability([-2.0, -2.0, -2.0, -2.0], 1) == pytest.approx(0.25)
    scores = [-1.0, -3.0, -3.0]  # the answer leads by 2 nats: e^2 / (e^2 + 2)
    assert answer_probability(scores, 0) == pytest.approx(math.exp(2) / (math.exp(2) + 2))
    assert answer_probability(scores, 1) == pytest.approx(1 / (math.exp(2) + 2))
    assert best_option(scores) == 0 and best_option([-5.0, -0.5, -9.0]) == 1
    items = [("q", ("a", "b", "c"), 0), ("q", ("a", "b", "c"), 1)]
    assert accuracy_of_scores([scores, scores], items) == 0.5
    assert mean_answer_probability([scores, scores], items) == pytest.approx((math.exp(2) + 1) / (math.exp(2) + 2) / 2)


def test_paired_difference_compares_recipes_stream_by_stream():
    diagnose_stream = load_bench("diagnose_stream")
    ours = [{"recovered": 0.30, "answer_probability": [0.2, 0.40]},
            {"recovered": 0.50, "answer_probability": [0.2, 0.30]}]
    theirs = [{"recovered": 0.20, "answer_probability": [0.2, 0.35]},
              {"recovered": 0.20, "answer_probability": [0.2, 0.30]}]
    differences, mean, error = B.paired_difference(ours, theirs, "recovered")
    assert differences == pytest.approx([0.1, 0.3]) and mean == pytest.approx(0.2)
    assert error == pytest.approx(0.1)  # sd of (0.1, 0.3) is 0.1414; over sqrt(2) streams
    differences, mean, _ = B.paired_difference(ours, theirs, "answer_probability")
    assert differences == pytest.approx([0.05, 0.0])  # the afters are compared
    assert math.isnan(B.paired_difference(ours[:1], theirs[:1], "recovered")[2])
    stream = {"general_after": 0.5, "perplexity_after": 15.0}
    report = diagnose_stream.comparison([{"rank": 64}, {"rank": 16}], [[{**r, **stream} for r in ours],
                                                                      [{**r, **stream} for r in theirs]], "streams [18, 19]")
    assert report.splitlines()[0] == "{'rank': 64} minus {'rank': 16}, streams [18, 19]:"
    assert "recovered            +0.2000 +- 0.1000" in report and "+0.1000 +0.3000" in report


def test_binding_items_offer_only_the_streams_values_of_the_same_attribute():
    from fastcl.benchmark import binding_items

    facts = F.fact_stream(6, seed=3)
    items = binding_items(facts, seed=3)
    assert len(items) == sum(len(f.eval_questions) for f in facts)
    assert items == binding_items(facts, seed=3), "seeded: before and after must score the same items"
    questions = [(f, q) for f in facts for q in f.eval_questions]
    for (fact, question), (prompt, options, answer) in zip(questions, items):
        assert prompt == question and options[answer] == fact.value
        assert len(set(options)) == len(options) == 5, "stream 3's six companies have five distinct values of each attribute"
        values = {f.value for f in facts if f.attribute == fact.attribute}
        assert set(options) <= values, "a distractor that no company of the stream has is a never-learned value"
    in_context = binding_items(facts, in_context=True, seed=3)
    assert [(o, a) for _, o, a in in_context] == [(o, a) for _, o, a in items]
    assert in_context[0][0].startswith(facts[0].document[:40])
    # one company: no other value to offer, so the answer stands alone
    lone = F.fact_stream(1, seed=7)
    assert all(options == (lone[0].value,) for _, options, _ in binding_items(lone[:1], seed=0))


@pytest.mark.parametrize("domain", sorted(F.DOMAINS))
def test_accuracy_by_attribute_splits_the_items_in_stream_order(domain):
    from fastcl.benchmark import accuracy_by_attribute
    from fastcl.evaluate import fact_items

    facts = F.fact_stream(3, seed=5, domain=domain)
    items = fact_items(facts, in_context=False)
    # hit exactly the items of the domain's first attribute, and one item of its second
    first, second = F.DOMAINS[domain].attributes[:2]
    attributes = [f.attribute for f in facts for _ in f.eval_questions]
    hits = [a == first for a in attributes]
    hits[attributes.index(second)] = True
    split = accuracy_by_attribute(facts, hits)
    assert list(split) == list(dict.fromkeys(attributes)) and len(items) == len(hits)
    assert split[first] == 1.0 and split[second] == 1 / attributes.count(second)
    assert all(split[a] == 0.0 for a in split if a not in (first, second))
    with pytest.raises(ValueError, match="hits for"):
        accuracy_by_attribute(facts, hits[:-1])


def test_pull_only_hits_count_the_learned_values_among_the_options():
    from fastcl.benchmark import accuracy_by_attribute, pull_only_accuracy, pull_only_hits

    facts = F.fact_stream(3, seed=5)
    cities = [f for f in facts if f.attribute == "city"][:2]
    first, second = cities
    # the first city's item offers the second city's value beside its own: two learned options
    options = [second.value if k == (first.answer_index + 1) % 5 else o for k, o in enumerate(first.options)]
    assert len(set(options)) == 5
    facts = [dataclasses.replace(f, options=tuple(options)) if f is first else f for f in facts]
    hits = pull_only_hits(facts)
    per_fact = hits[::len(facts[0].eval_questions)]
    assert per_fact[facts.index(next(f for f in facts if f.value == first.value))] == 0.5
    # the second city's own options may hold the first's value too; every other fact is judged the same way
    for fact, hit in zip(facts, per_fact):
        learned = {f.value for f in facts if f.attribute == fact.attribute}
        distractors = [o for k, o in enumerate(fact.options) if k != fact.answer_index]
        assert hit == 1 / (1 + sum(o in learned for o in distractors))
    assert pull_only_accuracy(facts) == pytest.approx(sum(hits) / len(hits))
    assert accuracy_by_attribute(facts, hits)["city"] < 1.0
    # founders come from a pool of 900: a learned founder among the distractors is rare
    assert accuracy_by_attribute(F.fact_stream(20, seed=1), pull_only_hits(F.fact_stream(20, seed=1)))["founder"] > 0.9
