"""The continual-learning benchmark: serve a stream of new facts with their documents in
context, learn from the traffic with learn(), then measure closed-book recall on held-out
phrasings against the in-context ceiling and the no-context floor, with forgetting beside it.
Shared by bench/continual.py (seeds, ablations) and `fastcl demo`."""

from __future__ import annotations

import hashlib
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import evaluate as E
from .facts import Fact
from .patcher import patch, unpatch
from .timing import seconds_since


@dataclass
class Served:
    """Cost of serving the stream and of learning from it."""

    requests: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    serve_seconds: float = 0.0  # generation with the document in context
    learn_seconds: float = 0.0  # everything learn() did, extras included
    answers: list = field(default_factory=list)
    # Each gate check of a merge: {"request": the index of the request whose learn() merged,
    # "committed": ..., probe name: its drop below the baseline}.
    gate_checks: list = field(default_factory=list)
    anchor_kl: list = field(default_factory=list)  # per request, the anchor's KL at its last step (None: no anchor)

    def record_gate(self, consolidation) -> None:
        if consolidation is not None and consolidation.gate is not None:
            self.gate_checks.append({"request": self.requests, "committed": consolidation.committed,
                                     **{name: s["drop"] for name, s in consolidation.gate.scores.items()}})

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens


@contextmanager
def restored(model):
    """Leave `model` as it came in, whatever is done to it inside (also on an error): its
    weights are copied on entry; on exit a learner patched inside is removed without merging
    (one that was there on entry stays) and the copy is loaded back. What a run on a shared
    model (a benchmark seed, a test) needs, since consolidate() writes what was learned into the
    weights themselves."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    learner_on_entry = getattr(model, "fastcl", None)
    try:
        yield model
    finally:
        if getattr(model, "fastcl", None) not in (None, learner_on_entry):
            unpatch(model, merge=False)
        model.load_state_dict(original)


def learner_seed(stream_seed: int, options: dict) -> int:
    """The seed of a benchmark run's learner: `options`' own, else the stream's."""
    return options.get("seed", stream_seed)


def patch_for_stream(model, tokenizer, stream_seed: int, options: dict):
    """The learner a benchmark run serves a stream with: the shipped defaults with `options` over
    them. Its own randomness (projections, replay draws) follows the stream's seed unless
    `options` sets `seed`, so the same stream can be rerun under other draws to measure a
    recipe's own spread."""
    return patch(model, tokenizer=tokenizer, **{**options, "seed": learner_seed(stream_seed, options)})


@torch.no_grad()
def answer(model, tokenizer, prompt: list[int], max_new_tokens: int = 40) -> tuple[list[int], torch.Tensor]:
    """Greedy answer and, per answer token, its log-probability under the prompt (from the
    logits generation computed anyway)."""
    ids = torch.tensor([prompt], device=E.model_device(model))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):]
    logits = torch.stack(out.logits, 1)[0].float()
    return tokens.tolist(), logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def serve(model, tokenizer, learner, facts: Sequence[Fact], progress=None,
          every: int = 0, on_checkpoint: Optional[Callable[[int, Served], None]] = None,
          max_new_tokens: int = 40) -> Served:
    """Serve each fact's served question with its document in context, learn from the answer
    (the student sees the question alone), and call on_checkpoint every `every` requests."""
    served, device = Served(), E.model_device(model)
    for i, fact in enumerate(facts):
        teacher = E.chat_ids(tokenizer, E.with_context(fact.document, fact.served_question))
        student = E.chat_ids(tokenizer, fact.served_question)
        start = time.perf_counter()
        response, teacher_logprobs = answer(model, tokenizer, teacher, max_new_tokens)
        served.serve_seconds += seconds_since(start, device)
        start = time.perf_counter()
        if learner is not None:
            report = learner.learn(teacher, response, student, teacher_logprobs=teacher_logprobs)
            served.record_gate(report.consolidation)
            served.anchor_kl.append(learner.recipe.anchor_kl)
        # The wait matters on a GPU: learn()'s backward would be timed as the next answer's serving.
        served.learn_seconds += seconds_since(start, device)
        served.requests += 1
        served.prompt_tokens += len(teacher)
        served.response_tokens += len(response)
        served.answers.append(response)
        if progress is not None:
            progress.update(1)
        if every and on_checkpoint is not None and (i + 1) % every == 0:
            on_checkpoint(i + 1, served)
    if learner is not None and learner.has_unmerged_updates() and learner.config.consolidate_every:
        served.record_gate(learner.consolidate())
    return served


@torch.no_grad()
def forward_seconds(model, tokenizer, facts: Sequence[Fact], answers: Sequence[list[int]]) -> float:
    """A plain no-grad forward over every served sequence: the unit learning costs are given in."""
    device = E.model_device(model)
    start = time.perf_counter()
    for fact, response in zip(facts, answers):
        prompt = E.chat_ids(tokenizer, E.with_context(fact.document, fact.served_question))
        model(input_ids=torch.tensor([prompt + list(response)], device=device))
    return seconds_since(start, device)


def measure(model, tokenizer, facts: Sequence[Fact], *, in_context: bool = False, exact: bool = True,
            general: bool = True, probes=None, framed: bool = False) -> dict:
    """Closed-book (or in-context) MC accuracy on held-out phrasings ("mc") and the answer's mean
    probability over the options ("mc_probability", E.answer_probability), exact-match generation,
    general-knowledge probes and general-text perplexity; with `framed`, the MC items and the
    probes also scored inside an answer frame ("mc_framed", "general_framed"; E.ANSWER_FRAME).
    Per item as well: "mc_hits" (E.fact_items' order), the option each probe picked
    ("general_picks", "general_framed_picks") and every option's score ("general_scores",
    "general_framed_scores": mean log-probability per token) and each greedy answer with its hit
    ("exact_answers", "exact_hits"), so a change can be traced to what moved and rescored another way."""
    items = E.fact_items(facts, in_context)
    scores = E.multiple_choice_scores(model, tokenizer, items)
    results = {"mc": E.accuracy_of_scores(scores, items), "mc_probability": E.mean_answer_probability(scores, items),
               "mc_hits": E.hits_of_scores(scores, items)}
    if framed:
        results["mc_framed"] = E.multiple_choice_accuracy(model, tokenizer, items, frame=E.ANSWER_FRAME)
    if exact and not in_context:
        answered = E.exact_match_answers(model, tokenizer, facts)
        results["exact_hits"] = [hit for hit, _ in answered]
        results["exact_answers"] = [answer for _, answer in answered]
        results["exact"] = sum(results["exact_hits"]) / max(len(answered), 1)
    if general:
        probes = probes or E.load_probes()
        frames = {"general": "", "general_framed": E.ANSWER_FRAME} if framed else {"general": ""}
        for key, frame in frames.items():
            probe_scores = E.multiple_choice_scores(model, tokenizer, probes, frame=frame)
            results[key] = E.accuracy_of_scores(probe_scores, probes)
            results[key + "_picks"] = [E.best_option(row) for row in probe_scores]
            results[key + "_scores"] = probe_scores
        results["perplexity"] = E.perplexity(model, tokenizer, E.load_text("general_text.txt"))
    return results


def swapped_entity_items(facts: Sequence[Fact]) -> list[tuple[str, tuple[str, ...], int]]:
    """Each fact's held-out questions asked about the stream's next entity (company or person)
    instead (cyclically), with the fact's own options and answer: a pick of the fact's value there
    is not knowledge of *which* entity it belongs to (where the next entity's own value happens to
    be among the options, picking it counts as a miss). With one entity, the questions are the
    fact's own."""
    entities = list(dict.fromkeys(f.entity for f in facts))
    other = {e: entities[(k + 1) % len(entities)] for k, e in enumerate(entities)}
    return [(q.replace(f.entity, other[f.entity]), f.options, f.answer_index) for f in facts for q in f.eval_questions]


def learned_values(facts: Sequence[Fact]) -> dict[str, list[str]]:
    """Per attribute, the stream's distinct values in the order first served: what it teaches."""
    values: dict[str, list[str]] = {}
    for f in facts:
        if f.value not in values.setdefault(f.attribute, []):
            values[f.attribute].append(f.value)
    return values


def binding_items(facts: Sequence[Fact], in_context: bool = False, n_options: int = 5,
                  seed: int = 0) -> list[tuple[str, tuple[str, ...], int]]:
    """Each fact's held-out questions with the stream's *other* values of the same attribute as
    distractors (up to n_options - 1, fewer where the stream has fewer distinct ones): once the
    stream is learned every option is a learned value, so a learned value's pull on any question
    of its kind cancels and a hit needs knowing which entity the value belongs to. Seeded, so
    before and after score the same items; with the document in context for the ceiling."""
    rng = random.Random(seed)
    values = learned_values(facts)
    items = []
    for f in facts:
        others = [v for v in values[f.attribute] if v != f.value]
        options = rng.sample(others, min(n_options - 1, len(others))) + [f.value]
        rng.shuffle(options)
        items += [(E.with_context(f.document, q) if in_context else q, tuple(options), options.index(f.value))
                  for q in f.eval_questions]
    return items


@dataclass
class Controls:
    """The held-out questions asked two more ways, scored before learning: about another
    entity (swapped_entity_items; the fact's value picked) and with the stream's other values
    as distractors (binding_items: floor, and ceiling with the document in context). after()
    scores both again."""

    swapped: list
    binding: list
    swapped_before: float
    binding_floor: float
    binding_ceiling: float

    @classmethod
    def measure(cls, model, tokenizer, facts: Sequence[Fact], seed: int) -> "Controls":
        swapped, binding = swapped_entity_items(facts), binding_items(facts, seed=seed)
        in_context = binding_items(facts, in_context=True, seed=seed)
        scores = [E.multiple_choice_accuracy(model, tokenizer, items) for items in (swapped, binding, in_context)]
        return cls(swapped, binding, *scores)

    @classmethod
    def from_scores(cls, facts: Sequence[Fact], seed: int, swapped_before: float, binding_floor: float,
                    binding_ceiling: float) -> "Controls":
        """The controls of a stream whose before scores were measured already (a saved run)."""
        return cls(swapped_entity_items(facts), binding_items(facts, seed=seed), swapped_before, binding_floor,
                   binding_ceiling)

    def after(self, model, tokenizer) -> tuple[float, float]:
        """(control, binding) accuracy of the model as it is now."""
        return (E.multiple_choice_accuracy(model, tokenizer, self.swapped),
                E.multiple_choice_accuracy(model, tokenizer, self.binding))


def weights_hash(model) -> str:
    """A sha256 of the model's state dict (names and values, as fp32): equal hashes, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gap_recovered(after: float, floor: float, ceiling: float) -> float:
    return (after - floor) / (ceiling - floor) if ceiling > floor else float("nan")


def paired_difference(ours: list[dict], theirs: list[dict], key: str) -> tuple[list[float], float, float]:
    """Per stream, ours[key] - theirs[key] (a pair of [before, after] compares the afters); their
    mean and its standard error. One stream's difference is mostly noise (160 items); the mean
    over many streams, judged against its standard error, is what a recipe decision can rest on."""
    def value(result):
        v = result[key]
        return v[-1] if isinstance(v, list) else v

    differences = [value(a) - value(b) for a, b in zip(ours, theirs)]
    mean = sum(differences) / len(differences)
    if len(differences) < 2:
        return differences, mean, float("nan")
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return differences, mean, (variance / len(differences)) ** 0.5


def probe_shifts(run: dict, probes, framed: bool = True) -> dict:
    """Which general probes a saved bench/continual.py run moved: {"lost": [...], "gained": [...]},
    each entry (probe index, picked before, picked after), from the run's saved picks (the answer
    frame's, or the bare ones); lost is right before learning and wrong after, gained the reverse."""
    key = "general_framed_picks" if framed else "general_picks"
    before, after = run[f"{key}_before"], run[f"{key}_after"]
    if not len(before) == len(after) == len(probes):
        raise ValueError(f"{len(before)}/{len(after)} picks for {len(probes)} probes: the run used another probe set")
    out = {"lost": [], "gained": []}
    for index, ((_, _, answer), was, now) in enumerate(zip(probes, before, after)):
        if was == answer and now != answer:
            out["lost"].append((index, was, now))
        elif was != answer and now == answer:
            out["gained"].append((index, was, now))
    return out


def accuracy_by_attribute(facts: Sequence[Fact], hits: Sequence[bool]) -> dict[str, float]:
    """Per attribute, in the order the stream first asks it: the mean of `hits` (measure()'s
    "mc_hits", or pull_only_hits: one per fact and held-out phrasing, E.fact_items' order) over
    that attribute's items."""
    attributes = [f.attribute for f in facts for _ in f.eval_questions]
    if len(attributes) != len(hits):
        raise ValueError(f"{len(hits)} hits for {len(attributes)} items (one per fact and held-out phrasing)")
    tally: dict[str, list[float]] = {}
    for attribute, hit in zip(attributes, hits):
        counts = tally.setdefault(attribute, [0.0, 0])
        counts[0] += float(hit)
        counts[1] += 1
    return {attribute: hit / total for attribute, (hit, total) in tally.items()}


def pull_only_hits(facts: Sequence[Fact]) -> list[float]:
    """Per held-out item (E.fact_items' order), the expected hit of a learner that knows nothing
    about which entity has which value, only that the stream's values are the ones to pick: it
    picks uniformly among the options the stream taught (the answer and any distractor that is
    another fact's value of the same attribute), so 1 / (1 + such distractors). What the score
    rewards without any binding: an attribute drawn from a large pool (founders) rarely offers a
    learned distractor, one drawn from a small pool often does."""
    learned = learned_values(facts)
    return [1 / (1 + sum(o in learned[f.attribute] for k, o in enumerate(f.options) if k != f.answer_index))
            for f in facts for _ in f.eval_questions]


def pull_only_accuracy(facts: Sequence[Fact]) -> float:
    """The mean of pull_only_hits: that learner's closed-book MC accuracy."""
    hits = pull_only_hits(facts)
    return sum(hits) / max(len(hits), 1)
