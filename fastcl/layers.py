"""FastLinear: an nn.Linear (or GPT-2 Conv1D) with a low-rank fast-weight path."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import backends, lowrank_linear
from .precision import input_gradient_dtype
from .projection import fit_to_inputs, make_projection, whitened_rows

try:  # GPT-2 style layers store W as (d_in, d_out); patched through a transposed view.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for the op itself
    Conv1D = None

LINEAR_TYPES = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_transposed(module: nn.Module) -> bool:
    return Conv1D is not None and type(module) is Conv1D


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an nn.Linear or Conv1D."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_transposed(module) else (w.shape[0], w.shape[1])


class FastLinear(nn.Module):
    """y = base(x) + scale (x A^T) B^T.

    Shares the base layer's weight and bias Parameters (state_dict keys stay the same) and keeps
    the original module, untouched, for unpatch. A is a non-persistent buffer regenerated from
    (seed, layer_index, epoch), orthogonal to the `protected` input directions when given; B and
    grad_B are fp32 whatever the model dtype.
    """

    def __init__(self, base: nn.Module, *, layer_index: int, rank: int, scale: float, seed: int, backend: str,
                 protected: Optional[torch.Tensor] = None, whitener=None, backward_dtype: Optional[str] = None,
                 served_weight: float = 0.0):
        super().__init__()
        if type(base) not in LINEAR_TYPES:
            raise TypeError(f"FastLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        d_out, d_in = linear_shape(base)
        self.in_features, self.out_features = d_in, d_out
        self.rank, self.scale, self.seed, self.layer_index, self.backend = rank, scale, seed, layer_index, backend
        self.transposed = is_transposed(base)
        self.weight = base.weight
        self.bias = base.bias
        object.__setattr__(self, "base", base)  # not a submodule: its Parameters are ours already
        device = base.weight.device
        # (d_in, k) orthonormal input directions that A avoids (fastcl.protection), or None.
        self.register_buffer("protected", None if protected is None else protected.float().to(device), persistent=False)
        self.register_buffer("A", self._projection(epoch=0, device=device), persistent=False)
        self.B = nn.Parameter(torch.zeros(d_out, rank, dtype=torch.float32, device=device))
        self.register_buffer("grad_B", torch.zeros(d_out, rank, dtype=torch.float32, device=device), persistent=False)
        # Set by the learner: lets the served forward skip the adapter while B is known zero.
        self.b_is_zero = True
        self.enabled = True  # False: behave exactly as the base layer (Learner.fast_weights_bypassed)
        # What no-grad forwards with live fast weights reuse: (key, run, copy of B it holds), see
        # _serving_forward; at most one extra copy of B.
        self._serving = None
        # projection="whitened": general text's input geometry (fastcl.protection.Whitener); the
        # learner sets fit_positions while B is zero, and the next grad forward fits A to its inputs
        # there before the sketch is taken. fitted: A is not the seed's draw (saved with the state).
        self.whitener = whitener.to(device) if whitener is not None else None
        self.fit_positions: Optional[torch.Tensor] = None
        self.fitted = False
        # Replicas (fastcl.distributed): (first row, rows) of A that this replica fits; A then
        # holds rank x world rows, one block a replica, and the rows outside this replica's block
        # stay zero in its learning forwards (own_block_only) until the group's first applied step
        # of the epoch gathers every replica's block. None: the whole A is this learner's.
        self.fit_block: Optional[tuple[int, int]] = None
        self.own_block_only = False
        # learn_at: set by the learner around a learning forward; the rows of x that dB learns from.
        self.sketch_mask: Optional[torch.Tensor] = None
        # projection_served: the mean whitened input moment of the requests fitted so far (fp64,
        # d_in x d_in, made on the first fit), counted with this weight against general text's.
        self.served_weight = served_weight
        self.served_moment: Optional[torch.Tensor] = None
        self.served_requests = 0
        # fastcl.precision: the setting, and the dtype dX's products run in for this layer's weight.
        self.backward_dtype = backward_dtype
        self.dx_dtype = input_gradient_dtype(backward_dtype, self.weight.dtype, device.type)

    def _projection(self, epoch: int, device) -> torch.Tensor:
        return make_projection(self.seed, self.layer_index, epoch, self.rank, self.in_features, self.weight.dtype, device,
                               avoid=self.protected)

    def weight_matrix(self) -> torch.Tensor:
        """W as (d_out, d_in); a view for Conv1D, so writes go to the shared Parameter."""
        return self.weight.t() if self.transposed else self.weight

    def resample(self, epoch: int) -> None:
        self.A.copy_(self._projection(epoch, self.A.device))
        self.fitted = False
        self.own_block_only = False

    @torch.compiler.disable  # A changed in place, between two graphs
    def keep_own_block(self) -> None:
        """Zero A outside this replica's block (fit_block), while B is zero: the gradient this
        replica accumulates then lands in its own block's columns of B only."""
        if not self.b_is_zero:
            raise RuntimeError("keep_own_block() needs B = 0: A would change under live fast weights")
        first, rows = self.fit_block
        self.A[:first].zero_()
        self.A[first + rows:].zero_()
        self.own_block_only = True

    @torch.compiler.disable  # under torch.compile: eager code between two graphs (an SVD, and A changed in place)
    def fit_projection(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """A := fit_to_inputs() on x's rows at `positions` (flat indices over x's leading dims).
        Only while B is zero, so the layer's function does not change."""
        if not self.b_is_zero:
            raise RuntimeError("fit_projection() needs B = 0: A would change under live fast weights")
        X = x.detach().reshape(-1, self.in_features)[positions]
        if self.fit_block is None:
            self.A.copy_(fit_to_inputs(self.A, X, self.whitener, self.protected, self._served_metric()))
        else:
            first, rows = self.fit_block
            block = self.A[first:first + rows]
            block.copy_(fit_to_inputs(block, X, self.whitener, self.protected, self._served_metric()))
            self.keep_own_block()
        self.fitted = True
        if self.served_weight:
            self._count_served(X)

    def _served_metric(self) -> Optional[torch.Tensor]:
        """I + served_weight x the mean whitened moment of earlier requests (None before any)."""
        if not self.served_weight or not self.served_requests:
            return None
        metric = self.served_moment * (self.served_weight / self.served_requests)
        metric.diagonal().add_(1.0)
        return metric

    def _count_served(self, X: torch.Tensor) -> None:
        """Add one request's mean whitened input moment (its rows after the protected directions
        are removed, as the fit sees them)."""
        Xw = whitened_rows(X, self.whitener, self.protected).double()
        moment = Xw.t() @ Xw / max(Xw.shape[0], 1)
        self.served_moment = moment if self.served_moment is None else self.served_moment.add_(moment)
        self.served_requests += 1

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in fp32, shape (d_out, d_in)."""
        return torch.mm(self.B, self.A.float()).mul_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cheapest checks first: in decode this runs 210 times a token for SmolLM2.
        if not self.enabled or (self.b_is_zero and not (torch.is_grad_enabled() and self.B.requires_grad)):
            if self.transposed:
                return self.base(x)
            # nn.Linear's own forward, without a second module call: bit-identical output.
            return F.linear(x, self.weight, self.bias)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._serving_forward(x)(x)  # decode with live fast weights: operands prepared once
        if self.fit_positions is not None:
            positions, self.fit_positions = self.fit_positions, None
            self.fit_projection(x, positions)
        elif self.fit_block is not None and self.b_is_zero and not self.own_block_only:
            self.keep_own_block()  # a learning forward that does not fit (observe()): still its block only
        return lowrank_linear(x, self.weight_matrix(), self.bias, self.A, self.B, self.grad_B, self.scale, self.backend,
                              self.dx_dtype, self.sketch_mask)

    def _serving_forward(self, x: torch.Tensor):
        """The backend's forward with W, b, A and B bound, rebuilt whenever one of them may have
        changed. B's version counter catches every in-place change (step, load, consolidate,
        rollback); the data pointers catch replaced tensors (model.to, .data assignment)."""
        params, buffers = self._parameters, self._buffers  # direct reads: nn.Module.__getattr__ is slow here
        B, weight, bias, A = params["B"], params["weight"], params.get("bias"), buffers["A"]
        key = (B._version, B.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), A.data_ptr(),
               x.dtype, x.device, self.backend)
        serving = self._serving
        if serving is None or serving[0] != key:
            impl = backends.implementation(self.backend, x.device)
            run, copy = backends.serving_forward(impl, self.weight_matrix(), bias, A, B.detach(), self.scale, x.dtype)
            serving = self._serving = (key, run, copy)
        return serving[1]

    def __getstate__(self):  # copy.deepcopy and pickle: the prepared forward is a closure over this instance
        state = super().__getstate__()
        state["_serving"] = None
        return state

    def serving_copy_bytes(self) -> int:
        """Bytes of the copy of B kept for no-grad forwards (0 where the backend reads B itself)."""
        copy = None if self._serving is None else self._serving[2]
        return 0 if copy is None else copy.numel() * copy.element_size()

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not demote the fast weights or the accumulator; A follows W.
        protected = self.protected  # it defines A: follows the device, never rounded
        self._serving = None  # it holds the old tensors
        super()._apply(fn, recurse)
        self.base.weight, self.base.bias = self.weight, self.bias  # in case torch swapped Parameters
        if self.B.dtype != torch.float32:
            self.B.data = self.B.data.float()
        if self.grad_B.dtype != torch.float32:
            self.grad_B = self.grad_B.float()
        if protected is not None:
            self.protected = protected.to(self.weight.device)
        if self.whitener is not None:
            self.whitener = self.whitener.to(self.weight.device)
        if self.served_moment is not None:
            self.served_moment = self.served_moment.to(self.weight.device)
        if self.A.dtype != self.weight.dtype:
            self.A = self.A.to(self.weight.dtype)
        self.dx_dtype = input_gradient_dtype(self.backward_dtype, self.weight.dtype, self.weight.device.type)
        return self

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return (
            f"{kind}(in={self.in_features}, out={self.out_features}, bias={self.bias is not None}), "
            f"rank={self.rank}, scale={self.scale:g}, backend={self.backend}"
            + ("" if self.fit_block is None else f", fits rows {self.fit_block[0]}+{self.fit_block[1]} of A")
        )
