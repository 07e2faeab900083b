"""Measuring what a model knows: multiple choice by answer log-probability, exact-match
generation, general-knowledge probes and perplexity. Used by the benchmark, the demo and the
consolidation gate."""

from __future__ import annotations

import inspect
import json
import math
from importlib import resources
from typing import Sequence

import torch

from .batching import pad_right
from .facts import Fact


def chat_ids(tokenizer, user: str) -> list[int]:
    """The chat-formatted prompt for one user turn, ending where the assistant starts."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def with_context(document: str, question: str) -> str:
    return f"{document}\n\n{question}"


def model_device(model) -> torch.device:
    """Where the model's weights live: ids built on the host go there before a forward."""
    return next(model.parameters()).device


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache`; use whichever this model takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def option_logprobs(model, prompt: Sequence[int], options: Sequence[Sequence[int]]) -> list[float]:
    """Mean log-probability per token of each option as the continuation of `prompt`.

    The prompt runs once; its KV cache is shared by the options, which run as one padded batch.
    """
    device = model_device(model)
    out = model(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1)
    cache = out["cache"] if "cache" in out else out.past_key_values
    cache.batch_repeat_interleave(len(options))
    ids, mask = pad_right(options, pad_id=0)
    full_mask = torch.cat([torch.ones(len(options), len(prompt), dtype=torch.long), mask], 1).to(device)
    logits = model(input_ids=ids.to(device), attention_mask=full_mask, **{_cache_argument(model): cache}).logits
    rest = logits[:, :-1].float().log_softmax(-1)
    scores = []
    for i, option in enumerate(options):
        total = float(first[option[0]])
        if len(option) > 1:
            total += float(rest[i, torch.arange(len(option) - 1), torch.tensor(option[1:])].sum())
        scores.append(total / len(option))
    return scores


# A second view of the same multiple-choice items, reported beside the first, never instead of
# it. The first scores each option as the bare start of the assistant's reply, so "Winnipeg" is
# scored as `W inn ipeg`, while a served answer ("... is in Winnipeg.") teaches ` Winnipeg`, one
# token. Here the reply starts with this neutral frame and the option follows after a space, so
# it is tokenized as it is inside an answer sentence. The frame is the same for every item and
# names no attribute.
ANSWER_FRAME = "The answer is"


def multiple_choice_scores(model, tokenizer, items: Sequence[tuple[str, Sequence[str], int]],
                           frame: str = "") -> list[list[float]]:
    """Per (user prompt, options, answer index): each option's mean token log-probability as the
    assistant's reply. With a `frame` (ANSWER_FRAME), the reply starts with it and each option
    follows after a space."""
    frame_ids = tokenizer(frame, add_special_tokens=False)["input_ids"] if frame else []
    scores = []
    for prompt_text, options, _ in items:
        encoded = [tokenizer(" " + o if frame else o, add_special_tokens=False)["input_ids"] for o in options]
        scores.append(option_logprobs(model, chat_ids(tokenizer, prompt_text) + frame_ids, encoded))
    return scores


def best_option(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


def answer_probability(scores: Sequence[float], answer: int) -> float:
    """The answer's share of a softmax over the options' scores: a graded version of "picked the
    answer" that moves before the pick flips, so it separates two recipes with fewer items."""
    return float(torch.tensor(scores, dtype=torch.float64).softmax(0)[answer])


def mean_answer_probability(scores: Sequence[Sequence[float]],
                            items: Sequence[tuple[str, Sequence[str], int]]) -> float:
    """answer_probability averaged over items, given multiple_choice_scores of those items."""
    return sum(answer_probability(row, item[2]) for row, item in zip(scores, items)) / max(len(items), 1)


def hits_of_scores(scores: Sequence[Sequence[float]], items: Sequence[tuple[str, Sequence[str], int]]) -> list[bool]:
    """Per item: whether its best-scored option is the answer, given multiple_choice_scores."""
    return [best_option(row) == item[2] for row, item in zip(scores, items)]


def multiple_choice_hits(model, tokenizer, items: Sequence[tuple[str, Sequence[str], int]],
                         frame: str = "") -> list[bool]:
    """Per item: whether the option with the highest multiple_choice_scores is the answer."""
    return hits_of_scores(multiple_choice_scores(model, tokenizer, items, frame), items)


def multiple_choice_accuracy(model, tokenizer, items: Sequence[tuple[str, Sequence[str], int]],
                             frame: str = "") -> float:
    """The fraction of multiple_choice_hits."""
    return accuracy_of_scores(multiple_choice_scores(model, tokenizer, items, frame), items)


def accuracy_of_scores(scores: Sequence[Sequence[float]], items: Sequence[tuple[str, Sequence[str], int]]) -> float:
    """The fraction of items whose best-scored option is the answer, given multiple_choice_scores."""
    return sum(hits_of_scores(scores, items)) / max(len(items), 1)


def fact_items(facts: Sequence[Fact], in_context: bool) -> list[tuple[str, tuple[str, ...], int]]:
    """One MC item per fact and held-out phrasing; with the document in context or closed-book."""
    return [
        (with_context(f.document, q) if in_context else q, f.options, f.answer_index)
        for f in facts for q in f.eval_questions
    ]


@torch.no_grad()
def exact_match(model, tokenizer, facts: Sequence[Fact], max_new_tokens: int = 24) -> float:
    """Closed-book greedy answers to the held-out phrasings that contain the true value."""
    hits, total, device = 0, 0, model_device(model)
    for f in facts:
        for q in f.eval_questions:
            prompt = torch.tensor([chat_ids(tokenizer, q)], device=device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
            hits += int(f.value.lower() in text.lower())
            total += 1
    return hits / max(total, 1)


def load_probes(name: str = "general_probes.jsonl") -> list[tuple[str, tuple[str, ...], int]]:
    """General-knowledge MC probes shipped in fastcl/data (evaluation only)."""
    text = resources.files("fastcl.data").joinpath(name).read_text()
    probes = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            probes.append((row["question"], tuple(row["options"]), int(row["answer"])))
    return probes


def load_text(name: str) -> str:
    return resources.files("fastcl.data").joinpath(name).read_text()


@torch.no_grad()
def mean_log_likelihood(model, ids: Sequence[int], window: int = 256) -> float:
    """Mean next-token log-likelihood (nats per token) over consecutive windows of ids."""
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start: start + window + 1]], device=device)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits[0].float()
        total -= float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return total / count


def perplexity(model, tokenizer, text: str, window: int = 256) -> float:
    """exp(mean next-token loss) over consecutive windows of the text."""
    return math.exp(-mean_log_likelihood(model, tokenizer(text, add_special_tokens=False)["input_ids"], window))
