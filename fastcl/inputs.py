"""Validation of served requests, before anything runs: a bad request changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import InputError

Weight = Union[float, int, torch.Tensor]


@dataclass
class Request:
    input_ids: torch.Tensor  # (batch, seq) int64
    attention_mask: Optional[torch.Tensor]  # (batch, seq) or None, as given
    targets: torch.Tensor  # (batch, seq - 1) bool: position t+1 is learned from the prefix up to t
    weight: torch.Tensor  # (batch,) float32, >= 0

    @property
    def learned_targets(self) -> torch.Tensor:
        """Targets in rows whose weight is positive: the tokens a step is normalised by."""
        return self.targets & (self.weight[:, None] > 0)


def _as_2d(name: str, value, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    tensor = torch.as_tensor(value, device=like.device if like is not None else None)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise InputError(f"{name} must have shape (seq,) or (batch, seq), got {tuple(tensor.shape)}")
    if like is not None and tensor.shape != like.shape:
        raise InputError(f"{name} has shape {tuple(tensor.shape)} but input_ids has {tuple(like.shape)}")
    return tensor


def _as_mask(name: str, value, like: torch.Tensor) -> torch.Tensor:
    mask = _as_2d(name, value, like)
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
        raise InputError(f"{name} must hold 0/1 or booleans, got dtype {mask.dtype}")
    return mask.bool()


def as_weight(weight: Weight, batch: int, device) -> torch.Tensor:
    w = torch.as_tensor(weight, dtype=torch.float32, device=device)
    if w.dim() == 0:
        w = w.expand(batch)
    if w.shape != (batch,):
        raise InputError(f"weight must be a number or a tensor of shape ({batch},), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise InputError("weight must be finite")
    if (w < 0).any():
        raise InputError("weight must be >= 0 (0 means serve without learning); negative feedback is not supported")
    return w


def check_vocabulary(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        where = (ids == bad).nonzero()[0].tolist()
        raise InputError(f"{name} holds token id {bad} at position {where}, outside the vocabulary [0, {vocab_size})")


def validate_request(input_ids, attention_mask, loss_mask, weight: Weight, vocab_size: int, device) -> Request:
    """Check a served request and build the next-token targets it implies.

    loss_mask marks the tokens to learn (1 = learn this token from its prefix); the first token
    of a row is never a target. Padding (attention_mask == 0) is never a target or a context
    for one.
    """
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    ids = _as_2d("input_ids", input_ids)
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise InputError(f"input_ids must be an integer tensor of token ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        raise InputError(f"input_ids is empty (shape {tuple(ids.shape)}): nothing to serve")
    check_vocabulary("input_ids", ids, vocab_size)
    ids = ids.to(device=device, dtype=torch.long)
    attn = _as_mask("attention_mask", attention_mask, ids) if attention_mask is not None else None
    learn = _as_mask("loss_mask", loss_mask, ids) if loss_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    targets = learn[:, 1:].clone()
    if attn is not None:
        targets &= attn[:, 1:] & attn[:, :-1]
    return Request(ids, attn, targets, as_weight(weight, ids.shape[0], device))
