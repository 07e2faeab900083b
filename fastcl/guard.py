"""The forgetting guard: an anchor term that holds general behaviour to the model as it was when
learning started, and a consolidation gate that refuses merges which make a probe worse."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

Probe = Callable[[torch.nn.Module], float]  # higher is better

ANCHOR_TEXT = "anchor_text.txt"  # trains the anchor term
GATE_TEXT = "gate_text.txt"  # scores the built-in probe; never trained on
GATE_ANSWERS = "gate_answers.txt"  # short general questions with options for the answer probe; never trained on
ANCHOR_PROMPTS = "anchor_prompts.txt"  # open user turns (instructions, questions) for anchor_prompts
ANCHOR_QUESTIONS = "anchor_questions.txt"  # short-answer general questions (none of the probes) for anchor_prompts


def read_text(source: str) -> str:
    """A text shipped in fastcl/data, by its file name, or else the UTF-8 text file at the path
    `source`; an error naming the shipped texts when it is neither."""
    from .evaluate import load_text

    shipped = resources.files("fastcl.data")
    if "/" not in source and "\\" not in source and shipped.joinpath(source).is_file():
        return load_text(source)
    path = Path(source).expanduser()
    if not path.is_file():
        names = sorted(f.name for f in shipped.iterdir() if f.name.endswith(".txt"))
        raise ValueError(f"{source!r} is neither a text shipped with fastcl ({', '.join(names)}) nor a file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{source!r} holds no text")
    return text


def text_ids(tokenizer, name: str) -> list[int]:
    return tokenizer(read_text(name), add_special_tokens=False)["input_ids"]


class Anchor:
    """KL(reference || current) on windows of general text, over the reference model's top-k
    next tokens plus one bucket for the rest of the vocabulary, cached once (the reference is the
    committed model when the anchor is first used, with fast weights bypassed).

    Only the top-k probabilities are stored (a full row is vocabulary-sized per token); the tail's
    mass is what they leave, 1 - sum. Without the tail's bucket the loss is not at its minimum at
    the reference: on SmolLM2 the top 32 leave 19% of the mass on average on the anchor text, and
    a cross-entropy on the top k alone pushes that mass into them, sharpening the model away from
    the reference (8 facts learned from the base model: more drift on both general texts, the
    more so the higher the weight; bench/RESULTS.md). With the bucket the gradient is zero there.

    With `chat_prompts` (chat-formatted user turns), the anchor also holds the model's replies:
    the reference answers each prompt greedily when the anchor is prepared, and the KL covers the
    reply's tokens. Served facts are learned as assistant replies, and that is where prose alone
    leaves the model free to drift. A step then takes one reply window beside its prose window, so
    the prose term is as strong as without replies.
    """

    def __init__(self, token_ids: list[int], window: int = 64, top_k: int = 32,
                 chat_prompts: Sequence[Sequence[int]] = (), reply_tokens: int = 48, pad_id: Optional[int] = None):
        if len(token_ids) < 2:
            raise ValueError("anchor text is too short")
        if chat_prompts and reply_tokens < 1:
            raise ValueError(f"reply_tokens must be >= 1, got {reply_tokens}")
        prose = [token_ids[i: i + window + 1] for i in range(0, len(token_ids) - 1, window)]
        prose = [w for w in prose if len(w) > 1]
        self.chat_prompts = [list(p) for p in chat_prompts]
        if any(not p for p in self.chat_prompts):
            raise ValueError("an anchor chat prompt is empty")
        self.reply_tokens, self.pad_id = reply_tokens, pad_id
        # Per window, prose then replies: its tokens (a reply window's are known once the reference
        # has answered), where its targets start (a reply's first token is predicted at the
        # prompt's last), and the chat prompt it answers (None for prose).
        replies = len(self.chat_prompts)
        self.windows: list[Optional[list[int]]] = prose + [None] * replies
        self.starts: list[int] = [0] * len(prose) + [len(p) - 1 for p in self.chat_prompts]
        self.prompt_of: list[Optional[int]] = [None] * len(prose) + list(range(replies))
        # The windows each step takes: a prose window, and a reply window beside it; the shorter
        # list cycles until the longer one is through.
        self.steps: list[list[int]] = [[g % len(prose)] + ([len(prose) + g % replies] if replies else [])
                                       for g in range(max(len(prose), replies))]
        self.top_k = top_k
        self.targets: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self._next = 0

    def __len__(self) -> int:
        """Steps for a full cycle: every window taken at least once."""
        return len(self.steps)

    @classmethod
    def from_tokenizer(cls, tokenizer, prompts: str = "", **kwargs) -> "Anchor":
        """The anchor on the shipped anchor text, and with `prompts` (a shipped prompts file such as
        ANCHOR_QUESTIONS, or a text file's path: one user turn a line) on the replies to them."""
        if not prompts:
            return cls(text_ids(tokenizer, ANCHOR_TEXT), **kwargs)
        from .evaluate import chat_ids

        turns = [chat_ids(tokenizer, line.strip()) for line in read_text(prompts).splitlines() if line.strip()]
        return cls(text_ids(tokenizer, ANCHOR_TEXT), chat_prompts=turns, pad_id=tokenizer.pad_token_id, **kwargs)

    @torch.no_grad()
    def prepare(self, learner) -> None:
        if self.targets is not None:
            return
        with learner.fast_weights_bypassed():
            windows = self._answered(learner)
            targets = []
            for window, start in zip(windows, self.starts):
                logits = learner.model(input_ids=torch.tensor([window[:-1]], device=learner.device)).logits[0, start:]
                top = logits.float().log_softmax(-1).topk(self.top_k, dim=-1)
                targets.append((top.indices, top.values.exp()))
        self.windows, self.targets = windows, targets

    def _answered(self, learner) -> list[list[int]]:
        """The windows, each chat prompt followed by the reference's greedy reply (the stop token
        included, so that ending the turn is held too)."""
        from .evaluate import greedy_continuations

        asked = [self.chat_prompts[j] for j in self.prompt_of if j is not None]
        replies = iter(greedy_continuations(learner.model, asked, self.reply_tokens, self.pad_id, keep_stop=True)
                       if asked else [])
        return [window if j is None else self.chat_prompts[j] + next(replies)
                for window, j in zip(self.windows, self.prompt_of)]

    def accumulate(self, learner, scale: float) -> tuple[float, int]:
        """Add the gradient of scale * mean-token anchor loss over the next step's windows (each
        window's mean at full scale) into the accumulators; return (mean KL over their tokens,
        tokens). The loss is the cross-entropy against the cached top-k and the tail's bucket,
        which has the KL's gradient."""
        self.prepare(learner)
        taken = self.steps[self._next]
        self._next = (self._next + 1) % len(self.steps)
        kl_sum, tokens = 0.0, 0
        for index in taken:
            window, start = self.windows[index], self.starts[index]
            ids, probs = self.targets[index]
            with torch.enable_grad():
                logits = learner.model(input_ids=torch.tensor([window[:-1]], device=learner.device)).logits[0, start:]
                cross_entropy = bucketed_cross_entropy(logits.float(), ids, probs)
                (cross_entropy.mean() * scale).backward()
            with torch.no_grad():
                entropy = -xlogx(probs).sum(-1) - xlogx(tail_mass(probs))
                kl_sum += float((cross_entropy.detach() - entropy).sum())
            tokens += len(window) - 1 - start
        return kl_sum / tokens, tokens


def tail_mass(probs: torch.Tensor) -> torch.Tensor:
    """What a row of top-k probabilities leaves to the rest of the vocabulary."""
    return (1.0 - probs.sum(-1)).clamp_min(0.0)


def xlogx(p: torch.Tensor) -> torch.Tensor:
    return p * p.clamp_min(1e-30).log()


def bucketed_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per row, -sum_k p_k log q_k - p_tail log q_tail: the target's top-k probabilities `probs` at
    vocabulary `ids`, and the rest of its mass against the model's mass outside `ids` (computed
    from the logits left out, so it stays exact when the top k hold almost everything)."""
    normaliser = logits.logsumexp(-1, keepdim=True)
    logprobs = logits - normaliser
    outside = logits.scatter(-1, ids, float("-inf")).logsumexp(-1) - normaliser.squeeze(-1)
    # With k the whole vocabulary nothing is outside (-inf) and the tail is rounding: no term.
    return -(probs * logprobs.gather(-1, ids)).sum(-1) - tail_mass(probs) * outside.clamp_min(-1e4)


def text_likelihood_probe(tokenizer, name: str = GATE_TEXT, window: int = 256) -> Probe:
    """A probe scoring mean log-likelihood per token (nats, higher is better) on shipped text."""
    from .evaluate import mean_log_likelihood

    ids = text_ids(tokenizer, name)

    def probe(model) -> float:
        return mean_log_likelihood(model, ids, window)

    probe.__name__ = f"loglik[{name}]"
    return probe


def read_answers(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """(question, (answer, distractor, ...)) from a shipped file or a path: one question a line,
    then its answer and at least one wrong option, tab-separated."""
    rows = []
    for number, line in enumerate(read_text(name).splitlines(), 1):
        if not line.strip():
            continue
        question, *options = [field.strip() for field in line.split("\t")]
        if not question or len(options) < 2 or not all(options):
            raise ValueError(f"{name!r} line {number}: expected a question, its answer and at least one wrong "
                             f"option, tab-separated; got {line!r}")
        rows.append((question, tuple(options)))
    return rows


def answer_choice_probe(tokenizer, name: str = GATE_ANSWERS) -> Probe:
    """A probe scoring how sure the model is of the right answers to short general questions:
    each option is scored as the assistant's reply after ANSWER_FRAME (mean log-probability per
    token), and the score is the right option's softmax share over them, the mean over questions
    (0..1, higher is better). General text's likelihood barely moves when learned facts shift
    which answer of a kind the model prefers (a country's second city over its capital); this
    sees it, and a shift of every option alike (the frame's) cancels."""
    from .evaluate import ANSWER_FRAME, answer_probability, batched_option_logprobs, option_inputs

    items = [(question, options, 0) for question, options in read_answers(name)]
    prompts, options = option_inputs(tokenizer, items, ANSWER_FRAME)

    def probe(model) -> float:
        scores = batched_option_logprobs(model, prompts, options)
        return sum(answer_probability(row, 0) for row in scores) / len(scores)

    probe.__name__ = f"answers[{name}]"
    return probe


@dataclass
class GateProbe:
    name: str
    score: Probe
    tolerance: float  # the largest drop from the baseline that still commits


@dataclass
class GateResult:
    passed: bool
    scores: dict = field(default_factory=dict)  # name -> {"baseline", "score", "drop", "tolerance"}

    def near_limit(self, fraction: float = 0.5) -> bool:
        """Whether some probe's drop used more than `fraction` of its tolerance."""
        return any(s["drop"] > fraction * s["tolerance"] for s in self.scores.values())

    def __str__(self) -> str:
        parts = [f"{n}: {s['score']:.4f} (baseline {s['baseline']:.4f}, drop {s['drop']:+.4f}, tol {s['tolerance']:g})"
                 for n, s in self.scores.items()]
        return ("passed" if self.passed else "REFUSED") + "; " + "; ".join(parts)


class Gate:
    """Scores every probe with the live fast weights before a merge and refuses the merge if
    any score fell below its baseline by more than its tolerance. The baseline is measured once,
    the first time the gate runs, on the committed weights (fast weights bypassed), so drift
    cannot accumulate across merges beyond the tolerance."""

    def __init__(self):
        self.probes: list[GateProbe] = []
        self.baseline: Optional[dict[str, float]] = None

    def add(self, name: str, score: Probe, tolerance: float) -> None:
        if tolerance < 0:
            raise ValueError(f"gate tolerance must be >= 0, got {tolerance}")
        if any(p.name == name for p in self.probes):
            raise ValueError(f"a gate probe named {name!r} already exists")
        self.probes.append(GateProbe(name, score, tolerance))  # its baseline is taken at the next check

    def measure_baseline(self, learner) -> None:
        """Score the committed weights once per probe (the first check, or the first unchecked
        merge with gate_every > 1: a baseline taken later would already hold that merge's drift).
        A probe added later is measured then; the others keep theirs (a baseline loaded from a
        state file included), so drift never starts again from a drifted model."""
        missing = [p for p in self.probes if self.baseline is None or p.name not in self.baseline]
        if missing:
            with learner.fast_weights_bypassed(), torch.no_grad():
                self.baseline = {**(self.baseline or {}), **{p.name: float(p.score(learner.model)) for p in missing}}

    def check(self, learner) -> GateResult:
        self.measure_baseline(learner)
        result = GateResult(passed=True)
        for p in self.probes:
            with torch.no_grad():  # a user's probe need not say so: no graph is built for a score
                score = float(p.score(learner.model))
            drop = self.baseline[p.name] - score
            result.scores[p.name] = {"baseline": self.baseline[p.name], "score": score, "drop": drop,
                                     "tolerance": p.tolerance}
            result.passed &= drop <= p.tolerance
        return result
