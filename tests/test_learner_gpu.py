"""The learning path on a CUDA device, where a deployed model serves: learn() with context gain
and replay, the optimizer step, consolidate() with its gate (refusal included), rollback(),
save/load; on a tiny model against the same run on the CPU, for each backend, and the whole
default recipe (anchor and gate on the shipped texts) on SmolLM2. Skipped without CUDA: the GPU
session runs it (bench/gpu_session.sh, step tests_learner_gpu)."""

import os

import pytest
import torch

import fastcl
from fastcl.ops import backends
from helpers import VOCAB, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU session runs it)")]


def requests(n=6):
    """(teacher prompt, response, student prompt) token lists, the same on every run."""
    g = torch.Generator().manual_seed(11)

    def ids(length):
        return torch.randint(0, VOCAB, (length,), generator=g).tolist()

    return [(ids(9 + i), ids(4 + i % 3), ids(5)) for i in range(n)]


def learn_stream(device: str, backend: str):
    """A tiny llama on `device` after learning the same requests; every merge checked."""
    model = tiny_model("llama").to(device)
    learner = fastcl.patch(model, rank=4, lr=1e-2, backend=backend, gain_threshold=-float("inf"), replay=8,
                           replay_per_step=2, consolidate_every=2, gate_every=1, backward_dtype=None)
    for teacher, response, student in requests():
        learner.learn(teacher, response, student)
    return model, learner


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_learn_on_cuda_matches_the_same_stream_on_the_cpu(backend):
    ok, reason = backends.status(backend, "cuda")
    if not ok:
        pytest.skip(f"{backend} unavailable on cuda: {reason}")
    cpu_model, cpu = learn_stream("cpu", "torch")
    gpu_model, gpu = learn_stream("cuda", backend)
    assert gpu.counters.consolidations == cpu.counters.consolidations == 3
    for name, module in gpu.modules.items():
        assert module.weight.device.type == "cuda" and module.B.device.type == "cuda"
        assert module.A.device.type == "cuda" and module.grad_B.device.type == "cuda"
        reference = cpu.modules[name]
        # fp32 throughout; TF32 is off by default for matmuls in torch, so the runs differ only in
        # summation order, compounded over 6 steps and 3 merges.
        torch.testing.assert_close(module.weight.cpu(), reference.weight, rtol=1e-3, atol=1e-4, msg=name)
        torch.testing.assert_close(module.B.detach().cpu(), reference.B.detach(), rtol=1e-2, atol=1e-4, msg=name)
    ids = torch.tensor([requests()[0][0]])
    with torch.no_grad():
        torch.testing.assert_close(gpu_model(ids.cuda()).logits.cpu(), cpu_model(ids).logits, rtol=1e-3, atol=1e-3)


def test_gate_rollback_and_state_round_trip_on_cuda(tmp_path):
    model, learner = learn_stream("cuda", "torch")
    probe_ids = torch.tensor([requests()[1][0]], device="cuda")
    with torch.no_grad():
        reference = model(probe_ids).logits

    def closeness(m):
        with torch.no_grad():
            return -float((m(probe_ids).logits - reference).abs().mean())

    learner.add_probe(closeness, tolerance=0.05, name="probe")
    weights = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    with torch.no_grad():  # a planted bad update: the gate must refuse it and change nothing
        for module in learner.modules.values():
            module.B.normal_(0, 5.0)
            module.b_is_zero = False
    bad = learner.consolidate()
    assert not bad.committed and bad.gate.scores["probe"]["drop"] > 0.05
    assert all(torch.equal(m.weight, weights[n]) for n, m in learner.modules.items())

    teacher, response, student = requests()[2]
    merges = learner.counters.consolidations
    learner.learn(teacher, response, student)
    learner.learn(teacher, response, student)  # consolidate_every=2: one of the two merges
    assert learner.counters.consolidations == merges + 1
    merged = {n: m.weight.detach().clone() for n, m in learner.modules.items()}
    assert any(not torch.equal(merged[n], weights[n]) for n in merged)
    learner.rollback()
    assert all(torch.equal(m.weight, weights[n]) for n, m in learner.modules.items()), "rollback must be exact"

    learner.learn(teacher, response, student)  # live fast weights to save
    path = tmp_path / "state.safetensors"
    learner.save(path)
    with torch.no_grad():
        served = model(probe_ids).logits
    twin_model, twin = learn_stream("cuda", "torch")
    twin.load(path)
    assert all(m.B.device.type == "cuda" for m in twin.modules.values())
    with torch.no_grad():
        assert torch.equal(twin_model(probe_ids).logits, served), "a loaded state must serve exactly as saved"


def smollm_tokenizer():
    """SmolLM2's tokenizer: from FASTCL_TEST_TOKENIZER_DIR (a tokenizer.save_pretrained folder: the
    GGUF does not fit what travels to a GPU machine), else from the installed GGUF."""
    directory = os.environ.get("FASTCL_TEST_TOKENIZER_DIR")
    if directory:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    return fastcl.models.load_default()[1]


def default_recipe_stream(device: str, tokenizer, facts: int = 4):
    """A small random llama with SmolLM2's vocabulary on `device`, patched with the default recipe
    (replay, anchor and gate on the shipped texts, gate_every 4), after learning four served facts."""
    import transformers as tf

    from fastcl import evaluate as E
    from fastcl.facts import fact_stream

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(config).eval().to(device)
    # Every response token learned: a random model's context gains sit near any threshold, where
    # the two devices' rounding could pick different tokens.
    learner = fastcl.patch(model, tokenizer=tokenizer, gain_threshold=-float("inf"), backward_dtype=None)
    for fact in fact_stream(1, seed=5)[:facts]:
        teacher = E.chat_ids(tokenizer, E.with_context(fact.document, fact.served_question))
        student = E.chat_ids(tokenizer, fact.served_question)
        response = tokenizer(f"The answer is {fact.value}.", add_special_tokens=False)["input_ids"]
        learner.learn(teacher, response, student)
    return model, learner


def test_default_recipe_on_cuda_matches_the_cpu():
    """The whole default recipe (context gain, replay, anchor, windowed gate, merges with resampled
    A) gives the same weights on the GPU as on the CPU: nothing in it silently runs elsewhere or
    depends on the device."""
    tokenizer = smollm_tokenizer()
    runs = {device: default_recipe_stream(device, tokenizer) for device in ("cpu", "cuda")}
    (cpu_model, cpu), (_, gpu) = runs["cpu"], runs["cuda"]
    assert gpu.counters.consolidations == cpu.counters.consolidations == 4
    assert gpu.counters.gate_skipped == cpu.counters.gate_skipped
    assert gpu.counters.gate_refusals == cpu.counters.gate_refusals
    for name, module in gpu.modules.items():
        assert module.weight.device.type == "cuda"
        torch.testing.assert_close(module.weight.cpu(), cpu.modules[name].weight, rtol=1e-3, atol=1e-4, msg=name)
    untouched = default_recipe_stream("cpu", tokenizer, facts=0)[0]
    assert any(not torch.equal(p, q) for p, q in zip(cpu_model.parameters(), untouched.parameters())), "nothing learned"
