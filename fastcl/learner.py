"""Learner: serves and learns with a patched model, steps the fast weights and consolidates them."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from . import state as state_io
from .config import LearnerConfig
from .consolidation import ConsolidationReport, GateWindow, MergeChecker, Snapshot, copy_into, write_merge
from .distributed import Replicas
from .batching import as_rows, prompt_response_batch
from .errors import ConsolidationError, FastclError, InputError
from .inputs import Weight, as_weight, check_vocabulary, validate_request
from .layers import FastLinear
from .loss import LogitsGradient, distillation_loss, next_token_gradient
from .patcher import PatchReport
from .recipe import LearnReport, Recipe, RehearsalReport

log = logging.getLogger("fastcl")


@dataclass
class Counters:
    tokens_observed: int = 0  # target tokens whose gradient was accumulated
    tokens_pending: int = 0  # of those, not yet applied by step()
    requests: int = 0
    steps: int = 0
    skipped_steps: int = 0  # steps refused because an accumulator held NaN/inf
    consolidations: int = 0
    rollbacks: int = 0
    gate_refusals: int = 0
    gate_repaired: int = 0  # merges given repair steps (gate_repair), committed or not
    gate_halved: int = 0  # merges committed at reduced strength (gate_backoff)
    gate_skipped: int = 0  # merges committed without a gate check (gate_every > 1)
    gate_undone: int = 0  # unchecked merges undone by a later refusal (gate_every > 1)
    epoch: int = 0  # projection epoch: consolidations committed minus rolled back


class Learner:
    """Returned by fastcl.patch(); also reachable as model.fastcl."""

    def __init__(self, model: nn.Module, modules: dict[str, FastLinear], config: LearnerConfig,
                 report: PatchReport, original_requires_grad: dict[str, bool], process_group=None, tokenizer=None):
        self.model = model
        self.modules = modules
        self.config = config
        self.report = report
        self.original_requires_grad = original_requires_grad
        self.counters = Counters()
        self.optimizer = self._make_optimizer()
        self._snapshot: Optional[Snapshot] = None
        self._rollback_buffers: dict[str, torch.Tensor] = {}  # reused by every snapshot: no allocation
        self._merge_checker = MergeChecker()
        self._gate_window = GateWindow()  # merges not yet checked by the gate (config.gate_every)
        # The gate's last check refused or used more than half a tolerance: it then checks every
        # merge, not every gate_every-th (and inner_headroom holds the inner steps back).
        self._gate_alert = False
        self._weight_norm: Optional[float] = None
        self._attached = True
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self._accepts_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        self.replicas = Replicas(self, process_group)  # learning together over torch.distributed
        self.recipe = Recipe(self, tokenizer)  # learn(): replay, anchor, gate, schedule

    # ----------------------------------------------------------------- serving and learning
    def observe(self, input_ids, attention_mask=None, loss_mask=None, weight: Weight = 1.0, **model_kwargs):
        """The served forward, and learning from it.

        Runs the model once and returns its usual output (logits, past_key_values), so it can
        serve as generation's prefill. The gradient of sum(weight * next-token loss) over the
        loss_mask tokens is added into the fp32 accumulators; step() divides by the number of
        tokens accumulated, so a step follows the mean token loss whatever the request sizes.
        weight=0 serves without learning. Bad input raises InputError before anything runs.
        """
        self._check_attached()
        request = validate_request(input_ids, attention_mask, loss_mask, weight, self._vocab_size, self.device)
        kwargs = dict(model_kwargs)
        if request.attention_mask is not None:
            kwargs["attention_mask"] = request.attention_mask.long()
            if self._accepts_position_ids and "position_ids" not in kwargs:
                # Left-padded rows must count positions from their first real token.
                kwargs["position_ids"] = (request.attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        n_tokens = int(request.learned_targets.sum())
        if n_tokens == 0:
            with torch.no_grad():
                return self.model(input_ids=request.input_ids, **kwargs)
        output, token_loss = self._learn_from(
            lambda: self.model(input_ids=request.input_ids, **kwargs),
            lambda logits: next_token_gradient(logits, request), n_tokens)
        output.logits = output.logits.detach()
        output.loss = token_loss.mean()
        _detach_cache(output.get("cache", output.get("past_key_values")))
        return output

    def distill(self, teacher_ids, student_ids, response_ids, weight: Weight = 1.0) -> Optional[float]:
        """Context distillation: the model reading teacher_ids (the prompt with its context) is
        the teacher for the response tokens; the model reading student_ids (the prompt without
        it) is trained towards it. Adds the gradient of sum(weight * KL(teacher || student)) over
        response tokens into the accumulators. Each argument is one request (1-D ids) or a batch
        (a list of 1-D ids, ragged lengths are padded). Returns the mean token KL, or None when
        every weight is 0."""
        self._check_attached()
        teachers, students, responses = (as_rows(n, v) for n, v in (
            ("teacher_ids", teacher_ids), ("student_ids", student_ids), ("response_ids", response_ids)))
        if not len(teachers) == len(students) == len(responses):
            raise InputError(f"batch sizes differ: {len(teachers)} teacher, {len(students)} student, "
                             f"{len(responses)} response rows")
        weights = as_weight(weight, len(responses), self.device)
        teacher = prompt_response_batch(teachers, responses, 0, self.device)
        student = prompt_response_batch(students, responses, 0, self.device)
        for name, batch in (("teacher_ids", teacher), ("student_ids", student)):
            check_vocabulary(name, batch.input_ids, self._vocab_size)
        n_tokens = int((weights[student.rows] > 0).sum())
        if n_tokens == 0:
            return None
        with torch.no_grad():
            logits = self.model(input_ids=teacher.input_ids, attention_mask=teacher.attention_mask).logits
            teacher_logprobs = logits[teacher.rows, teacher.cols].float().log_softmax(-1)
            del logits
        _, token_kl = self._learn_from(
            lambda: self.model(input_ids=student.input_ids, attention_mask=student.attention_mask),
            lambda logits: distillation_loss(logits, teacher_logprobs, student.rows, student.cols, weights),
            n_tokens)
        return float(token_kl.mean())

    def learn(self, prompt_ids, response_ids, student_prompt_ids=None, weight: Weight = 1.0,
              teacher_logprobs=None) -> LearnReport:
        """The one call a serving loop makes after answering a request.

        prompt_ids is what the model saw (documents, earlier turns, the question); response_ids
        what it answered. With student_prompt_ids (the same request without its context), the
        in-context behaviour is consolidated: with the default objective "context_gain", the
        response tokens that the context made likelier by more than gain_threshold nats are
        learned by the context-free student. Without it, the response is learned after the
        prompt. weight scales a request (0: ignore; negative is refused). Each argument is one
        request or a batch (lists of ragged rows are padded). The learner then steps and
        consolidates on its schedule (step_every, consolidate_every; 0 leaves it to the caller).

        teacher_logprobs (optional, one 1-D tensor per request): the log-probability of each
        response token under the served prompt, as the serving loop already computed it while
        generating (generate(..., output_logits=True)); given, learn() skips re-running the
        teacher, so learning costs only the student's forward and backward.
        """
        self._check_attached()
        return self.recipe.learn(prompt_ids, response_ids, student_prompt_ids, weight, teacher_logprobs)

    def rehearse(self, steps: Optional[int] = None, requests_per_step: Optional[int] = None,
                 progress=None) -> RehearsalReport:
        """Learn again from the replay buffer while no traffic comes (fastcl.recipe.Recipe.rehearse):
        least-replayed requests first, the anchor beside them, merges gated as usual. By default one
        pass over the buffer in steps of replay_per_step + 1 requests. `progress`: anything with
        update(1) (a tqdm bar), called per step."""
        self._check_attached()
        return self.recipe.rehearse(steps, requests_per_step, progress)

    def add_probe(self, score, tolerance: float, name: Optional[str] = None) -> None:
        """Gate every consolidation on `score(model) -> float` (higher is better): a merge that
        lowers it by more than `tolerance` below its baseline is refused and the fast weights
        dropped. The baseline is measured the first time the gate runs, fast weights bypassed."""
        self.recipe.gate.add(name or getattr(score, "__name__", f"probe{len(self.recipe.gate.probes)}"), score,
                             tolerance)

    @contextlib.contextmanager
    def fast_weights_bypassed(self):
        """Within this block every patched layer behaves exactly as the base layer."""
        for module in self.modules.values():
            module.enabled = False
        try:
            yield
        finally:
            for module in self.modules.values():
                module.enabled = True

    def _learn_from(self, forward, loss_fn, n_tokens):
        """Run forward with grad, backpropagate loss_fn(logits) into the accumulators, count
        n_tokens (an int, or a callable read after the loss, when the loss decides it).

        loss_fn returns (loss, per-token values); the loss is a scalar, or a LogitsGradient (the
        next-token loss, computed outside autograd so that nothing of it is saved)."""
        self._check_fast_weights_trainable()
        with torch.enable_grad():
            output = forward()
            loss, per_token = loss_fn(output.logits)
            if isinstance(loss, LogitsGradient):
                output.logits.backward(loss.grad)
            elif loss.requires_grad:
                loss.backward()
        n_tokens = n_tokens() if callable(n_tokens) else n_tokens
        self.counters.tokens_observed += n_tokens
        self.counters.tokens_pending += n_tokens
        self.counters.requests += 1
        return output, per_token

    def step(self) -> bool:
        """Apply the optimizer to B from the accumulated gradients, then clear them.

        The gradient is the accumulated sum divided by the number of tokens accumulated. Returns
        False (and changes nothing but the cleared accumulators) if there was nothing to apply or
        an accumulator held NaN/inf; the latter is counted in stats()["skipped_steps"].
        With replicas this is a collective that every replica calls, with or without tokens: the
        sums and token counts of all replicas are applied (see fastcl.distributed).
        """
        return self._step()

    def _step(self, moving: Optional[set] = None) -> bool:
        """step(), moving only the layers named in `moving` (None: all); the others' accumulated
        gradients are dropped with the rest, and their optimizer state is left as it was."""
        self._check_attached()
        applied = self._apply_accumulators(moving)
        self.replicas.after_step()  # asynchronous mode: average the replicas every sync_every steps
        return applied

    def _apply_accumulators(self, moving: Optional[set] = None) -> bool:
        n, finite = self.replicas.reduce_accumulators(self.counters.tokens_pending)
        if n == 0:
            return False
        if not finite:
            bad = [name for name, m in self.modules.items() if not torch.isfinite(m.grad_B).all()]
            if bad:  # else another replica held them, and fastcl.distributed said which
                log.warning("fastcl step skipped: NaN/inf in the accumulators of %d layers (first: %s); "
                            "%d tokens dropped", len(bad), bad[0], n)
            self._clear_accumulators()
            self.counters.skipped_steps += 1
            return False
        for name, module in self.modules.items():
            if moving is None or name in moving:  # torch's optimizers skip a parameter without .grad
                module.B.grad = module.grad_B.div_(n)
        self.optimizer.step()
        for module in self.modules.values():
            if module.B.grad is not None:
                module.B.grad = None
                module.b_is_zero = False
        self._clear_accumulators()
        self.counters.steps += 1
        return True

    # ----------------------------------------------------------------- consolidation
    def consolidate(self, gate: bool = True) -> ConsolidationReport:
        """Fold scale * B A into W (fp32 maths, then cast), resample A, zero B, reset the optimizer.

        With gate probes (gate_tolerance, add_probe) and gate=True, the probes score the model
        with the live fast weights first; if one dropped more than its tolerance below its
        baseline, nothing is merged, the fast weights are dropped and the report says so
        (committed=False, gate=the scores). With config.gate_backoff = k, a refused update is first
        halved up to k times and merged at the first strength that passes (report.halvings).
        With config.gate_every = n > 1 the gate scores only every n-th merge while its last check
        used at most half of every tolerance, and every merge otherwise; the merges between are
        committed unchecked (report.gate None), and a refusal undoes them too, bit-exactly
        (report.undone). gate=False merges unchecked and accepts the window so far.

        All or nothing: every merged weight is checked finite before any is written. The state
        before the call is kept so rollback() can restore it exactly. Accumulated gradients not
        yet stepped belong to the old projection and are dropped (reported).
        """
        self._check_attached()
        self.replicas.before_consolidate()  # asynchronous replicas average first: all merge the same B
        start = time.perf_counter()
        live = {name: m for name, m in self.modules.items() if not m.b_is_zero}
        bounds = self._merge_checker.check(live)
        window, asked_for_gate = self._gate_window, gate
        gated = gate and bool(live) and bool(self.recipe.gate.probes)
        check_now = gated and window.merges + 1 >= (1 if self._gate_alert else self.config.gate_every)
        gate = self.recipe.check_gate(skip=not check_now) if gated else None
        halvings, repairs, before_fixes = 0, 0, None
        if gate is not None and not gate.passed and (self.config.gate_repair or self.config.gate_backoff):
            # rollback() restores B and the optimizer as they were before the call.
            before_fixes = ({name: m.B.detach().clone() for name, m in self.modules.items()},
                            copy.deepcopy(self.optimizer.state_dict()))
        if gate is not None and not gate.passed and self.config.gate_repair:
            # Keep what was learned and take drift out of it (fastcl.recipe.Recipe.repair_drift).
            gate, repairs = self.recipe.repair_drift(gate)
            live = {name: m for name, m in self.modules.items() if not m.b_is_zero}
            bounds = self._merge_checker.check(live)
        if gate is not None and not gate.passed and self.config.gate_backoff:
            # Keep part of what was learned: halve the update (exact in fp32) until it passes.
            while not gate.passed and halvings < self.config.gate_backoff:
                with torch.no_grad():
                    for m in live.values():
                        m.B.mul_(0.5)
                halvings += 1
                gate = self.recipe.check_gate()
        if gate is not None:
            # Drift near the tolerance: check every merge, so a refusal costs one merge, not a window.
            self._gate_alert = not gate.passed or gate.near_limit()
        if gate is not None and not gate.passed:
            discarded = self._discard_pending("consolidate() refused by the gate")
            undone = 0
            if window.merges:
                undone = window.undo(self.modules)
                self._snapshot = None  # the merge it would undo is gone
                self._merge_checker.forget()
                self.counters.gate_undone += undone
            log.warning("fastcl consolidation refused by the gate, fast weights dropped%s: %s",
                        f", {undone} unchecked merges undone" if undone else "", gate)
            self._set_epoch(self.counters.epoch)  # same projection, B = 0, fresh optimizer
            self.counters.gate_refusals += 1
            return ConsolidationReport(self.counters.epoch, 0, 0.0, 0.0, discarded, time.perf_counter() - start,
                                       committed=False, gate=gate, undone=undone, repairs=repairs)
        discarded = self._discard_pending("consolidate()")
        if gated and gate is None:
            window.cover(live)  # unchecked: keep what this merge overwrites until the gate passes
            self.counters.gate_skipped += 1
        elif gate is not None or (live and not asked_for_gate):
            window.close()  # checked and passed, or merged with gate=False: the window is accepted
        self._snapshot = self._take_snapshot(live)
        if before_fixes is not None:
            self._snapshot.fast_weights, self._snapshot.optimizer_state = before_fixes
        self.counters.gate_repaired += bool(repairs)
        if halvings:
            self.counters.gate_halved += 1
        delta_norm = write_merge(live)
        self._merge_checker.committed(bounds)
        self.counters.consolidations += 1
        self._set_epoch(self.counters.epoch + 1)
        report = ConsolidationReport(self.counters.epoch, len(live), delta_norm,
                                     delta_norm / self._reference_weight_norm(), discarded,
                                     time.perf_counter() - start, gate=gate, halvings=halvings, repairs=repairs)
        self.replicas.after_consolidate()  # with replicas: check they hold bit-identical weights
        return report

    def rollback(self) -> None:
        """Restore the weights, fast weights, projection and optimizer exactly as before the last
        consolidate()."""
        self._check_attached()
        snap = self._snapshot
        if snap is None:
            raise ConsolidationError("nothing to roll back: no consolidate() since the last rollback")
        if not self.config.keep_rollback:
            raise ConsolidationError("rollback() needs keep_rollback=True (the merged weights were not kept)")
        self._discard_pending("rollback()")
        if self._gate_window.merges:  # the merge undone here was one of the unchecked ones
            self._gate_window.merges -= 1
            if not self._gate_window.merges:
                self._gate_window.close()
        self._set_epoch(snap.epoch)
        self._restore_fitted(snap.fitted)
        self._merge_checker.forget()
        with torch.no_grad():
            for name, weight in snap.weights.items():
                self.modules[name].weight_matrix().copy_(weight)
            for name, module in self.modules.items():
                module.B.copy_(snap.fast_weights[name])
                module.b_is_zero = name not in snap.live
        self.optimizer.load_state_dict(snap.optimizer_state)
        self.counters.rollbacks += 1
        self._snapshot = None

    def has_unmerged_updates(self) -> bool:
        return any(not m.b_is_zero for m in self.modules.values())

    # ----------------------------------------------------------------- persistence and stats
    def save(self, path, include_weights: Optional[bool] = None) -> None:
        """Write the learner's state to a safetensors file (see fastcl.state)."""
        self._check_attached()
        state_io.save(self, path, include_weights)

    def load(self, path) -> None:
        """Restore a state written by save(); refuses, changing nothing, if it does not fit.

        With replicas this is a collective: the loaded state is then checked against the group
        (the other replicas call verify_replicas()), and a mismatch raises ReplicaMismatchError.
        """
        self._check_attached()
        state_io.load(self, path)
        self.replicas.after_load()

    def verify_replicas(self) -> None:
        """Check that every replica holds the same state (a collective; see Replicas.verify)."""
        self._check_attached()
        self.replicas.verify()

    def stats(self) -> dict:
        """Counters and the bytes the learner holds; the bytes never grow with tokens served."""
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        modules = list(self.modules.values())
        optim = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        held = {
            "fast_weights": nbytes(m.B for m in modules),
            "accumulators": nbytes(m.grad_B for m in modules),
            "projections": nbytes(m.A for m in modules),
            "optimizer": nbytes(optim),
            "rollback": nbytes(self._rollback_buffers.values()),
            "gate_window": self._gate_window.nbytes(),  # weights before unchecked merges (gate_every > 1)
            "serving": sum(m.serving_copy_bytes() for m in modules),  # B laid out for no-grad forwards
        }
        held["total"] = sum(held.values())
        replay = len(self.recipe.replay)
        return {**asdict(self.counters), "layers": len(modules), "bytes_held": held, "replay_buffer": replay,
                "seconds": dict(self.recipe.costs), "tokens_processed": dict(self.recipe.tokens)}

    # ----------------------------------------------------------------- internals
    @property
    def device(self) -> torch.device:
        return next(iter(self.modules.values())).weight.device

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """One parameter group per learning rate (layer_options can set one per layer)."""
        c = self.config
        by_lr: dict[float, list] = {}
        for name, module in self.modules.items():
            by_lr.setdefault(float(c.layer(name)["lr"]), []).append(module.B)
        groups = [{"params": params, "lr": lr} for lr, params in by_lr.items()]
        if c.optimizer == "adam":
            return torch.optim.Adam(groups, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        return torch.optim.SGD(groups, lr=c.lr, weight_decay=c.weight_decay)

    def optimizer_slots(self) -> list[int]:
        """Per patched layer, in order, the index of its B in the optimizer's state_dict()."""
        order = [p for group in self.optimizer.param_groups for p in group["params"]]
        slot = {id(p): i for i, p in enumerate(order)}
        return [slot[id(m.B)] for m in self.modules.values()]

    def _reference_weight_norm(self) -> float:
        if self._weight_norm is None:
            self._weight_norm = sum(float(m.weight.float().pow(2).sum()) for m in self.modules.values()) ** 0.5
        return self._weight_norm

    @torch.no_grad()
    def _take_snapshot(self, live: dict[str, FastLinear]) -> Snapshot:
        weights = {}
        if self.config.keep_rollback:
            for name, m in live.items():
                weights[name] = copy_into(self._rollback_buffers, name, m.weight_matrix())
        return Snapshot(
            live=set(live),
            weights=weights,
            fast_weights={name: m.B.detach().clone() for name, m in self.modules.items()},
            optimizer_state=copy.deepcopy(self.optimizer.state_dict()),
            epoch=self.counters.epoch,
            fitted={name: m.A.clone() for name, m in self.modules.items() if m.fitted},
        )

    @torch.no_grad()
    def _set_epoch(self, epoch: int) -> None:
        """Move every layer to projection `epoch`: regenerate A, zero B, fresh optimizer state."""
        self.counters.epoch = epoch
        for module in self.modules.values():
            module.resample(epoch)
            module.B.zero_()
            module.b_is_zero = True
        self.optimizer = self._make_optimizer()

    @torch.no_grad()
    def _restore_fitted(self, projections: dict[str, torch.Tensor]) -> None:
        """Put back projections fitted to inputs (projection="whitened"): the seed cannot."""
        for name, A in projections.items():
            module = self.modules[name]
            module.A.copy_(A)
            module.fitted = True

    def _clear_accumulators(self) -> None:
        for module in self.modules.values():
            module.grad_B.zero_()
        self.counters.tokens_pending = 0

    def _discard_pending(self, caller: str) -> int:
        pending = self.counters.tokens_pending
        if pending:
            log.warning("fastcl %s dropped %d observed tokens not yet applied by step()", caller, pending)
            self._clear_accumulators()
        return pending

    def _check_fast_weights_trainable(self) -> None:
        frozen = [name for name, m in self.modules.items() if not m.B.requires_grad]
        if frozen:
            raise FastclError(f"fast weights of {len(frozen)} layers (first: {frozen[0]}) were frozen with "
                              "requires_grad_(False); observe() needs them trainable")

    def _check_attached(self) -> None:
        if not self._attached:
            raise FastclError("this learner was unpatched; patch the model again to keep learning")

    def detach(self) -> None:
        self._attached = False


def _detach_cache(cache) -> None:
    """Cut the served KV cache from the freed graph so generation continues without it."""
    for layer in getattr(cache, "layers", []) or []:
        for attr in ("keys", "values"):
            tensor = getattr(layer, attr, None)
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                setattr(layer, attr, tensor.detach())
