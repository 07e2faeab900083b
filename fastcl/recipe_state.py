"""The part of a learner's saved state that belongs to its recipe (fastcl.recipe.Recipe): the
replay buffer and the requests waiting for a step, the schedule's clocks and random state, the
gate's baselines and the anchor's reference distribution.

Without them a learner restarted from a file would start its replay buffer empty, and its gate
and anchor would take the already-drifted loaded weights as their reference, so drift could
grow by a full tolerance at every restart. Tokens and per-token values are safetensors tensors
(`replay.<j>.<field>`, `pending.<j>.<field>`, `anchor.<w>.indices|probs`); the rest is one JSON
metadata entry, `recipe`. stage() checks everything and apply() only writes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError, StateFileError
from .inputs import check_vocabulary
from .recipe import Interaction

TOKEN_FIELDS = ("teacher", "student", "response")  # lists of token ids
PER_TOKEN_FIELDS = ("teacher_logprobs", "taught", "taught_gain")  # one value per response token
SCALAR_FIELDS = ("weight", "step_index", "replays")
# Caches recomputed from the tokens on first use, so never stored.
DERIVED_FIELDS = ("found_in_context", "entity")
QUEUES = ("replay", "pending")


def export(recipe) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able metadata, tensors) for the recipe's state."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {
        "calls_since_step": recipe.calls_since_step,
        "steps_since_consolidation": recipe.steps_since_consolidation,
        "scheduled_steps": recipe.scheduled_steps,
        "requests_seen": recipe.requests_seen,
        "rng": _rng_to_json(recipe._rng.getstate()),
        "gate_baseline": recipe.gate.baseline,
        "anchor_next": recipe.anchor._next if recipe.anchor is not None else None,
        "anchor_windows": None,
    }
    for queue in QUEUES:
        meta[queue] = []
        for j, item in enumerate(getattr(recipe, queue)):
            meta[queue].append({name: getattr(item, name) for name in SCALAR_FIELDS})
            for name in (*TOKEN_FIELDS, *PER_TOKEN_FIELDS):
                value = getattr(item, name)
                if value is not None:
                    tensors[f"{queue}.{j}.{name}"] = (torch.tensor(value, dtype=torch.int64)
                                                      if name in TOKEN_FIELDS else value.detach())
    if recipe.anchor is not None and recipe.anchor.targets is not None:
        meta["anchor_windows"] = len(recipe.anchor.targets)
        for w, (indices, probs) in enumerate(recipe.anchor.targets):
            tensors[f"anchor.{w}.indices"], tensors[f"anchor.{w}.probs"] = indices, probs
            if recipe.anchor.prompt_of[w] is not None:  # the reference's reply: regenerating it would use drifted weights
                tensors[f"anchor.{w}.tokens"] = torch.tensor(recipe.anchor.windows[w], dtype=torch.int64)
    return {"recipe": json.dumps(meta)}, tensors


@dataclass
class Staged:
    meta: dict
    queues: dict[str, list[Interaction]]
    anchor_targets: Optional[list[tuple[torch.Tensor, torch.Tensor]]]
    anchor_windows: Optional[list[list[int]]] = None


def stage(recipe, metadata: dict, tensors: dict[str, torch.Tensor], path) -> Optional[Staged]:
    """Read and check the recipe's state from a loaded file; None for a file that has none (format
    version 1). Raises StateFileError naming the first problem."""
    if "recipe" not in metadata:
        return None
    try:
        meta = json.loads(metadata["recipe"])
        random.Random().setstate(_rng_from_json(meta["rng"]))  # a throwaway: checks the state
        queues = {queue: [_item(recipe, queue, j, entry, tensors, path) for j, entry in enumerate(meta[queue])]
                  for queue in QUEUES}
        for key in ("calls_since_step", "steps_since_consolidation", "scheduled_steps", "requests_seen"):
            if not isinstance(meta[key], int) or meta[key] < 0:
                raise StateFileError(f"{path}: recipe {key} must be an integer >= 0, got {meta[key]!r}")
        if meta["anchor_next"] is not None and (not isinstance(meta["anchor_next"], int) or meta["anchor_next"] < 0):
            raise StateFileError(f"{path}: recipe anchor_next must be an integer >= 0, got {meta['anchor_next']!r}")
        baseline = meta["gate_baseline"]
        if baseline is not None and not all(isinstance(v, (int, float)) for v in baseline.values()):
            raise StateFileError(f"{path}: the gate's baseline holds a non-number")
        return Staged(meta, queues, *_anchor_targets(recipe, meta, tensors, path))
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{path}: damaged recipe state ({exc!r})") from exc


def apply(recipe, staged: Optional[Staged], traffic: bool = True) -> None:
    """Write a staged state into the recipe (never raises on a staged state). traffic=False
    leaves the replay buffer and the pending requests empty: a replica restarted from the group's
    shared file would otherwise replay the saving replica's requests a second time."""
    recipe._cycle_kl.clear()  # drift read on the weights before the load (inner_kl_limit), not on these
    if staged is None:
        return
    meta, device = staged.meta, recipe.learner.device
    recipe.calls_since_step = meta["calls_since_step"]
    recipe.steps_since_consolidation = meta["steps_since_consolidation"]
    recipe.scheduled_steps = meta["scheduled_steps"]
    recipe.requests_seen = meta["requests_seen"]
    recipe._rng.setstate(_rng_from_json(meta["rng"]))
    # Probes not in the file (added since) are measured at their first check, on the loaded weights.
    recipe.gate.baseline = dict(meta["gate_baseline"]) if meta["gate_baseline"] is not None else None
    recipe.replay.clear()
    if traffic:
        recipe.replay.extend(staged.queues["replay"])  # a smaller buffer here keeps the newest
    recipe.pending = staged.queues["pending"] if traffic else []
    if recipe.anchor is not None:
        recipe.anchor.targets = ([(i.to(device), p.to(device)) for i, p in staged.anchor_targets]
                                 if staged.anchor_targets is not None else None)
        if staged.anchor_windows is not None:
            recipe.anchor.windows = staged.anchor_windows
        recipe.anchor._next = meta["anchor_next"] % len(recipe.anchor) if meta["anchor_next"] else 0


def _item(recipe, queue: str, j: int, entry: dict, tensors: dict, path) -> Interaction:
    prefix = f"{queue}.{j}"
    values = {}
    for name in TOKEN_FIELDS:
        tensor = tensors.get(f"{prefix}.{name}")
        if tensor is None:
            if name != "student":
                raise StateFileError(f"{path}: missing tensor {prefix}.{name!r}")
            values[name] = None
            continue
        values[name] = _token_row(tensor, f"{prefix}.{name}", recipe, path)
    for name in PER_TOKEN_FIELDS:
        tensor = tensors.get(f"{prefix}.{name}")
        if tensor is not None:
            if tuple(tensor.shape) != (len(values["response"]),):
                raise StateFileError(f"{path}: {prefix}.{name} has shape {tuple(tensor.shape)}, expected "
                                     f"({len(values['response'])},), one value per response token")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise StateFileError(f"{path}: {prefix}.{name} holds NaN/inf")
        values[name] = tensor
    weight, replays = float(entry["weight"]), entry["replays"]
    if not weight >= 0 or not isinstance(replays, int) or replays < 0:
        raise StateFileError(f"{path}: {prefix} has weight {entry['weight']!r} and replays {replays!r}")
    step_index = entry["step_index"]
    if step_index is not None and not isinstance(step_index, int):
        raise StateFileError(f"{path}: {prefix} has step_index {step_index!r}")
    return Interaction(**values, weight=weight, step_index=step_index, replays=replays)


def _anchor_targets(recipe, meta: dict, tensors: dict, path):
    """(targets, windows) of the anchor's saved reference; (None, None) where there is none."""
    count = meta["anchor_windows"]
    if count is None or recipe.anchor is None:  # nothing saved, or no anchor here to use it
        return None, None
    anchor = recipe.anchor
    if count != len(anchor.windows):
        raise StateFileError(f"{path}: the anchor's reference covers {count} windows, this learner's anchor has "
                             f"{len(anchor.windows)} (another tokenizer, anchor_window, anchor_prompts or fastcl "
                             f"version?)")
    targets, windows = [], []
    for w in range(count):
        window, j = anchor.windows[w], anchor.prompt_of[w]
        if j is not None:  # a reply window: its tokens come from the file
            window = _reply_window(anchor.chat_prompts[j], tensors.get(f"anchor.{w}.tokens"), recipe, w, j, path)
        indices, probs = tensors.get(f"anchor.{w}.indices"), tensors.get(f"anchor.{w}.probs")
        shape = (len(window) - 1 - anchor.starts[w], anchor.top_k)
        for name, tensor in (("indices", indices), ("probs", probs)):
            if tensor is None or tuple(tensor.shape) != shape:
                raise StateFileError(f"{path}: anchor.{w}.{name} is missing or not of shape {shape}")
        if not torch.isfinite(probs).all():
            raise StateFileError(f"{path}: anchor.{w}.probs holds NaN/inf")
        targets.append((indices, probs))
        windows.append(window)
    return targets, windows


def _reply_window(prompt: list[int], tokens: Optional[torch.Tensor], recipe, w: int, j: int, path) -> list[int]:
    if tokens is None:
        raise StateFileError(f"{path}: missing tensor anchor.{w}.tokens")
    window = _token_row(tokens, f"anchor.{w}.tokens", recipe, path)
    if len(window) <= len(prompt) or window[:len(prompt)] != prompt:
        raise StateFileError(f"{path}: anchor.{w}.tokens does not answer this learner's anchor prompt {j} "
                             f"(another tokenizer or anchor prompts?)")
    return window


def _token_row(tensor: torch.Tensor, name: str, recipe, path) -> list[int]:
    """A saved row of token ids as a list, refused unless 1-D int64, non-empty and in the vocabulary."""
    if tensor.dim() != 1 or tensor.dtype != torch.int64 or not tensor.numel():
        raise StateFileError(f"{path}: {name} must be a non-empty row of token ids")
    try:
        check_vocabulary(f"{path}: {name}", tensor, recipe.learner._vocab_size)
    except InputError as exc:
        raise StateFileError(str(exc)) from exc
    return tensor.tolist()


def _rng_to_json(state):
    version, words, gauss = state
    return [version, list(words), gauss]


def _rng_from_json(state):
    version, words, gauss = state
    return version, tuple(words), gauss

