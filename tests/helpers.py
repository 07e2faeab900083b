"""Shared test helpers: tiny models of several architectures, tolerance table, comparisons, and
bench/ scripts loaded as modules."""

import importlib.util
from pathlib import Path

import torch

# One tolerance table per dtype: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}

VOCAB = 97


def random_rows(seed, n, low=3, high=9):
    """n rows of random token ids, each of a random length in [low, high)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def assert_close(actual, expected, dtype=None, what="tensor", rtol=None, atol=None):
    """allclose with the dtype's tolerance; on failure name the first bad index and NaN/inf."""
    dtype = dtype or expected.dtype
    r, a = TOLERANCES[dtype]
    rtol, atol = rtol if rtol is not None else r, atol if atol is not None else a
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off; first at {index}: "
            f"{actual[index].item():.6g} vs {expected[index].item():.6g} (rtol {rtol}, atol {atol}); "
            f"nan/inf in actual: {bool((~torch.isfinite(actual)).any())}, in expected: {bool((~torch.isfinite(expected)).any())}"
        )


def op_operands(M, d_in, d_out, r, dtype, bias=True, lead=()):
    """(x, W, b, A, B, generator) for the op's tests, seeded by the shape; draw further tensors
    from the returned generator so that they too are the same on every run."""
    g = torch.Generator().manual_seed(M * 1000 + d_in + d_out + r)
    x = torch.randn(*lead, M, d_in, generator=g).to(dtype)
    W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    A = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dtype)
    B = torch.randn(d_out, r, generator=g) * 0.1
    return x, W, b, A, B, g


def tiny_model(arch: str, seed: int = 0):
    """A randomly initialised causal LM of about 50k parameters, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, **common)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                               **common)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **common)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


ARCHITECTURES = ["llama", "qwen2", "mistral", "gpt_neox", "gpt2"]


def random_ids(batch=2, seq=11, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def learner_state(learner):
    """Everything a failed call must leave unchanged: weights, fast weights, accumulators,
    optimizer state, counters."""
    state = {}
    for name, m in learner.modules.items():
        state[f"{name}.weight"] = m.weight.detach().clone()
        state[f"{name}.B"] = m.B.detach().clone()
        state[f"{name}.grad_B"] = m.grad_B.clone()
        state[f"{name}.A"] = m.A.clone()
    for i, s in learner.optimizer.state_dict()["state"].items():
        for k, v in s.items():
            state[f"optim.{i}.{k}"] = torch.as_tensor(v).clone()
    state["counters"] = dict(learner.counters.__dict__)
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys(), "state keys changed"
    for key in before:
        if key == "counters":
            assert before[key] == after[key], f"counters changed: {before[key]} -> {after[key]}"
        else:
            assert torch.equal(before[key], after[key]), f"{key} changed"


def weights_copy(model):
    """A copy of every state_dict tensor: what a run that must leave the model alone compares with."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_weights_unchanged(model, before, what="the run"):
    after = model.state_dict()
    assert after.keys() == before.keys(), f"{what} changed the state_dict's keys"
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{what} left {name} changed"


def load_bench(name: str):
    """A script from bench/ as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_fits(monkeypatch) -> list:
    """Every fitted projection from here on, as (layer index, the flat row positions A was fitted to)."""
    from fastcl.layers import FastLinear

    fits, fit = [], FastLinear.fit_projection

    def recording(self, x, positions):
        fits.append((self.layer_index, positions.tolist()))
        return fit(self, x, positions)

    monkeypatch.setattr(FastLinear, "fit_projection", recording)
    return fits
