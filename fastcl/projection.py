"""The frozen projection A: random, regenerated from (seed, layer index, epoch), never stored;
or fitted to one request's inputs (fit_to_inputs, projection="whitened"), then saved with the state.

Entries are i.i.d. N(0, 1/d_in), so each row has unit norm in expectation and x A^T keeps the
scale of x. Only the CPU generator and elementwise scaling are used (no QR or other BLAS call),
so every replica and every machine regenerates the same bits; a protected basis (`avoid`) adds
two small CPU products (replicas on one kind of machine agree; Replicas.verify() checks A).
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch


def projection_seed(seed: int, layer_index: int, epoch: int) -> int:
    """A 63-bit generator seed that is distinct for every (seed, layer, epoch)."""
    digest = hashlib.sha256(f"fastcl:{seed}:{layer_index}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_projection(
    seed: int,
    layer_index: int,
    epoch: int,
    rank: int,
    d_in: int,
    dtype: torch.dtype,
    device: torch.device | str,
    avoid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A (rank x d_in) in `dtype` on `device`. With `avoid` (d_in x k, orthonormal columns), the
    rows are made orthogonal to its columns (fastcl.protection): x A^T then ignores x's
    component in those directions."""
    generator = torch.Generator(device="cpu").manual_seed(projection_seed(seed, layer_index, epoch))
    A = torch.randn(rank, d_in, generator=generator, dtype=torch.float32)
    A.mul_(d_in**-0.5)
    if avoid is not None:
        avoid = avoid.detach().to(device="cpu", dtype=torch.float32)
        A -= (A @ avoid) @ avoid.t()
    return A.to(device=device, dtype=dtype)


def whitened_rows(X: torch.Tensor, whitener, avoid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """X's rows (fp32) without the protected directions `avoid`, whitened: what a fit sees."""
    X = X.float()
    if avoid is not None:
        X = X - (X @ avoid) @ avoid.t()
    return whitener.apply(X)


@torch.no_grad()
def fit_to_inputs(drawn: torch.Tensor, X: torch.Tensor, whitener, avoid: Optional[torch.Tensor] = None,
                  served: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A (rank x d_in, fp32) for learning from inputs X (n x d_in): its rows span the directions
    in which X stands out most from general text, so B's gradient keeps most of the full one
    (dW lies in the span of the inputs) while general text sees the update no more than through
    a random row.

    The rows are the leading right singular vectors y of X C^-1/2 (the whitener), mapped back as
    C^-1/2 y and scaled to tr(C)/d of general-text energy, a random row's expectation; without
    the protected directions `avoid`. Rows beyond X's rank keep the random draw `drawn`, made
    orthogonal to the fitted ones.

    `served` (d x d, symmetric positive definite, in whitened coordinates: I + weight x the mean
    whitened input moment of earlier requests) also counts earlier traffic as what not to stand
    out from: the rows then maximise X's energy over general text's plus earlier requests', the
    generalised eigenproblem solved through served's Cholesky factor L. What every request shares
    (the chat template, "a city question") is played down; what this request alone has (its
    entity) is kept, so an update keyed there moves other requests' answers less.
    """
    Xw = whitened_rows(X, whitener, avoid)
    factor = None
    if served is not None:
        factor = torch.linalg.cholesky(served.to(Xw.device, torch.float64))
        Xw = torch.linalg.solve_triangular(factor, Xw.double().t(), upper=False).t().float()  # X_w L^-T
    _, S, Vh = torch.linalg.svd(Xw, full_matrices=False)
    rank = drawn.shape[0]
    k = min(rank, int((S > S[0] * 1e-4).sum())) if S.numel() and S[0] > 0 else 0
    A = drawn.float().clone()
    if k:
        W = Vh[:k]
        if factor is not None:  # back from L's coordinates to whitened ones, unit rows
            W = torch.linalg.solve_triangular(factor.t(), W.double().t(), upper=True).t().float()
            W = W / W.norm(dim=1, keepdim=True)
        V = whitener.apply(W) * whitener.level  # v^T C v = level^2 = tr(C)/d
        if avoid is not None:
            V = V - (V @ avoid) @ avoid.t()
        basis = torch.linalg.qr(V.t())[0].t()
        A[k:] -= (A[k:] @ basis.t()) @ basis
        A[:k] = V
    return A
