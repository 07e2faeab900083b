"""Measuring what a model knows: multiple choice by answer log-probability, exact-match
generation, general-knowledge probes and perplexity. Used by the benchmark, the demo and the
consolidation gate."""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections import defaultdict
from importlib import resources
from typing import Optional, Sequence

import torch

from .batching import pad_left
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


# Prompts a scoring or generating forward takes together: large enough that a CPU forward is
# not dominated by per-call overhead, small enough that a batch's padding stays cheap.
EVAL_BATCH = 16


def _cache_of(output):
    return output["cache"] if "cache" in output else output.past_key_values


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one of its own (the
    last prompt token's logits score an option's first token)."""
    length = min(len(r) for r in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        shared = 0
        while shared < length and row[shared] == first[shared]:
            shared += 1
        length = shared
    return max(length, 0)


@torch.no_grad()
def batched_option_logprobs(model, prompts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]],
                            batch: int = EVAL_BATCH) -> list[list[float]]:
    """Per prompt, the mean log-probability per token of each of its options as the prompt's
    continuation: the same numbers as one forward per sequence, up to float rounding.

    Per `batch` prompts, forwards each on the cache of the one before: the prefix every prompt
    shares (a chat template's system turn) once, the rest of each prompt as one left-padded
    batch, then the options longer than one token, all but their last token, one batch per
    length. Positions are given explicitly, so the padding between the shared prefix and a
    prompt changes nothing.
    """
    if not prompts or any(len(p) == 0 for p in prompts) or any(len(o) == 0 for opts in options for o in opts):
        raise ValueError("batched_option_logprobs: every prompt and every option needs at least one token")
    if len(prompts) != len(options):
        raise ValueError(f"batched_option_logprobs: {len(prompts)} prompts but {len(options)} option lists")
    device, argument = model_device(model), _cache_argument(model)
    last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    prefix = _common_prefix(prompts)
    scores: list[list[float]] = []
    for start in range(0, len(prompts), batch):
        chunk, chunk_options = prompts[start: start + batch], options[start: start + batch]
        cache = None
        if prefix:
            cache = _cache_of(model(input_ids=torch.tensor([list(chunk[0][:prefix])], device=device), use_cache=True))
            cache.batch_repeat_interleave(len(chunk))
        # Padded on the left, so every prompt ends in the last column: only that column's logits
        # are needed, and a vocabulary-wide row per prompt token is never formed.
        rest, rest_mask = pad_left([p[prefix:] for p in chunk], pad_id=0)
        lengths = rest_mask.sum(1)
        seen = torch.cat([torch.ones(len(chunk), prefix, dtype=torch.long), rest_mask], 1)
        positions = (prefix + torch.arange(rest.shape[1]) - (rest.shape[1] - lengths)[:, None]).clamp_min(prefix)
        out = model(input_ids=rest.to(device), attention_mask=seen.to(device), position_ids=positions.to(device),
                    use_cache=True, **({argument: cache} if cache is not None else {}), **last_logits_only)
        first = out.logits[:, -1].float().log_softmax(-1)
        cache = _cache_of(out)
        flat = [(row, list(option)) for row, opts in enumerate(chunk_options) for option in opts]
        totals = [float(first[row, option[0]]) for row, option in flat]
        # An option's last token is scored, never read: one-token options need no forward, and the
        # others run grouped by length, each group on its own copy of the prompts' cache, so no
        # row is padded (the answer gate's options run 1 to 6 tokens, 1.9 on average).
        by_length: dict[int, list[int]] = defaultdict(list)
        for k, (_, option) in enumerate(flat):
            if len(option) > 1:
                by_length[len(option) - 1].append(k)
        groups = sorted(by_length.items())
        for g, (length, members) in enumerate(groups):
            owner = torch.tensor([flat[k][0] for k in members])
            group_cache = cache if g == len(groups) - 1 else copy.deepcopy(cache)
            group_cache.batch_select_indices(owner.to(device))
            ids = torch.tensor([flat[k][1][:-1] for k in members])
            targets = torch.tensor([flat[k][1][1:] for k in members], device=device)
            seen_too = torch.cat([seen[owner], torch.ones(len(members), length, dtype=torch.long)], 1)
            positions = prefix + lengths[owner][:, None] + torch.arange(length)
            logits = model(input_ids=ids.to(device), attention_mask=seen_too.to(device),
                           position_ids=positions.to(device), **{argument: group_cache}).logits
            logprobs = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1).sum(1)
            for k, logprob in zip(members, logprobs.tolist()):
                totals[k] += logprob
        flat_scores = [total / len(option) for total, (_, option) in zip(totals, flat)]
        offset = 0
        for opts in chunk_options:
            scores.append(flat_scores[offset: offset + len(opts)])
            offset += len(opts)
    return scores


def option_logprobs(model, prompt: Sequence[int], options: Sequence[Sequence[int]]) -> list[float]:
    """Mean log-probability per token of each option as the continuation of `prompt`."""
    return batched_option_logprobs(model, [prompt], [options])[0]


# A second view of the same multiple-choice items, reported beside the first, never instead of
# it. The first scores each option as the bare start of the assistant's reply, so "Winnipeg" is
# scored as `W inn ipeg`, while a served answer ("... is in Winnipeg.") teaches ` Winnipeg`, one
# token. Here the reply starts with this neutral frame and the option follows after a space, so
# it is tokenized as it is inside an answer sentence. The frame is the same for every item and
# names no attribute.
ANSWER_FRAME = "The answer is"


def option_inputs(tokenizer, items: Sequence[tuple[str, Sequence[str], int]],
                  frame: str = "") -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompts, options) token ids for MC items, as multiple_choice_scores scores them: each
    user prompt in the chat template, then the `frame` if any, with each option after it (after
    a space where there is a frame)."""
    frame_ids = tokenizer(frame, add_special_tokens=False)["input_ids"] if frame else []
    prompts = [chat_ids(tokenizer, prompt_text) + frame_ids for prompt_text, _, _ in items]
    options = [[tokenizer(" " + o if frame else o, add_special_tokens=False)["input_ids"] for o in item_options]
               for _, item_options, _ in items]
    return prompts, options


def multiple_choice_scores(model, tokenizer, items: Sequence[tuple[str, Sequence[str], int]],
                           frame: str = "") -> list[list[float]]:
    """Per (user prompt, options, answer index): each option's mean token log-probability as the
    assistant's reply. With a `frame` (ANSWER_FRAME), the reply starts with it and each option
    follows after a space."""
    return batched_option_logprobs(model, *option_inputs(tokenizer, items, frame)) if items else []


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
def greedy_continuations(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: Optional[int],
                         batch: int = EVAL_BATCH, keep_stop: bool = False) -> list[list[int]]:
    """Each prompt's greedy continuation as token ids, up to the model's stop token (included
    with keep_stop): `batch` prompts a generate() call, padded on the left; the same tokens as one
    call per prompt, up to float rounding."""
    device, continuations = model_device(model), []
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, (list, tuple)) else [] if stop is None else [stop])
    for start in range(0, len(prompts), batch):
        ids, mask = pad_left(prompts[start: start + batch], pad_id=pad_id or 0)
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id)
        for row in out[:, ids.shape[1]:].tolist():
            end = next((i for i, token in enumerate(row) if token in stop), None)  # rows done early are padded
            continuations.append(row if end is None else row[:end + 1] if keep_stop else row[:end])
    return continuations


def greedy_answers(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   batch: int = EVAL_BATCH) -> list[str]:
    """Each prompt's greedy continuation (greedy_continuations), decoded without special tokens."""
    return [tokenizer.decode(row, skip_special_tokens=True)
            for row in greedy_continuations(model, prompts, max_new_tokens, tokenizer.pad_token_id, batch)]


def exact_match_answers(model, tokenizer, facts: Sequence[Fact], max_new_tokens: int = 24) -> list[tuple[bool, str]]:
    """Per held-out phrasing (fact_items' order): the closed-book greedy answer, and whether it
    contains the true value."""
    asked = [(f, q) for f in facts for q in f.eval_questions]
    answers = greedy_answers(model, tokenizer, [chat_ids(tokenizer, q) for _, q in asked], max_new_tokens)
    return [(f.value.lower() in a.lower(), a) for (f, _), a in zip(asked, answers)]


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
