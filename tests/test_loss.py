"""The next-token gradient computed outside autograd against autograd through next_token_loss."""

import pytest
import torch

from fastcl import loss
from fastcl.inputs import validate_request
from helpers import assert_close

VOCAB = 301


def request(batch, seq, loss_mask=None, attention_mask=None, weight=1.0):
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))
    return validate_request(ids, attention_mask, loss_mask, weight, VOCAB, "cpu")


def by_autograd(logits, req):
    leaf = logits.detach().clone().requires_grad_()
    loss_sum, token_loss = loss.next_token_loss(leaf, req)
    loss_sum.backward()
    return leaf.grad, token_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["all", "loss_mask", "weights", "padded", "one_row_unlearned"])
@pytest.mark.parametrize("chunk_rows", [3, 64])
def test_next_token_gradient_matches_autograd(monkeypatch, dtype, case, chunk_rows):
    # 3: a chunk boundary falls inside every row and some chunks hold no target. 64: a whole
    # sequence in one chunk, as GPU_CHUNK_BYTES gives on a GPU.
    monkeypatch.setattr(loss, "CHUNK_BYTES", chunk_rows * VOCAB * 4)
    batch, seq = 3, 17
    kwargs = {}
    if case == "loss_mask":
        mask = torch.zeros(batch, seq, dtype=torch.bool)
        mask[0, 2:5] = mask[1, 9:] = True  # row 2 learns nothing; row 0 has chunks without targets
        kwargs["loss_mask"] = mask
    elif case == "weights":
        kwargs["weight"] = torch.tensor([0.5, 2.0, 1.25])
    elif case == "padded":
        attn = torch.ones(batch, seq, dtype=torch.long)
        attn[1, :6] = 0
        kwargs["attention_mask"] = attn
    elif case == "one_row_unlearned":
        kwargs["weight"] = torch.tensor([1.0, 0.0, 3.0])
    req = request(batch, seq, **kwargs)
    logits = (torch.randn(batch, seq, VOCAB, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    expected_grad, expected_loss = by_autograd(logits, req)
    grad, token_loss = loss.next_token_gradient(logits, req)
    assert grad.grad.dtype == logits.dtype and grad.grad.shape == logits.shape
    assert_close(token_loss, expected_loss, torch.float32, "per-token loss")
    assert_close(grad.grad, expected_grad, dtype, "gradient of the loss w.r.t. the logits")
    # Rows that are not targets get exactly zero, not a rounding residue.
    untargeted = torch.ones(batch, seq, dtype=torch.bool)
    untargeted[:, :-1] = ~(req.targets & (req.weight[:, None] > 0))
    assert (grad.grad[untargeted] == 0).all()
