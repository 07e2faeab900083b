"""Saving and loading a learner's state with safetensors (never pickle).

The file holds, per patched layer i, `B.i` and `grad_B.i` (fp32), the optimizer's per-layer
tensors as `optim.i.<key>`, and, when the weights differ from the base model (after a
consolidation) or when asked, the merged weights as `weight.i`. The metadata holds the config,
counters, layer names and shapes, and an exact checksum of every patched weight at save time.
Since version 2 it also holds the recipe's state (fastcl.recipe_state: the replay buffer, the
schedule, the gate's baselines, the anchor's reference); a version 1 file loads without it.

load() reads and checks everything first and writes only when all of it fits: a file for
another model, shape, rank or base weights is refused with a message naming the mismatch.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import recipe_state
from .errors import StateFileError
from .guard import GATE_ANSWERS, GATE_TEXT

if TYPE_CHECKING:
    from .learner import Learner

FORMAT = "fastcl-state"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # 1: no recipe state
# Must match: B is meaningless under another rank or scale, and optimizer state under another rule.
_STRUCTURAL = ("rank", "alpha", "optimizer")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weight_checksum(tensor: torch.Tensor) -> int:
    """An exact, order-independent checksum of a tensor's bits (sum of its words as integers)."""
    words = tensor.detach().contiguous().view(_INT_VIEW[tensor.element_size()])
    return int(words.to(torch.int64).sum())


def _model_kind(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def save(learner: "Learner", path, include_weights: Optional[bool] = None) -> None:
    """Write the state; include_weights=None includes them iff a consolidation changed them."""
    modules = list(learner.modules.items())
    if include_weights is None:
        include_weights = learner.counters.epoch > 0
    tensors: dict[str, torch.Tensor] = {}
    optimizer_state = learner.optimizer.state_dict()["state"]
    slots = learner.optimizer_slots()
    for i, (_, module) in enumerate(modules):
        tensors[f"B.{i}"] = module.B.detach()
        tensors[f"grad_B.{i}"] = module.grad_B
        for key, value in optimizer_state.get(slots[i], {}).items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
        if include_weights:
            tensors[f"weight.{i}"] = module.weight.detach()
        if module.protected is not None:  # with the seed and epoch, it defines A
            # q, k and v hold one basis; safetensors refuses tensors that share memory.
            tensors[f"protected.{i}"] = module.protected.clone()
        if module.fitted:  # fitted to a request's inputs (projection="whitened"): no seed regenerates it
            tensors[f"A.{i}"] = module.A.detach()
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(learner.config.to_dict()),
        "counters": json.dumps(learner.counters.__dict__),
        "model": _model_kind(learner.model),
        "layers": json.dumps([[name, m.out_features, m.in_features, str(m.weight.dtype)] for name, m in modules]),
        "checksums": json.dumps([weight_checksum(m.weight) for _, m in modules]),
        "b_is_zero": json.dumps([m.b_is_zero for _, m in modules]),
    }
    recipe_metadata, recipe_tensors = recipe_state.export(learner.recipe)
    metadata.update(recipe_metadata)
    tensors.update(recipe_tensors)
    tmp = f"{os.fspath(path)}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under `path`


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(os.fspath(path))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StateFileError(f"{path}: not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise StateFileError(f"{path}: not a fastcl state file (format tag {metadata.get('format')!r})")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise StateFileError(f"{path}: state format version {metadata.get('version')!r}; this fastcl reads "
                             f"{', '.join(map(repr, READABLE_VERSIONS))}")
    return tensors, metadata


# Why B or A can have another rank than the config's: a group's fitted A (fastcl.distributed).
_RANK_HINT = ("; in a group of replicas a fitted A holds rank x replicas rows, so load a state into a learner "
              "patched as its saver was: the same rank and, for a fitted A, the same number of replicas")


def _expect(tensors: dict, key: str, shape: tuple, path, hint: str = "") -> torch.Tensor:
    if key not in tensors:
        raise StateFileError(f"{path}: missing tensor {key!r}")
    tensor = tensors[key]
    if tuple(tensor.shape) != tuple(shape):
        raise StateFileError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)}{hint}")
    if not torch.isfinite(tensor).all():
        raise StateFileError(f"{path}: {key} holds NaN/inf")
    return tensor


def load(learner: "Learner", path) -> None:
    tensors, metadata = _read(path)
    try:
        config = json.loads(metadata["config"])
        counters = json.loads(metadata["counters"])
        layers = json.loads(metadata["layers"])
        checksums = json.loads(metadata["checksums"])
        b_is_zero = json.loads(metadata["b_is_zero"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{path}: damaged metadata ({exc})") from exc
    modules = list(learner.modules.items())
    if metadata.get("model") != _model_kind(learner.model):
        raise StateFileError(f"{path}: model mismatch: saved from {metadata.get('model')!r}, "
                             f"this model is {_model_kind(learner.model)!r}")
    ours = [[name, m.out_features, m.in_features, str(m.weight.dtype)] for name, m in modules]
    if len(layers) != len(ours):
        raise StateFileError(f"{path}: the file has {len(layers)} patched layers, this model has {len(ours)}")
    for theirs, mine in zip(layers, ours):
        if theirs != mine:
            raise StateFileError(f"{path}: layer mismatch: file has {theirs}, this model has {mine}")
    for key in _STRUCTURAL:
        if config.get(key) != getattr(learner.config, key):
            raise StateFileError(f"{path}: {key} is {config.get(key)} in the file, {getattr(learner.config, key)} here")
    # A gate probe's saved baseline is a score on the file's text: on another text it means nothing.
    # (Files from before an option was added scored the shipped text.)
    for option, shipped, scored in (("gate_text", GATE_TEXT, True),
                                    ("gate_answers", GATE_ANSWERS, config.get("gate_answer_tolerance") is not None)):
        theirs, ours = config.get(option, shipped), getattr(learner.config, option)
        if scored and theirs != ours:
            raise StateFileError(f"{path}: a gate probe scores {option}={theirs!r} in the file, {ours!r} here; "
                                 f"patch with {option}={theirs!r} to load it")

    staged = []
    for i, (name, module) in enumerate(modules):
        shape_B = (module.out_features, module.rank)
        entry = {
            "B": _expect(tensors, f"B.{i}", shape_B, path, _RANK_HINT),
            "grad_B": _expect(tensors, f"grad_B.{i}", shape_B, path),
            "optim": {},
        }
        for key in [k for k in tensors if k.startswith(f"optim.{i}.")]:
            value = tensors[key]
            _expect(tensors, key, shape_B if value.dim() else (), path)
            entry["optim"][key.split(".", 2)[2]] = value
        if f"protected.{i}" in tensors:
            given = tensors[f"protected.{i}"]
            width = given.shape[-1] if given.dim() == 2 else -1
            entry["protected"] = _expect(tensors, f"protected.{i}", (module.in_features, width), path)
        if f"A.{i}" in tensors:
            entry["A"] = _expect(tensors, f"A.{i}", (module.rank, module.in_features), path)
        if f"weight.{i}" in tensors:
            entry["weight"] = _expect(tensors, f"weight.{i}", tuple(module.weight.shape), path)
            if weight_checksum(entry["weight"].to(module.weight.dtype)) != checksums[i]:
                raise StateFileError(f"{path}: weight.{i} ({name}) does not match its recorded checksum")
        elif weight_checksum(module.weight) != checksums[i]:
            raise StateFileError(
                f"{path}: the weights of {name} differ from those the state was saved with, and the file holds "
                "no weights; load it into the model it was saved from, or save with include_weights=True"
            )
        staged.append(entry)

    staged_recipe = recipe_state.stage(learner.recipe, metadata, tensors, path)
    # In a group the buffer is per replica, as the accumulators are; the rest is the group's.
    # (Asked before writing: `group` raises if a process group was given and is gone.)
    own_traffic = learner.replicas.group is None

    from .learner import Counters

    try:
        restored_counters = Counters(**counters)
    except TypeError as exc:
        raise StateFileError(f"{path}: damaged counters ({exc})") from exc

    # Everything is read and checked; now write.
    if not own_traffic:
        restored_counters.tokens_pending = 0
    learner.counters = restored_counters
    learner.config.seed = config["seed"]
    learner.config.protect_directions = int(config.get("protect_directions", 0))
    for (_, module), entry in zip(modules, staged):
        module.seed = config["seed"]
        # The file's projection, protected or not, is the one its fast weights were learned in.
        module.protected = entry["protected"].float().to(module.weight.device) if "protected" in entry else None
    learner._snapshot = None
    learner._gate_window.close()  # the loaded weights are taken as checked
    learner._gate_alert = False  # checked: the next check comes after gate_every merges
    learner._merge_checker.forget()
    learner._set_epoch(learner.counters.epoch)
    learner._restore_fitted({name: entry["A"] for (name, _), entry in zip(modules, staged) if "A" in entry})
    optimizer_state = {"state": {}, "param_groups": learner.optimizer.state_dict()["param_groups"]}
    slots = learner.optimizer_slots()
    with torch.no_grad():
        for i, ((name, module), entry) in enumerate(zip(modules, staged)):
            if "weight" in entry:
                module.weight.copy_(entry["weight"])
            module.B.copy_(entry["B"])
            if own_traffic:
                module.grad_B.copy_(entry["grad_B"])
            else:  # the saver's pending gradient is its own traffic; the group may have stepped on it since
                module.grad_B.zero_()
            module.b_is_zero = bool(b_is_zero[i])
            if entry["optim"]:
                optimizer_state["state"][slots[i]] = entry["optim"]
    learner.optimizer.load_state_dict(optimizer_state)
    recipe_state.apply(learner.recipe, staged_recipe, traffic=own_traffic)
