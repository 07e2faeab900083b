"""Self-generated data: more answers to a served request, sampled with its context in view.

The served answer is one greedy draw of what the model, document in context, would say; a 135M
model often answers another attribute than the one asked, or states the asked value once. A
few samples at a moderate temperature restate the document's facts in other words, and the
student learns them without the context like the served answer. With SmolLM2-135M the samples'
invented extras were learned too and general probes fell (bench/RESULTS.md), so
`self_study` is off by default.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


@torch.no_grad()
def sample_answers(model, prompt: Sequence[int], n: int, temperature: float, max_new_tokens: int,
                   seed: int) -> list[tuple[list[int], torch.Tensor]]:
    """n sampled answers to `prompt`, each cut after its first end-of-sequence token, with each
    token's log-probability under the prompt (from the untempered logits: the teacher's own
    distribution, not the sampler's). Sampling is seeded, so a run repeats."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    stops = eos_ids(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                             pad_token_id=stops[0] if stops else None, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:]
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    answers = []
    for row, row_logprobs in zip(tokens.tolist(), logprobs):
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        if end:
            answers.append((row[:end], row_logprobs[:end].cpu()))
    return answers


# What the model is asked, with a request's removed context in view, to write a question of its own.
QUESTION_INSTRUCTION = "Write one question that can be answered from the text above."


def first_question(text: str, min_words: int = 3) -> Optional[str]:
    """The generated text's first question: up to its first '?', without a leading "Question:"
    label or quotes; None where there is none, or it is under min_words words."""
    end = text.find("?")
    if end < 0:
        return None
    question = text[: end + 1].strip().strip("\"'*").strip()
    if question.lower().startswith("question:"):
        question = question[len("question:"):].strip()
    return question if len(question.split()) >= min_words else None


@torch.no_grad()
def greedy(model, prompt: Sequence[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """The greedy continuation of `prompt`, cut after its first end-of-sequence token, with each
    token's log-probability under the prompt."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], device=device)
    stops = eos_ids(model)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=stops[0] if stops else None, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:]
    logprobs = torch.stack(out.logits, 1)[0].float().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    row = tokens.tolist()
    end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    return row[:end], logprobs[:end].cpu()


def self_question(model, tokenizer, context: str, max_new_tokens: int
                  ) -> Optional[tuple[list[int], list[int], list[int], torch.Tensor]]:
    """With `context` in view the model writes a question about it and answers it. Returns
    (served-like prompt: context then question, student prompt: the question alone, answer, the
    answer's log-probabilities under the served-like prompt), or None where no question came."""
    from .evaluate import chat_ids, with_context

    written, _ = greedy(model, chat_ids(tokenizer, with_context(context, QUESTION_INSTRUCTION)), max_new_tokens)
    question = first_question(tokenizer.decode(written, skip_special_tokens=True))
    if question is None:
        return None
    teacher = chat_ids(tokenizer, with_context(context, question))
    answer, logprobs = greedy(model, teacher, max_new_tokens)
    if not answer:
        return None
    return teacher, chat_ids(tokenizer, question), answer, logprobs
