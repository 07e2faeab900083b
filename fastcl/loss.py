"""Next-token loss on the served tokens that are marked for learning."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .inputs import Request

# Rows of logits handled at once by next_token_gradient. On a CPU, 2 MB of fp32 stays in a
# core's L2 across the passes over a chunk (max, exp-sum, then exp written into the gradient).
# On a GPU each chunk costs about ten kernel launches: with 2 MB chunks SmolLM2's 8 x 512 tokens
# took 416 chunks and 92 ms, 2.7 forwards, on an H200 (bench/RESULTS.md); 256 MB makes it 8.
CHUNK_BYTES = 2 << 20
GPU_CHUNK_BYTES = 256 << 20


class LogitsGradient(NamedTuple):
    """A loss handed over as its gradient with respect to the logits, computed outside autograd:
    the learner backpropagates it from the logits (logits.backward(grad))."""

    grad: torch.Tensor


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


@torch.no_grad()
def next_token_gradient(logits: torch.Tensor, request: Request) -> tuple[LogitsGradient, torch.Tensor]:
    """(the gradient of sum over target tokens of weight * cross-entropy with respect to the
    logits, the per-token losses), without autograd; the same loss as next_token_loss.

    For a row z with target y and weight w, d(w CE)/dz = w softmax(z) - w onehot(y), with
    softmax(z) = exp(z - max z) / sum: one exp pass written straight into the gradient, then a
    scale by w / sum (w = 0 on rows that are not learned gives exact zeros). A few rows at a
    time, the chunk stays in cache across its passes, and half-precision logits are upcast one
    chunk at a time.

    Nothing is saved for backward: autograd's cross-entropy would keep an fp32 log-softmax of
    every target row (targets x vocab), and its backward would build the same-sized gradient
    several times (log-softmax, index, the zero-filled scatter) where this builds it once.
    """
    batch, seq, vocab = logits.shape
    grad = torch.empty_like(logits)
    grad[:, -1].zero_()  # the last position predicts no served token
    coef = request.weight[:, None] * request.targets  # (batch, seq - 1): w on target tokens, else 0
    labels = request.input_ids[:, 1:]
    token_loss = torch.zeros(batch, seq - 1, dtype=torch.float32, device=logits.device)
    any_target = request.targets.cpu()  # which chunks can be skipped, decided once on the host
    rows = max(1, (CHUNK_BYTES if logits.device.type == "cpu" else GPU_CHUNK_BYTES) // (vocab * 4))
    for b in range(batch):
        for t0 in range(0, seq - 1, rows):
            t1 = min(t0 + rows, seq - 1)
            g = grad[b, t0:t1]
            if not any_target[b, t0:t1].any():
                g.zero_()
                continue
            z = logits[b, t0:t1].float()  # fp32 logits: the same tensor, only read
            e = g if g.dtype == torch.float32 else torch.empty_like(z)  # half precision: round once, at the end
            top = z.amax(-1, keepdim=True)
            torch.sub(z, top, out=e).exp_()
            total = e.sum(-1, keepdim=True)
            y = labels[b, t0:t1, None]
            token_loss[b, t0:t1] = (top + total.log() - z.gather(1, y)).squeeze(1)
            c = coef[b, t0:t1, None]
            e.mul_(c / total).scatter_add_(1, y, -c)
            if e is not g:
                g.copy_(e)
    return LogitsGradient(grad), token_loss[request.targets]


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
                      cols: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, threshold: float,
                      contrast: Optional["Contrast"] = None,
                      allowed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learn the response tokens that the context taught: (loss sum, learned-token mask, each
    token's context gain, detached).

    The context gain of a response token is log p(token | context, prompt) under the teacher
    minus log p(token | prompt) under the student. Tokens whose gain exceeds `threshold` (nats)
    get a cross-entropy term; the rest (words the student would say anyway, and whatever the
    context did not support) get none, so the update is spent on what is new. As the student
    learns a fact its gain falls below the threshold and the fact stops being trained.
    Tokens not marked in `allowed` (when given) are never learned. With contrast, a margin term
    (contrast_margin_loss) is added at the learned tokens and at contrast.positions.
    """
    distribution = student_logits[rows, cols].float().log_softmax(-1)
    student = distribution.gather(-1, targets[:, None]).squeeze(-1)
    gain = teacher_token_logprobs - student.detach()
    learned = gain > threshold
    if allowed is not None:
        learned &= allowed
    total = -(student * learned * weight[rows]).sum()
    if contrast is not None:
        positions = (learned & (gain >= contrast.min_gain)) | contrast.positions
        total = total + contrast_margin_loss(distribution, targets, positions, contrast, weight[rows])
    return total, learned, gain


class Contrast(NamedTuple):
    """Other requests' learned tokens, to be kept below each position's own answer.

    pool: (N,) token ids; excluded: (tokens, N) pairs not to contrast (the position's own
    request's response has that id); positions: (tokens,) where the term applies besides the
    tokens learned now with at least min_gain nats of context gain (a replayed request's
    first-taught ones); margin: nats."""

    pool: torch.Tensor
    excluded: torch.Tensor
    positions: torch.Tensor
    margin: float
    min_gain: float = 0.0


def contrast_margin_loss(distribution: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor,
                         contrast: Contrast, weight: torch.Tensor) -> torch.Tensor:
    """distribution: (tokens, vocab) log-probabilities, targets: (tokens,) each position's answer.
    Sum over the chosen positions and the pool's ids (other than the answer) of
    weight * relu(log q(id) - log q(answer) + margin): another request's learned token may not
    come within `margin` nats of this request's answer at the answer's position.

    What one request teaches ("a headquarters question -> Graz") carries to every entity's
    question; learned alone it makes every recent value an intruder (bench/RESULTS.md, "Next").
    Contrasting the values at each other's positions cancels the shared part and keeps the part
    that depends on whose question it is. The hinge is zero wherever an id is already far below
    the answer (another attribute's values, mostly), so only near rivals cost anything; each
    active pair pushes its rival down and the answer up with a unit gradient.
    """
    rows = positions.nonzero(as_tuple=True)[0]
    if rows.numel() == 0 or contrast.pool.numel() == 0:
        return distribution.new_zeros(())
    chosen = distribution[rows]
    answer = chosen.gather(-1, targets[rows, None])
    hinge = (chosen[:, contrast.pool] - answer + contrast.margin).clamp_min(0)
    skip = contrast.excluded[rows] | (contrast.pool[None, :] == targets[rows, None])
    return (hinge.masked_fill(skip, 0.0).sum(-1) * weight[rows]).sum()
