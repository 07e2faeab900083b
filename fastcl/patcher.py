"""One generic walker that turns a model's linear layers into FastLinear, and back.

It patches the instance, never the class, so two models in one process never share state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch.nn as nn

from . import precision, recompute
from .config import LearnerConfig, name_matches
from .distributed import check_process_group, group_layout
from .errors import PatchError
from .layers import LINEAR_TYPES, FastLinear, linear_shape
from .protection import input_moments, leading_directions, whiteners


@dataclass
class PatchReport:
    """What patch() did: every linear-like layer appears once, patched or skipped with a reason."""

    patched: list[tuple[str, str, int, int]] = field(default_factory=list)  # (name, kind, d_in, d_out)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastcl patched {len(self.patched)} layers, skipped {len(self.skipped)}"]
        lines += [f"  patched {name} ({kind} {d_in}->{d_out})" for name, kind, d_in, d_out in self.patched]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _in_block_list(name: str, module_lists: set[str]) -> bool:
    """True if some ancestor of `name` is an nn.ModuleList: the decoder blocks."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in module_lists for i in range(1, len(parts)))


def _is_peft_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return hasattr(module, "lora_A")
    return isinstance(module, BaseTunerLayer) or hasattr(module, "lora_A")


def _refuse_if_wrapped(model: nn.Module) -> None:
    if hasattr(model, "fastcl"):
        raise PatchError(
            "model is already patched by fastcl; use model.fastcl, or call fastcl.unpatch(model) before patching again"
        )
    for name, module in model.named_modules():
        if isinstance(module, FastLinear):
            raise PatchError(f"model already contains a FastLinear at {name!r}; call fastcl.unpatch(model) first")
        if _is_peft_layer(module):
            raise PatchError(
                f"model is wrapped by PEFT (adapter layer at {name!r}); merge it with "
                "model.merge_and_unload() and patch the merged model"
            )


def plan(model: nn.Module, config: LearnerConfig) -> PatchReport:
    """Decide, without touching the model, which layers to patch and why the others are not."""
    report = PatchReport()
    modules = dict(model.named_modules())
    module_lists = {name for name, m in modules.items() if isinstance(m, nn.ModuleList)}
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    used_targets: set[str] = set()
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        if not isinstance(module, LINEAR_TYPES):
            report.skipped.append((name, f"{type(module).__name__} is not a linear layer"))
            continue
        if type(module) not in LINEAR_TYPES:
            report.skipped.append(
                (name, f"{type(module).__name__} subclasses {LINEAR_TYPES[0].__name__} with its own forward "
                       "(quantized or custom); not patched")
            )
            continue
        d_out, d_in = linear_shape(module)
        target = name_matches(config.targets, name) if config.targets is not None else None
        excluded = name_matches(config.exclude, name) if config.exclude is not None else None
        if config.targets is not None and target is None:
            reason = "not matched by targets"
        elif config.targets is None and module is output_embedding:
            reason = "output embedding (lm_head); name it in targets= to patch it"
        elif config.targets is None and not _in_block_list(name, module_lists):
            reason = "outside the decoder blocks; name it in targets= to patch it"
        elif excluded is not None:
            reason = f"excluded by pattern {excluded!r}"
        elif not weight.dtype.is_floating_point:
            reason = f"weight dtype {weight.dtype} is not floating point (quantized?)"
        elif config.rank > d_in:
            reason = f"rank {config.rank} exceeds d_in {d_in}"
        else:
            reason = None
        if target is not None:
            used_targets.add(target)
        if reason is None:
            kind = "Linear" if type(module) is nn.Linear else type(module).__name__
            report.patched.append((name, kind, d_in, d_out))
            if module is output_embedding:
                report.notes.append(f"{name} is the output embedding; if it is tied, consolidation also changes the input embedding")
        else:
            report.skipped.append((name, reason))
    unused = [t for t in (config.targets or []) if t not in used_targets]
    if unused:
        raise PatchError(f"targets matched no linear layer: {unused}")
    if not report.patched:
        raise PatchError("no layer to patch; the report says why each was skipped:\n" + str(report))
    patched = [name for name, *_ in report.patched]
    idle = [p for p in (config.layer_options or {}) if not any(name_matches([p], n) for n in patched)]
    if idle and config.drop_auto_layer_options():
        report.notes.append("no patched layer is under an `mlp` module: the default layer_options (the MLP keyed to "
                            "the entity) are off; every layer learns at every position")
    elif idle:
        raise PatchError(f"layer_options patterns matched no patched layer: {idle}")
    return report


def _check_texts(config: LearnerConfig, tokenizer) -> None:
    """The texts the options name, read now: a missing one fails before anything changes."""
    from .guard import read_answers, read_text

    for name, on, read in (("gate_text", config.gate_tolerance is not None, read_text),
                           ("gate_answers", config.gate_answer_tolerance is not None, read_answers),
                           ("anchor_prompts", config.anchored, read_text)):
        if on and getattr(config, name):
            try:
                read(getattr(config, name))
            except (ValueError, OSError) as exc:
                raise PatchError(f"{name}: {exc}") from exc
    chat = [name for name, on in (("gate_answers", config.gate_answer_tolerance is not None),
                                  ("anchor_prompts", config.anchored and bool(config.anchor_prompts))) if on]
    if chat and tokenizer is not None and not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise PatchError(f"{', '.join(chat)} ask questions in the chat format: the tokenizer needs "
                         f"apply_chat_template (a chat model's tokenizer)")


def _without_tokenizer(config: LearnerConfig, tokenizer, options: dict) -> Optional[str]:
    """The anchor term, the built-in gate probe and the protected directions read shipped text,
    so they need the tokenizer. Asked for explicitly without one, refuse; on by default, turn
    them off and say so."""
    if tokenizer is not None:
        return None
    wanted = [name for name, on in (("anchor_weight", config.anchor_weight > 0),
                                    ("gate_tolerance", config.gate_tolerance is not None),
                                    ("gate_text", config.gate_tolerance is not None),
                                    ("gate_answer_tolerance", config.gate_answer_tolerance is not None),
                                    ("gate_answers", config.gate_answer_tolerance is not None),
                                    ("anchor_prompts", bool(config.anchor_prompts)),
                                    ("protect_directions", config.protect_directions > 0),
                                    ("projection", config.projection == "whitened"),
                                    ("layer_options", config.whitens and config.projection != "whitened"),
                                    ("gate_repair", config.gate_repair > 0),
                                    ("inner_kl_limit", config.inner_kl_limit is not None)) if on]
    explicit = [name for name in wanted if name in options]
    if explicit:
        raise PatchError(f"{', '.join(explicit)} need the tokenizer: pass patch(model, tokenizer=tok, ...)")
    if not wanted:
        return None
    config.anchor_weight, config.protect_directions = 0.0, 0
    config.gate_tolerance = config.gate_answer_tolerance = None
    keyed = ", the MLP keyed to the entity (layer_options)" if config.drop_auto_layer_options() else ""
    return (f"no tokenizer given: the anchor term, the built-in gate probes, the protected input directions{keyed} "
            "are off (pass tokenizer= to patch() to turn them on)")


def _replica_blocks(config: LearnerConfig, process_group) -> tuple[Optional[str], Optional[tuple[int, int]]]:
    """(a note, (rank, world)) for a learner in a group. Synchronous replicas split a fitted A
    into one block a replica (fastcl.distributed); asynchronous ones would each fit their own A
    between averages, so the default preset is off there and an explicit fitted A refused."""
    layout = group_layout(process_group)
    if layout is None:
        return None, None
    if config.sync_every is None:
        return None, layout
    if config.drop_auto_layer_options():
        return ("asynchronous replicas (sync_every): the default layer_options (the MLP keyed to the entity in an A "
                "fitted to each request) are off, since each replica would fit its own A between averages; every "
                "layer learns at every position in a random A"), None
    if config.whitens:
        raise PatchError("projection='whitened' with asynchronous replicas (sync_every): each replica would fit its "
                         "own A between averages; learn synchronously (sync_every=None) or with projection='random'")
    return None, None


def _general_text_geometry(model: nn.Module, base_modules: dict, config: LearnerConfig, tokenizer):
    """(protected directions, whiteners) per layer from one forward over the anchor text
    (fastcl.protection), with the model as it is, before anything changes; empty when off."""
    k, whiten = config.protect_directions, config.whitens
    if not (k or whiten):
        return {}, {}
    narrow = [name for name, m in base_modules.items() if linear_shape(m)[1] <= k]
    if narrow:
        raise PatchError(f"protect_directions={k} leaves nothing for A in {narrow[:3]} (input width <= {k}); "
                         "lower it or exclude those layers")
    from .guard import ANCHOR_TEXT, text_ids

    moments, owner, rows = input_moments(model, base_modules, text_ids(tokenizer, ANCHOR_TEXT))
    protected = leading_directions(moments, owner, k) if k else {}
    fitted = [name for name in base_modules if config.layer(name)["projection"] == "whitened"]
    return protected, (whiteners(moments, owner, rows, config.projection_ridge, fitted) if fitted else {})


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def patch(
    model: nn.Module,
    rank: int = 16,
    targets: Optional[Sequence[str]] = None,
    backend: str = "auto",
    seed: int = 0,
    lr: Optional[float] = None,
    **options,
):
    """Turn `model` into a learner, in place. Returns the Learner, also at `model.fastcl`.

    Every nn.Linear (and GPT-2 Conv1D) inside the decoder blocks gets a fast-weight path; the
    output embedding and anything outside the blocks are left alone unless named in `targets`.
    `targets` and `exclude` take names or regexes, matched against the qualified name or its last
    component. The base model's parameters are frozen (and unfrozen again by unpatch).
    backend="auto" defers to the FASTCL_BACKEND environment variable when it is set.
    process_group= (see fastcl.distributed): None learns with the default torch.distributed group
    when one is initialised, a ProcessGroup learns with that group, False learns alone.
    tokenizer= is needed by the recipe's anchor term, built-in gate probe and protected input
    directions (they read shipped text); with it, patch() runs one forward over that text first.
    Recipe options (objective, passes, replay, step_every, consolidate_every, anchor_weight,
    gate_tolerance, ...) are documented on LearnerConfig and in the README.
    """
    from .learner import Learner  # the learner imports the patcher's report type

    if backend == "auto":
        backend = os.environ.get("FASTCL_BACKEND", "auto")
    # Not part of the config: a group is neither saved nor compared between replicas.
    process_group = check_process_group(options.pop("process_group", None))
    tokenizer = options.pop("tokenizer", None)
    config = LearnerConfig(rank=rank, targets=targets, backend=backend, seed=seed, lr=lr, **options)
    without_tokenizer = _without_tokenizer(config, tokenizer, options)
    replica_note, replica = _replica_blocks(config, process_group)
    notes = [without_tokenizer, replica_note]
    _refuse_if_wrapped(model)
    report = plan(model, config)
    report.notes += [note for note in notes if note]
    base_modules = {name: model.get_submodule(name) for name, *_ in report.patched}
    device = next(iter(base_modules.values())).weight.device
    # In a synchronous group a fitted A holds one block of `rank` rows a replica (fastcl.distributed).
    in_blocks = set() if replica is None else {name for name in base_modules
                                               if config.layer(name)["projection"] == "whitened"}
    if backend != "auto":
        from .ops import backends

        backends.resolve(backend, device)  # fail now, before anything changes
        largest = config.rank * (replica[1] if in_blocks else 1)
        try:
            backends.check_rank(backend, device, largest)
        except RuntimeError as error:
            split = f" (rank {config.rank} x {replica[1]} replicas: a fitted A holds a block a replica)" \
                if largest != config.rank else ""
            raise PatchError(f"backend {backend!r} cannot learn at rank {largest}{split}: {error}") from None
    _check_texts(config, tokenizer)
    protected, whitening = _general_text_geometry(model, base_modules, config, tokenizer)
    fast = {}
    for i, (name, base) in enumerate(base_modules.items()):
        fast[name] = FastLinear(base, layer_index=i, rank=config.rank * (replica[1] if name in in_blocks else 1),
                                scale=config.scale, seed=config.seed, backend=backend, protected=protected.get(name),
                                whitener=whitening.get(name), backward_dtype=config.backward_dtype,
                                served_weight=config.projection_served)
        if name in in_blocks:
            fast[name].fit_block = (replica[0] * config.rank, config.rank)
    if in_blocks:
        report.notes.append(f"replicas: the fitted A of {len(in_blocks)} layers holds {replica[1]} blocks of {config.rank} "
                            f"rows, one a replica; this one (rank {replica[0]}) fits rows "
                            f"{replica[0] * config.rank}-{(replica[0] + 1) * config.rank - 1}")
    # Everything else that can fail has run; from here on the model changes (put back if the learner fails).
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    for name, module in fast.items():
        _set_submodule(model, name, module)
    report.notes += recompute.install(model)
    precision.install(model, config.backward_dtype)
    report.notes.append(precision.describe(config.backward_dtype, next(iter(fast.values())).weight.dtype, device.type))
    try:
        learner = Learner(model, fast, config, report, requires_grad, process_group, tokenizer)
    except BaseException:
        _put_back(model, fast, requires_grad)  # all or nothing: the model as it was
        raise
    model.fastcl = learner
    return learner


def _put_back(model: nn.Module, fast: dict, requires_grad: dict) -> None:
    """The original layers, hooks and requires_grad flags back in place of `fast`."""
    recompute.remove(model)
    precision.remove(model)
    for name, module in fast.items():
        _set_submodule(model, name, module.base)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, p.requires_grad))


def unpatch(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the original layers back, holding the consolidated weights.

    With merge=True (the default) fast weights that were stepped but not consolidated are
    merged first, so nothing learned is lost; merge=False discards them.
    """
    learner = getattr(model, "fastcl", None)
    if learner is None:
        raise PatchError("model is not patched by fastcl")
    if merge and learner.has_unmerged_updates():
        learner.consolidate(gate=False)  # asked for explicitly: merge what was learned
    _put_back(model, learner.modules, learner.original_requires_grad)
    del model.fastcl
    learner.detach()
    return model
