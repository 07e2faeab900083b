"""Replicas: serving replicas that learn together over torch.distributed.

Every replica serves its own traffic and accumulates, per patched layer, the d_out x r sum of
per-token low-rank gradients. A is regenerated from the shared (seed, layer, epoch) and never
sent, so only those accumulators travel: about r / d_in of a full-gradient all-reduce.

Synchronous mode (the default, config.sync_every=None). Inside step(), every replica sends

  1. its token count, a "my accumulators hold NaN/inf" flag and a digest of its fitted layers'
     layout (one all_gather of 3 int64), then
  2. all its accumulators packed in one flat fp32 buffer (one all_reduce, SUM), unless step 1
     showed that nobody has tokens or somebody has NaN/inf, in which case every replica skips
     it and returns the same answer.

Each replica then divides the summed accumulators by the summed token count. That is DDP's
average (the mean over replicas of their sums, divided by the mean over replicas of their
token counts: the 1/world factors cancel) and it is exactly what one learner that observed the
concatenated traffic computes, sum of per-token gradients / number of tokens, so a replica that
saw ten times more tokens weighs ten times more, as its tokens would in one learner. Every
replica receives the same reduced bits from the all-reduce (the property DDP relies on too), so
the optimizer updates identical B from identical gradients and the replicas stay bit-identical;
consolidate() then folds identical c B A into identical W.

Asynchronous mode (config.sync_every=N). step() applies only this replica's accumulators, with
no communication, so each replica learns from its own traffic at once; every N step() calls
(and before consolidate() and verify()) the replicas average their fast weights B and
optimizer moments, weighted by the tokens each applied since the last sync. With plain SGD and
N=1 this equals synchronous mode; otherwise it trades an error (measured by
bench/bench_distributed.py) for N times fewer, 3 times larger (B and the two Adam moments)
messages.

A fitted to requests (projection="whitened", the default recipe's MLP layers) cannot be
regenerated, and each replica sees its own requests. In synchronous mode such a layer's A holds
rank x world rows, one block of `rank` rows a replica (FastLinear.fit_block): each replica fits
its own block to its request and learns in it alone (the other rows are zero in its forwards,
so its accumulator is zero outside its block's columns), and the epoch's first applied step
gathers every replica's block of A and of the accumulator (one all_gather for all such layers,
beside the all_reduce of the others), so all hold the same A before B turns live; a block's
gradient is divided by its own replica's tokens. A round of requests is then learned, at those
layers, as each replica's learner would learn its own alone (to fp32 rounding), and every
replica merges all of them. Asynchronous mode refuses a fitted A.

step(), consolidate(), verify() and, in a group, load() are collectives: every replica must
call them in the same order, also a replica that saw no traffic.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch

from .errors import FastclError, ReplicaMismatchError
from .state import weight_checksum

if TYPE_CHECKING:
    import torch.distributed as dist

    from .learner import Learner

log = logging.getLogger("fastcl")

# Optimizer state tensors shaped like B that asynchronous mode averages; fixed per optimizer so
# that every replica packs the same layout even before its first step created the state.
_MOMENTS = {"adam": ("exp_avg", "exp_avg_sq"), "sgd": ()}
# Config fields that may differ between replicas without making their states differ.
_LOCAL_CONFIG = ("backend", "keep_rollback")
# What verify() compares per layer, in the order of the names used in its error.
_PER_LAYER = ("weights", "fast weights (B)", "projection (A)", "optimizer state")


@dataclass
class ReplicaStats:
    collectives: int = 0  # calls into torch.distributed made by this replica
    bytes_sent: int = 0  # payload bytes handed to those calls by this replica
    syncs: int = 0  # group-wide applications (sync mode: steps; async: averagings)
    verifications: int = 0


class Replicas:
    """The link between one learner and its replicas (learner.replicas).

    process_group: None uses the default group whenever torch.distributed is initialised (looked
    up at each call, so the group may be initialised after patch()); a ProcessGroup uses that
    group; False never communicates, for processes that initialise torch.distributed for other
    reasons (tensor-parallel serving) while each learner learns alone.
    """

    def __init__(self, learner: "Learner", process_group: Union[None, bool, "dist.ProcessGroup"] = None):
        self.learner = learner
        self.process_group = check_process_group(process_group)
        self.stats = ReplicaStats()
        self.refusal: Optional[str] = None  # set when verify() found this replica off the group's state
        self._tokens_since_sync = 0  # async mode: tokens this replica applied since the last average
        self._calls_since_sync = 0  # async mode: step() calls since the last average

    # ----------------------------------------------------------------- the group
    @property
    def group(self):
        """The process group in use, or None when this learner learns alone."""
        if self.process_group not in (None, False):
            dist = _dist()
            if not (dist.is_available() and dist.is_initialized()):
                raise FastclError("a process_group was given to patch() but torch.distributed is not initialised")
        return learning_group(self.process_group)

    @property
    def world_size(self) -> int:
        group = self.group
        return 1 if group is None else _dist().get_world_size(group)

    @property
    def rank(self) -> int:
        group = self.group
        return 0 if group is None else _dist().get_rank(group)

    @property
    def asynchronous(self) -> bool:
        return self.learner.config.sync_every is not None

    # ----------------------------------------------------------------- hooks called by the learner
    def reduce_accumulators(self, tokens: int) -> tuple[int, bool]:
        """Called at the top of step() with this replica's pending token count.

        Returns (tokens, finite) for the step to apply; in a synchronous group the accumulators
        then hold the group's sums and `tokens` is the group's count, identical on every replica.
        """
        grads = [m.grad_B for m in self.learner.modules.values()]
        group = self.group
        if group is not None:
            self._refuse_if_off_group()
        if group is None or self.asynchronous:
            finite = tokens == 0 or _all_finite(grads)
            if self.asynchronous and tokens and finite:
                self._tokens_since_sync += tokens
            return tokens, finite
        local_finite = tokens == 0 or _all_finite(grads)
        table = self._all_gather_ints([tokens, 0 if local_finite else 1, self._block_layout()], group)
        problem = _first_difference(table[:, 2:], ["the layout of the fitted A's blocks"])
        if problem is not None:  # the collectives below would not match: every replica raises instead
            ranks, majority, _ = problem
            raise ReplicaMismatchError(
                f"replica(s) {ranks} of {table.shape[0]} hold fitted layers laid out for another group than "
                f"rank(s) {majority} (patch() every replica after torch.distributed is initialised, in the "
                "group that learns)", ranks=ranks)
        total = int(table[:, 0].sum())
        not_finite = table[:, 1].nonzero().flatten().tolist()
        if total == 0:
            return 0, True
        if not_finite:
            # Decided from the gathered flags, so every replica skips together; the reduce is not sent.
            log.warning("fastcl step skipped on every replica: NaN/inf in the accumulators of rank(s) %s; "
                        "%d tokens dropped", not_finite, total)
            return total, False
        # A fitted layer's accumulator at the epoch's first applied step is zero outside this
        # replica's block: its block is gathered with its block of A, the rest summed.
        modules = self.learner.modules.values()
        blocks = [m for m in modules if m.fit_block is not None and m.b_is_zero]
        summed = [m.grad_B for m in modules if m.fit_block is None or not m.b_is_zero]
        if summed:
            self._all_reduce_sum(summed, group)
        if blocks:
            self._gather_blocks(blocks, group, table[:, 0].tolist(), total)
        self.stats.syncs += 1
        # A sum of finite values can still overflow; every replica holds the same bits, so this
        # check decides the same way everywhere.
        return total, _all_finite(grads)

    def _block_layout(self) -> int:
        """A digest of the fitted layers' blocks (fastcl.patcher lays them out from the group),
        equal on replicas patched in the same group."""
        me = self.rank
        return _digest([[m.rank, 0, True] if m.fit_block is None else
                        [m.rank, m.fit_block[1], m.fit_block[0] == me * m.fit_block[1]]
                        for m in self.learner.modules.values()])

    @torch.no_grad()
    def _gather_blocks(self, blocks: list, group, tokens: list[int], total: int) -> None:
        """At the epoch's first applied step (B still zero, the same on every replica): every
        replica's block of each fitted A (fit_block) and its block of the accumulator, in one
        all_gather, so all hold the same A and gradient before the step makes B live. A replica
        that did not learn this epoch sends its block of the seed's draw and zeros.

        A block's gradient is its own replica's alone, so it is rescaled to be divided by that
        replica's tokens (`tokens`, by rank) rather than the group's `total`: a replica's block
        then steps as a lone learner's would on its request, to fp32 rounding (under Adam's eps, a group's
        mean would learn each request less the more replicas there are)."""
        dist = _dist()

        def parts(m, rank):  # (A's rows, the accumulator's columns) of rank's block
            rows = m.fit_block[1]
            return m.A[rank * rows:(rank + 1) * rows], m.grad_B[:, rank * rows:(rank + 1) * rows]

        mine = torch.cat([t.reshape(-1).float() for m in blocks for t in parts(m, self.rank)])
        mine = mine.to(self._device(group))
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        self.stats.collectives += 1
        self.stats.bytes_sent += mine.numel() * mine.element_size()
        for rank, flat in enumerate(gathered):
            offset = 0
            for m in blocks:
                for t in parts(m, rank):
                    t.copy_(flat[offset:offset + t.numel()].view(t.shape))
                    offset += t.numel()
                count = tokens[rank]
                if count and count != total:
                    parts(m, rank)[1].mul_(total / count)
        for m in blocks:
            m.own_block_only = False
            m.fitted = True  # not the seed's draw: saved with the state

    def check_fit_blocks(self) -> None:
        """Before a fit (projection="whitened"): a learner whose fitted A was laid out in blocks
        for a group must still be in one, and a group must be synchronous. A synchronous group
        whose replicas were laid out for different groups is refused by every replica at the
        step (reduce_accumulators compares the layouts), not here by one of them alone."""
        group = self.group
        if group is None:
            if any(m.fit_block is not None for m in self.learner.modules.values()):
                raise FastclError("this learner was patched in a group of replicas and now learns alone; its fitted "
                                  "A holds a block per replica: patch the model again to learn alone")
        elif self.asynchronous:
            raise FastclError("projection='whitened' with asynchronous replicas (sync_every): each replica would fit "
                              "its own A between averages; learn synchronously or with projection='random'")

    def after_step(self) -> None:
        """Called at the end of every step(), applied or not: the asynchronous schedule."""
        if not self.asynchronous or self.group is None:
            return
        self._calls_since_sync += 1
        if self._calls_since_sync >= self.learner.config.sync_every:
            self.sync()

    def before_consolidate(self) -> None:
        if self.group is None:
            return
        self._refuse_if_off_group()
        if self.asynchronous:
            self.sync()  # every replica must merge the same B

    def after_consolidate(self) -> None:
        if self.group is not None:
            self.verify()

    def after_load(self) -> None:
        self._tokens_since_sync = 0
        self._calls_since_sync = 0
        if self.group is not None:
            self.verify()

    # ----------------------------------------------------------------- asynchronous mode
    @torch.no_grad()
    def sync(self) -> bool:
        """Average B and the optimizer moments over the replicas, weighted by the tokens each
        applied since the last sync (a replica that learned nothing has weight 0 and takes the
        others' state). A collective; a no-op without a group or in synchronous mode, where
        replicas never drift. Returns True if anything was averaged."""
        group = self.group
        if group is None or not self.asynchronous:
            return False
        learner = self.learner
        params = [m.B for m in learner.modules.values()]
        moments = _MOMENTS[learner.config.optimizer]
        my_step = max((int(learner.optimizer.state[p]["step"]) for p in params
                       if "step" in learner.optimizer.state.get(p, {})), default=0)
        table = self._all_gather_ints([self._tokens_since_sync, my_step], group)
        total = int(table[:, 0].sum())
        self._calls_since_sync = 0
        if total == 0:
            return False  # nobody changed anything since the last sync
        weight = self._tokens_since_sync / total
        tensors = []
        for p in params:
            state = learner.optimizer.state.get(p, {})
            tensors.append(p.detach())
            tensors += [state[key] if key in state else torch.zeros_like(p) for key in moments]
        scaled = [t.float() * weight for t in tensors]
        self._all_reduce_sum(scaled, group)
        step = int(table[:, 1].max())
        for i, p in enumerate(params):
            chunk = scaled[i * (1 + len(moments)):(i + 1) * (1 + len(moments))]
            p.copy_(chunk[0])
            if moments:
                state = learner.optimizer.state[p]
                old_step = state.get("step")
                for key, value in zip(moments, chunk[1:]):
                    state[key] = value.to(p.dtype)
                # Adam's bias correction uses the step count: take the furthest replica's.
                state["step"] = (torch.tensor(float(step), dtype=old_step.dtype, device=old_step.device)
                                 if isinstance(old_step, torch.Tensor) else torch.tensor(float(step)))
        for m in learner.modules.values():
            m.b_is_zero = m.b_is_zero and not bool(m.B.any())
        self._tokens_since_sync = 0
        self.stats.syncs += 1
        return True

    # ----------------------------------------------------------------- verification
    def verify(self) -> None:
        """Check with a checksum exchange that every replica holds the same state.

        Compares the patched layer set, the config (all but backend and keep_rollback), the
        projection epoch, and per layer the exact checksums of W, B, A and the optimizer state.
        On a mismatch every replica raises ReplicaMismatchError naming the ranks and what
        differs; the ranks outside the majority (ties go to the group holding the lowest rank)
        also refuse step() and consolidate() until a load() that verifies. Accumulators and
        traffic counters are per replica and not compared. A collective; a no-op alone.
        """
        group = self.group
        if group is None:
            return
        self.sync()  # asynchronous replicas differ between syncs by design
        learner = self.learner
        self.stats.verifications += 1
        layout = [[name, m.out_features, m.in_features, m.rank, str(m.weight.dtype)]
                  for name, m in learner.modules.items()]
        config = {k: v for k, v in learner.config.to_dict().items() if k not in _LOCAL_CONFIG}
        header = [_digest(layout), _digest(config), learner.counters.epoch]
        table = self._all_gather_ints(header, group)
        problem = _first_difference(table, ["patched layers", "config", "projection epoch"])
        if problem is None:
            # Same layout everywhere, so the per-layer tables have the same size on every rank.
            names = list(learner.modules)
            table = self._all_gather_ints([c for m in learner.modules.values() for c in self._layer_checksums(m)], group)
            problem = _first_difference(table, [f"{kind} at {name}" for name in names for kind in _PER_LAYER])
        if problem is None:
            self.refusal = None
            return
        ranks, majority, field = problem
        me = self.rank
        message = (f"replica state mismatch: rank(s) {ranks} of {table.shape[0]} differ from the group "
                   f"(held by rank(s) {majority}) in {field}")
        if me in ranks:
            self.refusal = (f"{message}; this replica (rank {me}) refuses to step or consolidate until it loads "
                            "the group's state (learner.load) and the check passes")
            raise ReplicaMismatchError(self.refusal, ranks=ranks)
        raise ReplicaMismatchError(f"{message}; this replica (rank {me}) agrees with the majority", ranks=ranks)

    def _layer_checksums(self, module) -> list[int]:
        state = self.learner.optimizer.state.get(module.B, {})
        optim = [[key, weight_checksum(value) if isinstance(value, torch.Tensor) and value.dim()
                  else None if value is None else float(value)] for key, value in sorted(state.items())]
        # A fitted block by block differs between replicas until the epoch's first applied step
        # gathers the blocks (B is zero until then): not compared in that window.
        projection = 0 if module.fit_block is not None and module.b_is_zero else weight_checksum(module.A)
        return [weight_checksum(module.weight), weight_checksum(module.B), projection, _digest(optim)]

    def _refuse_if_off_group(self) -> None:
        if self.refusal is not None:
            raise ReplicaMismatchError(self.refusal)

    # ----------------------------------------------------------------- transport
    def _device(self, group) -> torch.device:
        backend = _dist().get_backend(group)
        if backend == "gloo":
            return torch.device("cpu")
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return self.learner.device

    def _all_gather_ints(self, values: list[int], group) -> torch.Tensor:
        """Every replica's `values` as a (world, len) int64 table on the CPU."""
        dist = _dist()
        mine = torch.tensor(values, dtype=torch.int64, device=self._device(group))
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, mine, group=group)
        self.stats.collectives += 1
        self.stats.bytes_sent += mine.numel() * mine.element_size()
        return torch.stack(rows).cpu()

    def _all_reduce_sum(self, tensors: list[torch.Tensor], group) -> None:
        """Sum `tensors` over the group in place, as one flat fp32 buffer: one call, whatever the
        number of layers (a call per layer would pay its latency hundreds of times)."""
        flat = torch.cat([t.reshape(-1).float() for t in tensors]).to(self._device(group))
        _dist().all_reduce(flat, op=_dist().ReduceOp.SUM, group=group)
        self.stats.collectives += 1
        self.stats.bytes_sent += flat.numel() * flat.element_size()
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def check_process_group(process_group):
    """patch(process_group=...) takes None, False or a torch.distributed ProcessGroup."""
    if process_group is None or process_group is False:
        return process_group
    dist = _dist()
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise FastclError(f"process_group takes a torch.distributed ProcessGroup, None (the default group when "
                          f"initialised) or False (learn alone), got {process_group!r}")
    return process_group


def learning_group(process_group):
    """The group a learner patched with `process_group` (None, False or a ProcessGroup) learns
    with: None when it learns alone (False, torch.distributed not initialised, or one process)."""
    if process_group is False:
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def group_layout(process_group) -> Optional[tuple[int, int]]:
    """(this process's rank, world size) in the group a learner patched with `process_group`
    learns with, or None when it learns alone."""
    group = learning_group(process_group)
    if group is None:
        return None
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def _dist():
    import torch.distributed as dist

    return dist


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _digest(value) -> int:
    """A 63-bit digest of a JSON-able value (fits an int64 tensor)."""
    raw = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    return int.from_bytes(raw[:8], "little") & (2**63 - 1)


def _first_difference(table: torch.Tensor, fields: list[str]) -> Optional[tuple[list[int], list[int], str]]:
    """(ranks off the majority row, ranks holding it, what differs) or None if all rows agree.

    The majority row is the reference (ties: the one held by the lowest rank). `what` names the
    first differing field and counts the others."""
    rows = [tuple(r) for r in table.tolist()]
    if len(set(rows)) == 1:
        return None
    counts = {row: rows.count(row) for row in rows}
    reference = max(rows, key=lambda row: (counts[row], -rows.index(row)))
    majority = [i for i, row in enumerate(rows) if row == reference]
    ranks = [i for i, row in enumerate(rows) if row != reference]
    cols = [c for c in range(len(fields)) if any(row[c] != reference[c] for row in rows)]
    what = fields[cols[0]] + (f" (and {len(cols) - 1} more differences)" if len(cols) > 1 else "")
    return ranks, majority, what


def bytes_per_step(learner: "Learner", world_size: int = 2) -> dict:
    """Payload bytes one replica hands to torch.distributed per synchronous step, from the real
    patched modules, against a full-gradient all-reduce of the same layers (fp32 gradients)."""
    modules = list(learner.modules.values())
    accumulators = sum(m.grad_B.numel() for m in modules) * 4
    full = sum(m.in_features * m.out_features for m in modules) * 4
    meta = 3 * 8  # token count, NaN/inf flag and the fitted blocks' layout, int64
    moments = len(_MOMENTS[learner.config.optimizer])
    # A fitted layer in a group (fit_block), at an epoch's first applied step (every step with
    # consolidate_every=1): this replica's block of A and of its accumulator, gathered, not summed.
    fitted = [m for m in modules if m.fit_block is not None]
    projection = sum(m.fit_block[1] * m.in_features for m in fitted) * 4
    first_step = accumulators - sum(m.grad_B.numel() - m.fit_block[1] * m.out_features for m in fitted) * 4
    return {
        "layers": len(modules),
        "fitted_projection": projection,
        "fastcl_sync": first_step + projection + meta,
        "later_steps": accumulators + meta,  # the epoch's later steps sum every accumulator whole
        "full_gradient": full,
        "ratio": (first_step + projection + meta) / full,
        # asynchronous mode: B and the moments every sync_every steps, plus its 2-int64 exchange
        "async_per_sync": accumulators * (1 + moments) + 2 * 8,
        # a ring all-reduce moves 2 (w-1)/w of the buffer per replica on the wire, for both
        "ring_wire_factor": 2 * (world_size - 1) / world_size,
    }
