"""learn(): what a serving loop calls after answering, and the schedule around it.

Per request, the first pass is the only cost on the serving path: one no-grad forward of the
teacher (the prompt as served) and one forward+backward of the student (the prompt without its
context). Replay, extra passes, the anchor and the gate cost extra compute, which `costs`
records per component so the trade is visible.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from .batching import as_rows, prompt_response_batch
from .errors import FastclError, InputError
from .guard import Anchor, Gate, answer_choice_probe, text_likelihood_probe
from .inputs import as_weight, check_vocabulary
from .loss import Contrast, context_gain_loss, next_token_loss_on
from .self_study import sample_answers
from .timing import seconds_since

BUILTIN_PROBE = "general_text_loglik"
ANSWER_PROBE = "general_answers_choice"


def context_span(item) -> tuple[int, int]:
    """(start, end): the served prompt's tokens [start, len - end) are the context its student
    prompt lacks (the served prompt less the start and end it shares with the student prompt)."""
    teacher, student = item.teacher, item.student
    start = 0
    while start < min(len(teacher), len(student)) and teacher[start] == student[start]:
        start += 1
    end = 0
    while end < min(len(teacher), len(student)) - start and teacher[-1 - end] == student[-1 - end]:
        end += 1
    return start, end


def in_context(item) -> torch.Tensor:
    """Per response token of `item`: does it occur in the context its student prompt lacks.
    Computed once a request and kept on it, since replay asks again."""
    if item.found_in_context is not None:
        return item.found_in_context
    start, end = context_span(item)
    context = set(item.teacher[start:len(item.teacher) - end])
    item.found_in_context = torch.tensor([t in context for t in item.response], dtype=torch.bool)
    return item.found_in_context


def entity_span(item) -> Optional[tuple[int, int]]:
    """The student prompt's longest run of at least two tokens that also occurs, in order, in the
    removed context: in practice the name of what the question is about, which a question shares
    with its document. (first, past-the-end) in the student prompt, or None; kept on the item."""
    if item.entity is not None:
        return item.entity or None
    start, end = context_span(item)
    context, student = item.teacher[start:len(item.teacher) - end], item.student
    best, best_end, run = 0, 0, [0] * (len(context) + 1)  # run[j]: common run ending at context[j - 1]
    for i in range(start, len(student)):
        previous, run = run, [0] * (len(context) + 1)
        for j, token in enumerate(context, 1):
            if student[i] == token:
                run[j] = previous[j - 1] + 1
                if run[j] > best:
                    best, best_end = run[j], i + 1
    item.entity = (best_end - best, best_end) if best >= 2 else ()
    return item.entity or None


def swapped_prompt(item, donor) -> Optional[list[int]]:
    """item's student prompt with its entity (entity_span) replaced by donor's, or None where
    either has none or both name the same."""
    own, other = entity_span(item), entity_span(donor)
    if own is None or other is None:
        return None
    name = donor.student[other[0]:other[1]]
    if name == item.student[own[0]:own[1]]:
        return None
    return item.student[:own[0]] + name + item.student[own[1]:]


@dataclass
class Interaction:
    """One served request, as learned: response tokens after the served (teacher) prompt and
    after the context-free (student) prompt. teacher_logprobs holds, per response token, its
    log-probability under the served prompt, fixed when the request was served."""

    teacher: list[int]
    student: Optional[list[int]]  # None: no context was removed, learn the response after `teacher`
    response: list[int]
    weight: float
    teacher_logprobs: Optional[torch.Tensor] = None
    # contrast_margin: which response tokens context gain selected the first time
    # this was learned, and their gain then (nats; 0 where not selected).
    taught: Optional[torch.Tensor] = None
    taught_gain: Optional[torch.Tensor] = None
    found_in_context: Optional[torch.Tensor] = None  # grounded: in_context(), once computed
    entity: Optional[tuple] = None  # swap_negatives, learn_at: entity_span(), once computed (() where none)
    step_index: Optional[int] = None  # the scheduled step that learned it first (replay_schedule)
    replays: int = 0  # how often replay (or rehearse()) has learned it again

    @property
    def prompt(self) -> list[int]:
        """What the learning forward reads before the response."""
        return self.student if self.student is not None else self.teacher


@dataclass
class RehearsalReport:
    steps: int  # optimizer steps taken
    requests: int  # buffered requests learned again, counted once per step that drew them
    consolidations: list = field(default_factory=list)  # a ConsolidationReport per merge that ran


@dataclass
class LearnReport:
    requests: int
    tokens_learned: int  # response tokens that received a gradient in the first pass
    stepped: bool = False
    consolidation: Optional[object] = None  # a ConsolidationReport when one ran


class Recipe:
    """Holds the replay buffer, the anchor and the gate of one learner, and runs its schedule."""

    def __init__(self, learner, tokenizer=None):
        self.learner = learner
        config = learner.config
        self.replay: deque[Interaction] = deque(maxlen=config.replay or None)
        self._rng = random.Random(config.seed)
        self.pending: list[Interaction] = []
        self.calls_since_step = 0
        self.steps_since_consolidation = 0
        self.scheduled_steps = 0  # scheduled_step() calls so far: the clock of replay_schedule
        self.requests_seen = 0  # seeds each request's self-study samples
        self.costs: dict[str, float] = defaultdict(float)  # seconds per component
        self.tokens: dict[str, int] = defaultdict(int)  # tokens processed per component
        # The anchor's text also serves gate_repair, with or without the anchor term.
        self.anchor = (Anchor.from_tokenizer(tokenizer, config.anchor_prompts, window=config.anchor_window,
                                             reply_tokens=config.anchor_reply_tokens)
                       if config.anchored else None)
        # Per patched layer, how many inner steps move it (layer_options may set its own).
        self.inner_counts = {name: config.layer(name)["inner_steps"] for name in learner.modules}
        # The anchor's mean KL to its reference over the window the last step took (nats a token),
        # read before that step moved anything: how far text of the anchor's kind has drifted.
        self.anchor_kl: Optional[float] = None
        # anchor_kl over the anchor's last full cycle of windows (inner_kl_limit)
        self._cycle_kl: deque[float] = deque(maxlen=len(self.anchor) if self.anchor is not None else None)
        self.gate = Gate()
        if config.gate_tolerance is not None:
            self.gate.add(BUILTIN_PROBE, text_likelihood_probe(tokenizer, config.gate_text), config.gate_tolerance)
        if config.gate_answer_tolerance is not None:
            self.gate.add(ANSWER_PROBE, answer_choice_probe(tokenizer, config.gate_answers),
                          config.gate_answer_tolerance)

    # ------------------------------------------------------------------ requests
    def interactions(self, prompt_ids, response_ids, student_prompt_ids, weight,
                     teacher_logprobs=None) -> list[Interaction]:
        prompts = as_rows("prompt_ids", prompt_ids)
        responses = as_rows("response_ids", response_ids)
        students = (as_rows("student_prompt_ids", student_prompt_ids) if student_prompt_ids is not None
                    else [None] * len(prompts))
        if not len(prompts) == len(responses) == len(students):
            raise InputError(f"batch sizes differ: {len(prompts)} prompts, {len(students)} student prompts, "
                             f"{len(responses)} responses")
        weights = as_weight(weight, len(prompts), "cpu").tolist()
        items = [Interaction(p, s, r, w) for p, s, r, w in zip(prompts, students, responses, weights)]
        for name, rows in (("prompt_ids", prompts), ("student_prompt_ids", students), ("response_ids", responses)):
            for row in rows:
                if row:
                    check_vocabulary(name, torch.tensor(row), self.learner._vocab_size)
        prompt_response_batch([i.prompt for i in items], responses, 0)  # raises on an empty prompt or response
        if teacher_logprobs is not None:
            given = [teacher_logprobs] if isinstance(teacher_logprobs, torch.Tensor) and teacher_logprobs.dim() == 1 \
                else list(teacher_logprobs)
            if len(given) != len(items):
                raise InputError(f"teacher_logprobs has {len(given)} rows for {len(items)} requests")
            for i, (item, lp) in enumerate(zip(items, given)):
                lp = torch.as_tensor(lp, dtype=torch.float32).detach().cpu()
                if lp.shape != (len(item.response),) or not torch.isfinite(lp).all():
                    raise InputError(f"teacher_logprobs row {i} must be {len(item.response)} finite values, "
                                     f"one per response token; got shape {tuple(lp.shape)}")
                item.teacher_logprobs = lp
        return items

    @torch.no_grad()
    def score_teacher(self, items: list[Interaction]) -> None:
        """Fix each response token's log-probability under the served prompt."""
        start = time.perf_counter()
        learner = self.learner
        batch = prompt_response_batch([i.teacher for i in items], [i.response for i in items], 0, learner.device)
        logits = learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        distribution = logits[batch.rows, batch.cols].float().log_softmax(-1)
        token_logprobs = distribution.gather(-1, batch.targets[:, None]).squeeze(-1)
        offset = 0
        for item in items:
            if item.teacher_logprobs is None:  # given ones (from generation) are kept
                item.teacher_logprobs = token_logprobs[offset: offset + len(item.response)]
            offset += len(item.response)
        self.costs["teacher"] += seconds_since(start, learner.device)
        self.tokens["teacher"] += int(batch.attention_mask.sum())

    def accumulate(self, items: list[Interaction], component: str) -> int:
        """Add the gradient of the configured objective over `items`; return tokens learned."""
        items = [i for i in items if i.weight > 0]
        if not items:
            return 0
        start = time.perf_counter()
        learner = self.learner
        objective = learner.config.objective
        contextual = [i for i in items if i.student is not None]
        plain = [i for i in items if i.student is None]
        learned = 0
        if contextual and objective == "distill":
            learner.distill([i.teacher for i in contextual], [i.student for i in contextual],
                            [i.response for i in contextual], [i.weight for i in contextual])
            learned += sum(len(i.response) for i in contextual)
        elif contextual and objective == "context_gain":
            learned += self._accumulate_gain(contextual)
        elif contextual:
            plain += contextual
        if plain:
            learned += self._accumulate_next_token(plain)
        self.costs[component] += seconds_since(start, learner.device)
        self.tokens[component] += sum(len(i.prompt) + len(i.response) for i in items)
        return learned

    def _accumulate_gain(self, items: list[Interaction]) -> int:
        learner, config = self.learner, self.learner.config
        batch = prompt_response_batch([i.student for i in items], [i.response for i in items], 0, learner.device)
        # Given ones are kept on the host, scored ones where the model is; replay mixes both.
        teacher = torch.cat([i.teacher_logprobs.to(learner.device) for i in items])
        weights = torch.tensor([i.weight for i in items], device=learner.device)
        learned_count = []
        contrast = self._contrast(items) if config.contrast_margin else None
        allowed = torch.cat([in_context(i) for i in items]).to(learner.device) if config.learns_grounded else None

        learned_masks = []
        sketch_masks = {learn_at: self._sketch_mask(items, batch, learn_at) for learn_at in config.learn_at_values}
        fitting = self._fit_projection_to(batch, sketch_masks)
        for name, module in learner.modules.items():
            module.sketch_mask = sketch_masks[config.layer(name)["learn_at"]]

        def loss(logits):
            total, learned, gain = context_gain_loss(logits, teacher, batch.rows, batch.cols, batch.targets, weights,
                                                     config.gain_threshold, contrast, allowed)
            learned_count.append(int(learned.sum()))
            if config.swap_negatives:
                learned_masks.append(learned & (gain >= config.swap_min_gain))
            if contrast is not None:
                sizes = [len(i.response) for i in items]
                for item, mask, first in zip(items, learned.split(sizes), (gain * learned).split(sizes)):
                    if item.taught is None:
                        item.taught, item.taught_gain = mask.cpu(), first.detach().cpu()
            # Nothing new in these responses and no intruder within the margin: skip the backward.
            active = learned_count[0] > 0 or (contrast is not None and bool(total.detach() != 0))
            return (total if active else total.detach()), learned

        try:
            learner._learn_from(lambda: learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask),
                                loss, n_tokens=lambda: learned_count[0])
        finally:
            for module in fitting:  # a layer the forward did not reach must not fit later
                module.fit_positions = None
            for module in learner.modules.values():
                module.sketch_mask = None
        if config.swap_negatives and learned_count[0]:
            self._push_down_swapped(items, learned_masks[0])
        return learned_count[0]

    def _sketch_mask(self, items: list[Interaction], batch, learn_at: str) -> Optional[torch.Tensor]:
        """learn_at: the positions of `batch` a layer's dB learns from, each row's entity (all of
        the row's tokens where entity_span finds none), and at entity_answer_weight the positions
        that predict its response; None for learn_at="all"."""
        if learn_at == "all":
            return None
        mask = batch.attention_mask.to("cpu", torch.float32)  # never padding: the whitened fit reads these rows
        keyed = torch.zeros(mask.shape[0], dtype=torch.bool)
        for row, item in enumerate(items):
            span = entity_span(item)
            if span is not None:
                first, end = span
                mask[row] = 0.0
                mask[row, end - 1 if learn_at == "entity_last" else first:end] = 1.0
                keyed[row] = True
        weight = self.learner.config.entity_answer_weight
        if weight:
            rows, cols = batch.rows.cpu(), batch.cols.cpu()
            answering = keyed[rows]
            rows, cols = rows[answering], cols[answering]
            mask[rows, cols] = torch.clamp(mask[rows, cols], min=weight)
        return mask.to(self.learner.device)

    def _push_down_swapped(self, items: list[Interaction], learned: torch.Tensor) -> None:
        """swap_negatives: each request's `learned` tokens (those with at least swap_min_gain of
        context gain), after its student prompt with the entity swapped for the newest other
        request's (the step's, then the replay buffer's), get swap_negatives x their
        log-probability as loss, so the step lowers them there. The gradient adds to the step's
        without counting tokens: it steers the step, it is not more to learn."""
        learner, config = self.learner, self.learner.config
        donors = [*reversed(self.pending), *reversed(self.replay)]
        chosen = []
        for item, mask in zip(items, learned.split([len(i.response) for i in items])):
            if not mask.any():
                continue
            prompt = next((p for p in (swapped_prompt(item, d) for d in donors if d.student is not None)
                           if p is not None), None)
            if prompt is not None:
                chosen.append((prompt, item, mask))
        if not chosen:
            return
        batch = prompt_response_batch([p for p, _, _ in chosen], [i.response for _, i, _ in chosen], 0,
                                      learner.device)
        mask = torch.cat([m for _, _, m in chosen]).to(learner.device)
        weights = torch.tensor([i.weight for _, i, _ in chosen], device=learner.device)

        def loss(logits):
            logprobs = logits[batch.rows, batch.cols].float().log_softmax(-1)
            logprobs = logprobs.gather(-1, batch.targets[:, None]).squeeze(-1)
            return config.swap_negatives * (logprobs * mask * weights[batch.rows]).sum(), logprobs.detach()

        learner._learn_from(lambda: learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask),
                            loss, n_tokens=0)

    def _contrast(self, items: list[Interaction]) -> Contrast:
        """contrast_margin: the tokens other requests were taught with at least contrast_min_gain
        nats (those in the replay buffer and those waiting for this step) as the pool to keep
        below each of `items`' answers; a request's own response tokens are never its intruders."""
        device, least = self.learner.device, self.learner.config.contrast_min_gain

        def strong(item):  # per response token: taught, with at least `least` nats of gain
            if item.taught is None:
                return torch.zeros(len(item.response), dtype=torch.bool)
            return item.taught & (item.taught_gain >= least)

        ids = sorted({t for other in (*self.replay, *self.pending)
                      for t, keep in zip(other.response, strong(other).tolist()) if keep})
        pool = torch.tensor(ids, dtype=torch.long, device=device)
        own = torch.stack([torch.isin(pool, torch.tensor(i.response, device=device)) for i in items]) \
            if ids else torch.zeros(len(items), 0, dtype=torch.bool, device=device)
        owner = torch.repeat_interleave(torch.arange(len(items), device=device),
                                        torch.tensor([len(i.response) for i in items], device=device))
        positions = torch.cat([strong(i) for i in items]).to(device)
        return Contrast(pool, own[owner], positions, self.learner.config.contrast_margin, least)

    def _fit_projection_to(self, batch, sketch_masks: dict[str, Optional[torch.Tensor]]) -> list:
        """projection="whitened": at the first learn() of a projection epoch (every B zero, nothing
        accumulated), each whitened layer's A is fitted, during the learning forward, to its inputs
        at the positions its dB learns from: those that predict response tokens, or its learn_at's
        (sketch_masks). Returns the layers told to fit."""
        learner, config = self.learner, self.learner.config
        if not config.whitens or learner.counters.tokens_pending:
            return []
        modules = list(learner.modules.values())
        if not all(m.b_is_zero for m in modules):
            return []
        learner.replicas.check_fit_blocks()
        answering = batch.rows * batch.input_ids.shape[1] + batch.cols
        positions = {learn_at: answering if mask is None else (mask.flatten() == 1).nonzero().squeeze(-1)
                     for learn_at, mask in sketch_masks.items()}
        fitting = []
        for name, module in learner.modules.items():
            options = config.layer(name)
            if options["projection"] == "whitened":
                module.fit_positions = positions[options["learn_at"]]
                fitting.append(module)
        return fitting

    def _accumulate_next_token(self, items: list[Interaction]) -> int:
        learner = self.learner
        batch = prompt_response_batch([i.prompt for i in items], [i.response for i in items], 0, learner.device)
        weights = torch.tensor([i.weight for i in items], device=learner.device)
        learner._learn_from(lambda: learner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask),
                            lambda logits: next_token_loss_on(logits, batch, weights), n_tokens=batch.num_targets)
        return batch.num_targets

    # ------------------------------------------------------------------ the schedule
    def learn(self, prompt_ids, response_ids, student_prompt_ids=None, weight=1.0,
              teacher_logprobs=None) -> LearnReport:
        items = self.interactions(prompt_ids, response_ids, student_prompt_ids, weight, teacher_logprobs)
        config = self.learner.config
        studied = [i for i in items if i.student is not None and i.weight > 0]
        unscored = [i for i in studied if i.teacher_logprobs is None]
        if config.objective == "context_gain" and unscored:
            self.score_teacher(unscored)
        report = LearnReport(requests=len(items), tokens_learned=self.accumulate(items, "learn"))
        if config.self_study and studied:
            self.accumulate(self.self_study(studied), "self_study")
        self.requests_seen += len(items)
        self.pending += items
        self.calls_since_step += 1
        if config.step_every and self.calls_since_step >= config.step_every:
            report.stepped, report.consolidation = self.scheduled_step()
        return report

    def self_study(self, items: list[Interaction]) -> list[Interaction]:
        """config.self_study more answers to each request, sampled with its served prompt (the
        generation's cost is "self_study_generate"), as requests to learn like the served one."""
        config, start = self.learner.config, time.perf_counter()
        extra = []
        for index, item in enumerate(items):
            seed = config.seed * 1_000_003 + self.requests_seen + index
            for response, logprobs in sample_answers(self.learner.model, item.teacher, config.self_study,
                                                     config.self_study_temperature, config.self_study_tokens, seed):
                extra.append(Interaction(item.teacher, item.student, response, item.weight, logprobs))
        self.costs["self_study_generate"] += seconds_since(start, self.learner.device)
        return extra

    def scheduled_step(self):
        """passes x (replay + anchor + step), then up to inner_steps on the pending requests alone,
        then maybe a consolidation."""
        config = self.learner.config
        stepped = False
        for p in range(config.passes):
            if p > 0:
                self.accumulate(self.pending, "passes")
            if (config.replay_per_step or config.replay_recent or config.replay_schedule) and self.replay:
                self._learn_again(self._replay_sample(), "replay")
            stepped |= self._anchor_and_step()
        self._inner_steps(stepped)
        if config.replay:
            for item in self.pending:
                item.step_index = self.scheduled_steps
            self.replay.extend(self.pending)
        self.scheduled_steps += 1
        self.pending = []
        self.calls_since_step = 0
        return stepped, self._consolidate_on_schedule(stepped)

    def _learn_again(self, items: list[Interaction], component: str) -> None:
        self.accumulate(items, component)
        for item in items:
            item.replays += 1

    def _anchor_and_step(self, moving: Optional[set] = None) -> bool:
        """The anchor's term on general text (scaled to the tokens pending), then one step (of the
        layers named in `moving`; None: all)."""
        learner, config = self.learner, self.learner.config
        if config.anchor_weight > 0 and learner.counters.tokens_pending > 0:
            start = time.perf_counter()
            self.anchor_kl, tokens = self.anchor.accumulate(learner,
                                                            scale=config.anchor_weight * learner.counters.tokens_pending)
            self._cycle_kl.append(self.anchor_kl)
            self.costs["anchor"] += seconds_since(start, learner.device)
            self.tokens["anchor"] += tokens
        return learner._step(moving)

    def _consolidate_on_schedule(self, stepped: bool):
        learner, config = self.learner, self.learner.config
        consolidation = None
        if stepped or self._asynchronous_replica():  # they count rounds, not local steps: all consolidate together
            self.steps_since_consolidation += 1
        if config.consolidate_every and self.steps_since_consolidation >= config.consolidate_every:
            start, checked = time.perf_counter(), self._gate_seconds()
            consolidation = learner.consolidate()
            self.costs["consolidate"] += seconds_since(start, learner.device) - (self._gate_seconds() - checked)
            self.steps_since_consolidation = 0
        return consolidation

    def rehearse(self, steps: Optional[int] = None, requests_per_step: Optional[int] = None,
                 progress=None) -> RehearsalReport:
        """Idle-time learning from the replay buffer, in passes: each pass learns every buffered
        request once more, the least replayed so far first (the oldest first among equals), a
        step's worth at a time with the anchor beside them, consolidating on the usual schedule,
        gate included. Random replay during serving gives the newest requests almost no replays
        before traffic stops; this gives them theirs first. Defaults: steps of a serving step's
        size (replay_per_step + 1 requests), one pass."""
        learner, config = self.learner, self.learner.config
        if self.pending:
            raise FastclError(f"rehearse(): {len(self.pending)} learned requests are waiting for their step; "
                              f"call learner.step() (step_every=0) before rehearsing")
        if requests_per_step is None:
            requests_per_step = config.replay_per_step + 1
        for name, value in (("steps", steps), ("requests_per_step", requests_per_step)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InputError(f"rehearse(): {name} must be a positive integer, got {value!r}")
        if learner.replicas.group is not None:
            raise FastclError("rehearse() is for one learner: replicas' buffers differ in size, and synchronous "
                              "replicas must all step together")
        if steps is None:
            steps = -(-len(self.replay) // requests_per_step)
        report = RehearsalReport(steps=0, requests=0)
        queue: list[Interaction] = []
        for _ in range(steps if self.replay else 0):
            if not queue:  # a new pass over the buffer: every request once, the least replayed first
                queue = sorted(self.replay, key=lambda item: item.replays)  # stable: the oldest first among equals
            chosen, queue = queue[:requests_per_step], queue[requests_per_step:]
            self._learn_again(chosen, "rehearse")
            stepped = self._anchor_and_step()
            report.steps += int(stepped)
            report.requests += len(chosen)
            consolidation = self._consolidate_on_schedule(stepped)
            if consolidation is not None:
                report.consolidations.append(consolidation)
            if progress is not None:
                progress.update(1)
        return report

    def _gate_seconds(self) -> float:
        """What consolidate() spends on the gate (its checks, and gate_repair's steps)."""
        return self.costs["gate"] + self.costs.get("repair", 0.0)

    def _replay_sample(self) -> list:
        """The requests replay_schedule says are due this step, the newest replay_recent of the
        others, and replay_per_step of the rest at random (the same draws as before
        replay_recent and replay_schedule existed when both are off)."""
        config = self.learner.config
        buffer = list(self.replay)
        schedule = config.replay_schedule
        due = [i for i in buffer if self.scheduled_steps - i.step_index in schedule] if schedule else []
        if due:
            buffer = [i for i in buffer if all(i is not d for d in due)]
        split = max(len(buffer) - config.replay_recent, 0)
        older, recent = buffer[:split], buffer[split:]
        return due + recent + self._rng.sample(older, min(config.replay_per_step, len(older)))

    def _asynchronous_replica(self) -> bool:
        replicas = self.learner.replicas
        return replicas.asynchronous and replicas.group is not None

    def _inner_steps(self, stepped: bool) -> None:
        """Up to inner_steps more steps on the pending context-gain requests alone (the k-th moves
        only the layers whose own inner_steps is at least k), stopping once a step finds nothing
        to learn (every response token within gain_threshold of the teacher); other requests have
        no such rule and get none; with inner_headroom, none while the gate is on alert, and with
        inner_kl_limit none while the anchor's KL over its last cycle is above it. Replicas
        must call step() equally often: synchronous ones decide from `stepped` and step()'s
        answer, both group-wide; asynchronous ones take every round."""
        learner, config, counts = self.learner, self.learner.config, self.inner_counts
        most = max(counts.values(), default=0)
        if not most:  # the default: nothing to decide on every request
            return
        gained = [i for i in self.pending if i.student is not None] if config.objective == "context_gain" else []
        lockstep = self._asynchronous_replica()
        enter = lockstep or (stepped and (bool(gained) or learner.replicas.group is not None))
        enter &= not (config.inner_headroom and learner._gate_alert)  # the same verdict on every replica
        enter &= config.inner_kl_limit is None or sum(self._cycle_kl) <= config.inner_kl_limit * len(self._cycle_kl)
        for k in (range(1, most + 1) if enter else ()):
            self.accumulate(gained, "inner")
            moving = None if min(counts.values()) >= k else {name for name, count in counts.items() if count >= k}
            moved = self._anchor_and_step(moving) if config.inner_anchor else learner._step(moving)
            if not moved and not lockstep:
                break

    def repair_drift(self, gate):
        """gate_repair: while the gate refuses, up to that many optimizer steps on the live fast
        weights with the anchor's loss alone (every window of its text, the mean of their mean
        token losses), each from a fresh optimizer so that it follows the anchor and not the
        requests' momentum; the gate checks again after each. Returns (the last verdict, steps).
        The caller keeps B and the optimizer as they were, for rollback(); accumulated gradients
        not yet stepped are put back afterwards."""
        learner = self.learner
        repairs = 0
        start = time.perf_counter()
        held = {name: m.grad_B.clone() for name, m in learner.modules.items()} if learner.counters.tokens_pending else {}
        pending = learner.counters.tokens_pending
        learner._clear_accumulators()
        try:
            while not gate.passed and repairs < learner.config.gate_repair:
                learner.optimizer = learner._make_optimizer()
                for _ in range(len(self.anchor)):  # a full cycle: the anchor term's own order is unchanged
                    _, tokens = self.anchor.accumulate(learner, scale=1.0)
                    self.tokens["repair"] += tokens
                learner.counters.tokens_pending = len(self.anchor)  # step() divides by this
                learner.step()
                repairs += 1
                self.costs["repair"] += seconds_since(start, learner.device)
                gate = self.check_gate()
                start = time.perf_counter()
        finally:
            learner._clear_accumulators()
            for name, grad in held.items():
                learner.modules[name].grad_B.copy_(grad)
            learner.counters.tokens_pending = pending
        return gate, repairs

    def check_gate(self, skip: bool = False):
        """The gate's verdict on the live fast weights, or None without probes; skip=True (an
        unchecked merge) only makes sure the baseline exists."""
        if not self.gate.probes:
            return None
        start = time.perf_counter()
        if self.anchor is not None and self.gate.baseline is None:
            self.anchor.prepare(self.learner)  # gate_repair's reference: the model the baseline scores
        result = None
        if skip:
            self.gate.measure_baseline(self.learner)
        else:
            result = self.gate.check(self.learner)
        self.costs["gate"] += seconds_since(start, self.learner.device)
        return result
