"""Self-generated data: more answers to a served request, sampled with its context in view.

The served answer is one greedy draw of what the model, document in context, would say; a 135M
model often answers another attribute than the one asked, or states the asked value once. A
few samples at a moderate temperature restate the document's facts in other words, and the
student learns them without the context like the served answer. With SmolLM2-135M the samples'
invented extras were learned too and general probes fell (bench/RESULTS.md), so
`self_study` is off by default.
"""

from __future__ import annotations

from typing import Sequence

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
