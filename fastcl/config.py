"""LearnerConfig: every knob of a learner, validated once, saved with its state."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Optional, Sequence, Union

from .guard import GATE_ANSWERS, GATE_TEXT
from .ops.backends import CHOICES as BACKEND_CHOICES

OPTIMIZERS = ("adam", "sgd")
OBJECTIVES = ("context_gain", "distill", "next_token")
PROJECTIONS = ("random", "whitened")
BACKWARD_DTYPES = ("auto", "bfloat16", None)
LEARN_AT = ("all", "entity", "entity_last")
LAYER_OPTIONS = ("learn_at", "projection", "lr", "inner_steps")  # what layer_options may set per layer
# The default layer_options (layer_options="auto"): every patched layer under an `mlp` module
# (Llama, Qwen2, Mistral, GPT-NeoX and GPT-2 name their feed-forward block so; tested) learns at
# the entity in a fitted A at 2e-3, attention at every position at the learner's lr, 1.5e-3 with
# this preset (bench/RESULTS.md, "The default keys the MLP to the entity").
# Read-only, so that one caller's edit cannot change what the next one patches with.
MLP_ENTITY_KEYED = MappingProxyType(
    {r".*\.mlp\..*": MappingProxyType({"learn_at": "entity", "projection": "whitened", "lr": 2e-3})})
# lr=None takes the step measured with the layer_options in use: with the preset, or without any.
PRESET_LR, PLAIN_LR = 1.5e-3, 3e-3
_PRESET = {pattern: dict(options) for pattern, options in MLP_ENTITY_KEYED.items()}  # as _check_layer_options keeps it


def name_matches(patterns: Iterable[str], name: str) -> Optional[str]:
    """The first pattern that matches the whole qualified name or its last component."""
    leaf = name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if re.fullmatch(pattern, name) or re.fullmatch(pattern, leaf):
            return pattern
    return None


@dataclass
class LearnerConfig:
    rank: int = 16
    alpha: Optional[float] = None  # scale c = alpha / rank; None means alpha = rank, so c = 1
    seed: int = 0
    lr: Optional[float] = None  # None: PRESET_LR with MLP_ENTITY_KEYED (the default), PLAIN_LR otherwise
    optimizer: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 3e-4  # Adam's; near the gradients' scale (~1e-3) it damps updates of weak coordinates
    weight_decay: float = 0.0
    backend: str = "auto"
    # The dtype of the backward's input-gradient products (fastcl.precision): "auto" runs them in
    # bf16 for fp32 models on CPUs with native bf16, "bfloat16" always, None in the model's dtype.
    # What is learned (dB) and everything served stay in full precision.
    backward_dtype: Optional[str] = "auto"
    targets: Optional[Sequence[str]] = None
    exclude: Optional[Sequence[str]] = None
    keep_rollback: bool = True  # keep a copy of the merged weights so rollback() is exact
    # Replicas (fastcl.distributed): None all-reduces the accumulators in every step(); N lets each
    # replica step on its own traffic and averages the replicas every N steps.
    sync_every: Optional[int] = None
    # The learn() recipe (fastcl.recipe). Defaults are the measured winner (bench/RESULTS.md).
    objective: str = "context_gain"  # how a request with a context-free student prompt is learned
    gain_threshold: float = 0.5  # nats: response tokens the context made this much likelier are learned
    # ...and only tokens that occur in the removed context (the served prompt's part the student
    # prompt lacks): what the answer copied from its document, not what the model added or
    # confused (another company's value, an invented country). None: on wherever it applies
    # (objective="context_gain"); True: on, and an error with another objective; False: off.
    grounded: Optional[bool] = None
    passes: int = 1  # optimizer steps per scheduled step on the same requests
    # Further steps on the context-gain requests just learned, their own loss only (no replay; no
    # anchor unless inner_anchor): each costs one forward+backward of the context-free prompts,
    # and the loop stops as soon as no response token is gain_threshold nats short of the teacher.
    # Requests without a student prompt, and the other objectives, get none (they have no such
    # stopping rule).
    # layer_options can set a layer's own count: the k-th inner step moves only the layers whose
    # count is at least k (the forward and backward are shared, so it costs the same).
    inner_steps: int = 0
    # Each inner step also takes the anchor's term (a window of general text, as a scheduled step
    # does), so that storing a fact harder is held to the reference as the first step is.
    inner_anchor: bool = False
    # Inner steps only while the gate's last check left headroom: they are skipped while it is on
    # alert (its last check refused, or some probe used more than half its tolerance; it then
    # checks every merge), so the extra movement stops once drift builds. No gate probes: no effect.
    inner_headroom: bool = False
    # Inner steps only while the anchor's KL to its reference, averaged over its last full cycle of
    # windows (read at every scheduled step, before it moves anything), is at most this many nats a
    # token: a drift reading at every merge where the gate reads every gate_every-th. Needs the
    # anchor. None: no such limit.
    inner_kl_limit: Optional[float] = None
    replay: int = 64  # capacity of the replay buffer, in requests (0: no replay)
    replay_per_step: int = 3  # replayed requests added to every step, drawn from the buffer at random
    replay_recent: int = 0  # and this many of the newest requests in the buffer, every step
    # Spaced replay: a request learned in step s is replayed in steps s + k for each k here (while
    # the buffer still holds it), besides the random draws: every fact gets these replays soon
    # after it is served, where random draws from the buffer give the newest facts almost none.
    replay_schedule: Sequence[int] = ()
    # > 0: at each learned token (and each replayed request's first-taught tokens), the tokens other
    # requests were taught must stay this many nats below the request's own answer (a hinge;
    # fastcl.loss.contrast_margin_loss): against learned values answering for every entity.
    contrast_margin: float = 0.0
    # ...counting only tokens taught with at least this much context gain (nats), as rivals and as
    # answers: a value's first pieces gain 4-12 nats, the words around it 0.5-2.5. 0: every taught token.
    contrast_min_gain: float = 0.0
    # > 0: each learned response is also scored after its student prompt with the entity swapped
    # for another request's (fastcl.recipe.swapped_prompt), and its learned tokens' log-probability
    # there is pushed down with this weight: the part of a step that raises a value after any
    # question of its kind cancels, the part bound to the request's own entity stays. One more
    # forward and backward per learning pass.
    swap_negatives: float = 0.0
    # ...only at learned tokens with at least this much context gain (nats): the values (4-12
    # nats), not the words around them (0.5-2.5), which every question of a kind shares. Either way
    # the gate refused most merges on development streams (bench/RESULTS.md): off by default.
    swap_min_gain: float = 3.0
    # Which positions of a context-gain learning forward the fast weights learn from (the loss and
    # the backward are unchanged; only grad_B's rows are chosen): "all"; "entity", the student
    # prompt's entity (fastcl.recipe.entity_span: the run of tokens the question shares with its
    # removed context), so the update is keyed to what the question is about rather than to the
    # answer's position; "entity_last", its last token. A request with no entity learns at all.
    learn_at: str = "all"
    # learn_at="entity"/"entity_last": the positions that predict the response also learn, at this
    # weight against the entity's 1 (their rows of the sketch scaled by it), so the tokens that spell
    # a value out are learned beside the entity's key. 0: the entity alone. A fitted A still fits
    # the entity's rows only.
    entity_answer_weight: float = 0.0
    # Per-layer learn_at, projection and lr: {pattern: {option: value}}, patterns as in targets
    # (the first that matches a layer wins; patch() refuses one that matches no patched layer).
    # E.g. {"gate_proj|up_proj|down_proj": {"learn_at": "entity", "projection": "whitened"}}: the
    # MLP learns keyed to the entity in a fitted A while attention learns at every position.
    # "auto" (the default): MLP_ENTITY_KEYED where it applies, None elsewhere: with another
    # objective or a learner-wide learn_at/projection, and (patch() says why) without a tokenizer
    # (the fit reads general text), with asynchronous replicas (each would fit its own A between
    # averages), or where no patched layer is under an `mlp` module. Synchronous replicas keep it:
    # a fitted A then holds one block of rank rows a replica (fastcl.distributed).
    # None: every layer at the learner-wide options.
    layer_options: Union[None, str, dict] = "auto"
    # Self-generated data: after each request with a student prompt, the model (document in
    # context, fast weights live) samples this many more answers to it at self_study_temperature,
    # up to self_study_tokens each, and the student learns them by context gain beside the served
    # answer. Costs generation plus one learning pass a sample, recorded as "self_study".
    self_study: int = 0
    self_study_temperature: float = 0.7
    self_study_tokens: int = 40
    step_every: int = 1  # learn() calls per optimizer step (0: the caller steps)
    consolidate_every: int = 1  # steps per consolidation (0: the caller consolidates)
    anchor_weight: float = 1.0  # weight of the KL-to-reference term on general text (needs a tokenizer)
    # Tokens of general text the anchor term takes a step: one window a step, cycling through the
    # shipped anchor text, so this is the anchor's cost a step (a forward and backward of it).
    anchor_window: int = 64
    # The anchor also holds the model's own replies to the user turns in this file (a shipped one,
    # "anchor_questions.txt" (short-answer general questions) or "anchor_prompts.txt" (open
    # requests), or a text file's path, one turn a line), answered greedily by the reference, up to
    # anchor_reply_tokens, when the anchor is prepared; a step takes one reply window beside its
    # prose window. Facts are learned as replies, where prose holds nothing. "" (the default): off.
    anchor_prompts: str = ""
    anchor_reply_tokens: int = 48
    # A avoids this many leading directions of each layer's input on general text (fastcl.protection;
    # needs a tokenizer): updates then move general text far less. 0 draws A unconstrained.
    protect_directions: int = 8
    # How each projection epoch's A is drawn (fastcl.projection): "random", from the seed alone; or
    # "whitened" (needs a tokenizer; learn() with context gain only): fitted, at the epoch's first
    # learn(), to the directions in which that request's inputs stand out most from general text.
    projection: str = "random"
    projection_ridge: float = 0.1  # "whitened": general text's input moment + this x its mean eigenvalue
    # "whitened": > 0 also whitens against the requests fitted before, at this weight against general
    # text's moment (fastcl.projection.fit_to_inputs): A keeps what this request alone has.
    projection_served: float = 0.0
    gate_tolerance: Optional[float] = 0.03  # nats per token the built-in gate probe may lose (~3% perplexity)
    # The text the built-in gate probe scores: a text shipped in fastcl/data by its file name, or
    # the path of a UTF-8 text file of your own (general text of the kind the model must keep).
    # Never trained on. A state file saved under another gate text is refused by load().
    gate_text: str = GATE_TEXT
    # A second built-in gate probe (None: off): general questions asked in an answer frame, each
    # with its options ("question<TAB>answer<TAB>wrong option<TAB>..." a line, in gate_answers: a
    # shipped file or a path); the right options' mean softmax share over their options (0..1)
    # may fall at most this much. General text's likelihood misses learned facts shifting which
    # answer of a kind the model prefers; this probe scores answers. Never trained on, and none
    # of its questions is a benchmark probe (a test checks).
    gate_answer_tolerance: Optional[float] = None
    gate_answers: str = GATE_ANSWERS
    # A refused update first gets up to this many repair steps, each checked again: one optimizer
    # step (from a fresh optimizer) on the anchor's loss alone over all of its text, taking drift
    # out of the live fast weights while what the requests taught stays in them. Then gate_backoff.
    # Needs a tokenizer (the anchor's text); runs only where the gate refuses.
    gate_repair: int = 0
    gate_backoff: int = 2  # a refused update is halved up to this many times, each checked again, before it is dropped
    # The gate scores every gate_every-th merge only (its probe text costs about 4 forwards of a
    # served request), and every merge while its last check used more than half a tolerance. A
    # refusal undoes every merge since the gate last passed; until then the weights from before
    # those merges are kept (one more copy of the merged layers). 4: learned bit-identically to 1 on
    # six development streams and seeds 1-3, at 29% less learning cost (bench/RESULTS.md).
    gate_every: int = 4

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.betas = tuple(self.betas)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        self._resolve_auto_layer_options()
        self._check_layer_options()
        self.auto_lr = self.lr is None
        if self.auto_lr:
            self.lr = PRESET_LR if self.layer_options == _PRESET else PLAIN_LR
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.sync_every is not None and (not isinstance(self.sync_every, int) or isinstance(self.sync_every, bool)
                                            or self.sync_every < 1):
            raise ValueError(f"sync_every must be None (synchronous) or a positive integer, got {self.sync_every!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("passes", "inner_steps", "replay", "replay_per_step", "replay_recent",
                     "self_study", "self_study_tokens", "step_every", "consolidate_every",
                     "protect_directions", "gate_repair", "gate_backoff", "gate_every", "anchor_window",
                     "anchor_reply_tokens"):
            value = getattr(self, name)
            least = 1 if name in ("passes", "gate_every", "self_study_tokens", "anchor_window",
                                 "anchor_reply_tokens") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.replay_schedule = tuple(self.replay_schedule)
        if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.replay_schedule) \
                or list(self.replay_schedule) != sorted(set(self.replay_schedule)):
            raise ValueError(f"replay_schedule must be increasing positive integers (steps after a request's own), "
                             f"got {self.replay_schedule!r}")
        if self.replay_schedule and self.replay_schedule[-1] > self.replay:
            raise ValueError(f"replay_schedule reaches {self.replay_schedule[-1]} steps back, beyond a replay buffer "
                             f"of {self.replay} requests: raise replay= or shorten the schedule")
        for name in ("replay_per_step", "replay_recent"):
            if getattr(self, name) and not self.replay:
                raise ValueError(f"{name}={getattr(self, name)} needs a replay buffer: set replay= to its capacity, "
                                 f"or {name}=0 for no replay")
        if not self.contrast_margin >= 0:
            raise ValueError(f"contrast_margin is in nats and must be >= 0, got {self.contrast_margin!r}")
        if not self.contrast_min_gain >= 0:
            raise ValueError(f"contrast_min_gain is in nats and must be >= 0, got {self.contrast_min_gain!r}")
        if not self.swap_negatives >= 0:
            raise ValueError(f"swap_negatives is a weight and must be >= 0, got {self.swap_negatives!r}")
        if self.swap_negatives and self.objective != "context_gain":
            raise ValueError(f"swap_negatives applies to objective='context_gain', got {self.objective!r}")
        if self.learn_at not in LEARN_AT:
            raise ValueError(f"learn_at must be one of {LEARN_AT}, got {self.learn_at!r}")
        if not 0.0 <= self.entity_answer_weight < 1.0:
            raise ValueError(f"entity_answer_weight weighs the answer's positions against the entity's 1: it must "
                             f"be in [0, 1), got {self.entity_answer_weight!r}")
        if self.learn_at_values != {"all"} and self.objective != "context_gain":
            raise ValueError(f"learn_at={sorted(self.learn_at_values - {'all'})[0]!r} applies to "
                             f"objective='context_gain', got {self.objective!r}")
        if self.contrast_margin and self.objective != "context_gain":
            raise ValueError(f"contrast_margin applies to objective='context_gain', got {self.objective!r}")
        if self.grounded is not None and not isinstance(self.grounded, bool):
            raise ValueError(f"grounded must be None (on with objective='context_gain'), True or False, "
                             f"got {self.grounded!r}")
        if self.grounded is True and self.objective != "context_gain":
            raise ValueError(f"grounded filters the tokens context gain learns: it needs objective='context_gain', "
                             f"got {self.objective!r}")
        if self.self_study and self.objective != "context_gain":
            raise ValueError(f"self_study learns its samples by context gain: it needs objective='context_gain', "
                             f"got {self.objective!r}")
        if not self.self_study_temperature > 0:
            raise ValueError(f"self_study_temperature must be positive, got {self.self_study_temperature!r}")
        if not isinstance(self.inner_anchor, bool):
            raise ValueError(f"inner_anchor must be True or False, got {self.inner_anchor!r}")
        if not isinstance(self.inner_headroom, bool):
            raise ValueError(f"inner_headroom must be True or False, got {self.inner_headroom!r}")
        if self.inner_kl_limit is not None and not (isinstance(self.inner_kl_limit, (int, float))
                                                    and not isinstance(self.inner_kl_limit, bool)
                                                    and self.inner_kl_limit >= 0):
            raise ValueError(f"inner_kl_limit must be a number of nats >= 0 or None, got {self.inner_kl_limit!r}")
        if self.inner_kl_limit is not None and not self.anchor_weight > 0:
            raise ValueError("inner_kl_limit reads the anchor's KL, which needs anchor_weight > 0")
        if self.inner_kl_limit is not None and self.sync_every is not None:
            raise ValueError("inner_kl_limit with sync_every (asynchronous replicas): each replica would read its "
                             "own fast weights' drift and take its own number of steps")
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight!r}")
        if not isinstance(self.anchor_prompts, str):
            raise ValueError(f"anchor_prompts must name a shipped prompts file or a text file's path (\"\": off), "
                             f"got {self.anchor_prompts!r}")
        if not isinstance(self.gate_text, str) or not self.gate_text.strip():
            raise ValueError(f"gate_text must name a shipped text or a text file's path, got {self.gate_text!r}")
        if self.gate_tolerance is not None and self.gate_tolerance < 0:
            raise ValueError(f"gate_tolerance must be >= 0 or None, got {self.gate_tolerance!r}")
        if not isinstance(self.gate_answers, str) or not self.gate_answers.strip():
            raise ValueError(f"gate_answers must name a shipped answers file or a file's path, "
                             f"got {self.gate_answers!r}")
        if self.gate_answer_tolerance is not None and not self.gate_answer_tolerance >= 0:
            raise ValueError(f"gate_answer_tolerance must be >= 0 or None, got {self.gate_answer_tolerance!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if not self.projection_served >= 0:
            raise ValueError(f"projection_served must be >= 0, got {self.projection_served!r}")
        if self.projection_served and not self.whitens:
            raise ValueError(f"projection_served weighs earlier requests in the whitened fit: it needs "
                             f"projection='whitened', got {self.projection!r}")
        if not self.projection_ridge > 0:
            raise ValueError(f"projection_ridge must be positive, got {self.projection_ridge!r}")
        if self.backward_dtype not in BACKWARD_DTYPES:
            raise ValueError(f"backward_dtype must be one of {BACKWARD_DTYPES}, got {self.backward_dtype!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")

    def _resolve_auto_layer_options(self) -> None:
        """layer_options="auto": the preset, unless the objective is another or a learner-wide
        learn_at or projection was asked for. auto_layer_options: drop_auto_layer_options() may
        still take it away (not a field: the config saved is the resolved one)."""
        self.auto_layer_options = isinstance(self.layer_options, str) and self.layer_options == "auto"
        if self.auto_layer_options:
            applies = self.objective == "context_gain" and self.learn_at == "all" and self.projection == "random"
            self.layer_options = dict(_PRESET) if applies else None
            self.auto_layer_options = applies

    def drop_auto_layer_options(self) -> bool:
        """Take the default preset away (where patch() finds it does not apply), with the step
        measured without it unless lr was given. False when layer_options was given."""
        if not self.auto_layer_options:
            return False
        self.layer_options, self.auto_layer_options = None, False
        if self.auto_lr:
            self.lr = PLAIN_LR
        return True

    def _check_layer_options(self) -> None:
        if self.layer_options is None:
            return
        if not isinstance(self.layer_options, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Mapping) for k, v in self.layer_options.items()):
            raise ValueError(f"layer_options must map layer-name patterns to dicts of options (or be \"auto\" "
                             f"or None), got {self.layer_options!r}")
        self.layer_options = {pattern: dict(options) for pattern, options in self.layer_options.items()}
        for pattern, options in self.layer_options.items():
            unknown = sorted(set(options) - set(LAYER_OPTIONS))
            if unknown:
                raise ValueError(f"layer_options[{pattern!r}] sets {unknown}; per layer only {LAYER_OPTIONS} can be set")
            if options.get("learn_at", "all") not in LEARN_AT:
                raise ValueError(f"layer_options[{pattern!r}]: learn_at must be one of {LEARN_AT}, "
                                 f"got {options['learn_at']!r}")
            if options.get("projection", "random") not in PROJECTIONS:
                raise ValueError(f"layer_options[{pattern!r}]: projection must be one of {PROJECTIONS}, "
                                 f"got {options['projection']!r}")
            lr = options.get("lr", 1.0)  # the learner-wide lr is checked on its own
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"layer_options[{pattern!r}]: lr must be positive, got {lr!r}")
            inner = options.get("inner_steps", 0)
            if not isinstance(inner, int) or isinstance(inner, bool) or inner < 0:
                raise ValueError(f"layer_options[{pattern!r}]: inner_steps must be an integer >= 0, got {inner!r}")

    def layer(self, name: str) -> dict:
        """learn_at, projection, lr and inner_steps of the patched layer `name`: layer_options'
        first matching pattern over the learner-wide values."""
        options = {"learn_at": self.learn_at, "projection": self.projection, "lr": self.lr,
                   "inner_steps": self.inner_steps}
        pattern = name_matches(self.layer_options, name) if self.layer_options else None
        if pattern is not None:
            options.update(self.layer_options[pattern])
        return options

    def _values(self, option: str) -> set:
        """Every value of `option` some layer may use."""
        default = getattr(self, option)
        return {default, *(o.get(option, default) for o in (self.layer_options or {}).values())}

    @property
    def learn_at_values(self) -> set[str]:
        return self._values("learn_at")

    @property
    def anchored(self) -> bool:
        """Whether the learner builds the anchor: its term, or gate_repair, which steps on its text."""
        return self.anchor_weight > 0 or self.gate_repair > 0

    @property
    def whitens(self) -> bool:
        """Whether some layer's A is fitted to inputs (projection="whitened")."""
        return "whitened" in self._values("projection")

    @property
    def learns_grounded(self) -> bool:
        """Whether context gain learns only response tokens found in the removed context."""
        return self.grounded is True or (self.grounded is None and self.objective == "context_gain")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        d["exclude"] = list(self.exclude) if self.exclude is not None else None
        d["layer_options"] = ({k: dict(v) for k, v in self.layer_options.items()}
                              if self.layer_options is not None else None)
        d["betas"] = list(self.betas)
        d["replay_schedule"] = list(self.replay_schedule)
        return d
