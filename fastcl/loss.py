"""Next-token loss on the served tokens that are marked for learning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import Request


def next_token_loss(logits: torch.Tensor, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over target tokens of weight * cross-entropy, the per-token losses detached).

    Only the target rows of the logits are gathered and upcast, so the fp32 copy is
    (targets x vocab), not (batch x seq x vocab).
    """
    rows, cols = request.targets.nonzero(as_tuple=True)
    predicted = logits[rows, cols].float()
    token_loss = F.cross_entropy(predicted, request.input_ids[rows, cols + 1], reduction="none")
    return (token_loss * request.weight[rows]).sum(), token_loss.detach()
