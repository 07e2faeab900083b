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


def next_token_loss_on(logits: torch.Tensor, batch, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """next_token_loss for a PromptResponseBatch: the response tokens after each prompt."""
    token_loss = F.cross_entropy(logits[batch.rows, batch.cols].float(), batch.targets, reduction="none")
    return (token_loss * weight[batch.rows]).sum(), token_loss.detach()


def distillation_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, rows: torch.Tensor,
                      cols: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over response tokens of weight * KL(teacher || student), per-token KL detached).

    teacher_logprobs is (tokens, vocab), already gathered at the response positions in the same
    order as (rows, cols) index the student's logits.
    """
    student = student_logits[rows, cols].float().log_softmax(-1)
    token_kl = (teacher_logprobs.exp() * (teacher_logprobs - student)).sum(-1)
    return (token_kl * weight[rows]).sum(), token_kl.detach()


def context_gain_loss(student_logits: torch.Tensor, teacher_token_logprobs: torch.Tensor, rows: torch.Tensor,
                      cols: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn the response tokens that the context taught: (loss sum, learned-token mask).

    The context gain of a response token is log p(token | context, prompt) under the teacher
    minus log p(token | prompt) under the student. Tokens whose gain exceeds `threshold` (nats)
    get a cross-entropy term; the rest (words the student would say anyway, and whatever the
    context did not support) get none, so the update is spent on what is new. As the student
    learns a fact its gain falls below the threshold and the fact stops being trained.
    """
    student = student_logits[rows, cols].float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    learned = (teacher_token_logprobs - student.detach()) > threshold
    return -(student * learned * weight[rows]).sum(), learned
