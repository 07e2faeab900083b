"""Ragged requests to padded batches: prompt + response rows, right-padded, with the positions
whose next token is a response token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .errors import InputError

Tokens = Union[torch.Tensor, Sequence[int]]


def as_rows(name: str, value) -> list[list[int]]:
    """One request (1-D ids) or a batch (2-D tensor, or a list of 1-D ids) as a list of rows."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            raise InputError(f"{name} must hold integer token ids, got dtype {value.dtype}")
        if value.dim() == 1:
            return [value.tolist()]
        if value.dim() == 2:
            return value.tolist()
        raise InputError(f"{name} must be 1-D or 2-D, got shape {tuple(value.shape)}")
    value = list(value)
    if not value:
        raise InputError(f"{name} is empty")
    if all(isinstance(v, int) for v in value):
        return [value]
    rows = [v.tolist() if isinstance(v, torch.Tensor) else list(v) for v in value]
    for row in rows:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise InputError(f"{name} must hold integer token ids")
    return rows


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) for ragged rows, padded on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) for ragged rows, padded on the left (prompts a generate() continues)."""
    ids, mask = pad_right([list(reversed(r)) for r in rows], pad_id)
    return ids.flip(1), mask.flip(1)


@dataclass
class PromptResponseBatch:
    """Rows of prompt + response. `rows`, `cols` index the logits that predict response tokens,
    in response order; `targets` are those tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())


def prompt_response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                          device=None) -> PromptResponseBatch:
    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise InputError(f"prompt {i} is empty: a response needs a prompt to be predicted from")
        if not r:
            raise InputError(f"response {i} is empty: nothing to learn")
    ids, mask = pad_right([p + r for p, r in zip(prompts, responses)], pad_id)
    rows, cols = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        rows += [i] * len(r)
        cols += range(len(p) - 1, len(p) + len(r) - 1)
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    targets = ids[rows_t, cols_t + 1]
    device = device or ids.device
    return PromptResponseBatch(ids.to(device), mask.to(device), rows_t.to(device), cols_t.to(device),
                               targets.to(device))
