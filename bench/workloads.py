"""End-to-end workloads on SmolLM2-135M: serving alone, serving while learning, and what users do
today (a PEFT LoRA step, a full fine-tuning step) over the same tokens; plus the counts that go
with them (saved-activation bytes, state bytes, KV-cache bytes, the adapter's FLOP share).

Used by bench/test_bench_end_to_end.py (timed with pytest-benchmark) and by
bench/profile_observe.py (where the time goes).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import fastcl

BATCH, SEQ = 2, 128
RANK = 16
PROMPT = "The history of the old harbour city begins with"


def token_batch(vocab_size: int, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """Random token ids: the cost of a forward does not depend on which tokens they are."""
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def leaf_names(learner) -> list[str]:
    """The patched layers' last name components (q_proj, ...): PEFT targets the same layers."""
    return sorted({name.rsplit(".", 1)[-1] for name, *_ in learner.report.patched})


@dataclass
class Side:
    """One model and the call that the benchmark times on it."""

    model: nn.Module
    run: Callable[[], object]


def serving(model: nn.Module, ids: torch.Tensor) -> Side:
    """The plain no-grad forward: serving alone."""
    model.requires_grad_(False)

    def run():
        with torch.no_grad():
            return model(input_ids=ids)

    return Side(model, run)


def observing(model: nn.Module, ids: torch.Tensor, rank: int = RANK, **patch_options):
    """fastcl: the served forward that also accumulates the low-rank gradient. Returns (side, learner).
    patch_options go to fastcl.patch (backend=..., say).

    One observe() and step() first, so that the timed calls run with live fast weights (B != 0),
    as a learner does in steady state."""
    learner = fastcl.patch(model, rank=rank, **patch_options)
    learner.observe(ids)
    if not learner.step():
        raise RuntimeError("the learner did not step: the fast weights would still be zero")
    return Side(model, lambda: learner.observe(ids)), learner


def training_step(model: nn.Module, ids: torch.Tensor, lr: float = 1e-5) -> Side:
    """What a user's training loop does over logged tokens: forward with labels (transformers'
    own shifted, upcast cross-entropy), backward, AdamW step, zero the gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return Side(model, run)


def peft_lora(model: nn.Module, targets: list[str], rank: int = RANK) -> nn.Module:
    """PEFT LoRA r=rank, alpha=rank, dropout 0, on the same layers fastcl patches."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, config)


def full_fine_tuning(model: nn.Module) -> nn.Module:
    return model.requires_grad_(True)


def saved_activation_bytes(fn: Callable[[], object], *models: nn.Module) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs.

    Counted with torch.autograd.graph.saved_tensors_hooks: each saved tensor's whole storage,
    once per storage (a view, or a tensor saved by two nodes, counts once). Parameters and
    buffers of `models` (weights, fastcl's A, B and accumulators) are excluded: they are state,
    held whether or not anything is saved, and not per token.
    """
    state = {t.untyped_storage().data_ptr() for m in models for t in itertools.chain(m.parameters(), m.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def kv_cache_bytes_per_token(model: nn.Module) -> int:
    """Keys and values of one token over every layer, in the model's dtype."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * kv_heads * head_dim * itemsize


def adapter_flop_share(model: nn.Module, learner) -> float:
    """Multiply-adds per token of the adapters, r (d_in + d_out) per patched layer, over those of
    every linear layer of the base model (lm_head included; attention scores, which grow with
    the context, are not)."""
    adapter = sum(m.rank * (m.in_features + m.out_features) for m in learner.modules.values())
    base = sum(m.in_features * m.out_features for m in learner.modules.values())
    patched = {id(m.base) for m in learner.modules.values()}
    base += sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in patched)
    return adapter / base


def generation(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    """Greedy generation of exactly new_tokens tokens (no early stop on EOS)."""
    def run():
        with torch.no_grad():
            return model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    return run


def with_decode_closure(run: Callable[[], torch.Tensor], model: nn.Module, kind: str) -> Callable[[], torch.Tensor]:
    """`run` with another of the torch backend's decode closures: "python" (as without
    fastcl._serving) or "aten" (fastcl._serving with its fused decode loop off: three ATen calls).
    The prepared closures are dropped before and after: their cache key does not name the kind."""
    from fastcl.layers import FastLinear
    from fastcl.ops import reference

    settings = {"python": {"compiled_serving_forward": None}, "aten": {"max_fused_rows": 0}}[kind]

    def drop_prepared():
        for module in model.modules():
            if isinstance(module, FastLinear):
                module._serving = None

    def other_run():
        saved = {name: getattr(reference, name) for name in settings}
        for name, value in settings.items():
            setattr(reference, name, value)
        drop_prepared()
        try:
            return run()
        finally:
            for name, value in saved.items():
                setattr(reference, name, value)
            drop_prepared()

    return other_run


def learned_copy(model: nn.Module, ids: torch.Tensor, consolidate: bool, rank: int = RANK):
    """A patched copy of `model` whose fast weights are live (B != 0) after one observe and step,
    or merged into the weights again when consolidate is True. Returns (copy, learner)."""
    side, learner = observing(copy.deepcopy(model), ids, rank)
    if consolidate:
        learner.consolidate()
    return side.model, learner
