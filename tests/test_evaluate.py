"""fastcl.evaluate's batched scoring against one plain forward per sequence, on every tiny
architecture: the batching (shared prefix, padding between prompt and options, chunks) must
change nothing but float rounding."""

import pytest
import torch

from fastcl import evaluate as E
from fastcl.batching import pad_left
from helpers import ARCHITECTURES, VOCAB, tiny_model


def one_forward_scores(model, prompt, options):
    """Each option's mean token log-probability from a forward over prompt + option alone."""
    scores = []
    with torch.no_grad():
        for option in options:
            ids = torch.tensor([list(prompt) + list(option)])
            logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            picked = logprobs[torch.arange(len(prompt) - 1, ids.shape[1] - 1), torch.tensor(option)]
            scores.append(float(picked.mean()))
    return scores


def ragged_items(seed, prefix_length):
    """Five prompts sharing `prefix_length` tokens, then 1-9 of their own; 1-3 options of 1-4 tokens."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    prefix = ids(prefix_length)
    prompts, options = [], []
    for _ in range(5):
        prompts.append(prefix + ids(int(torch.randint(1, 10, (1,), generator=generator))))
        options.append([ids(int(torch.randint(1, 5, (1,), generator=generator)))
                        for _ in range(int(torch.randint(1, 4, (1,), generator=generator)))])
    return prompts, options


# Every shape of the batching on one architecture; the other architectures (their own position
# and cache handling) with a shared prefix and more than one chunk.
CASES = [("llama", prefix, batch) for prefix in (0, 6) for batch in (1, 16)] + \
    [(arch, 6, 2) for arch in ARCHITECTURES]


@pytest.mark.parametrize("arch, prefix_length, batch", CASES)
def test_batched_option_scores_match_one_forward_per_option(arch, prefix_length, batch):
    model = tiny_model(arch)
    prompts, options = ragged_items(seed=prefix_length + batch, prefix_length=prefix_length)
    batched = E.batched_option_logprobs(model, prompts, options, batch=batch)
    assert [len(row) for row in batched] == [len(o) for o in options]
    for prompt, row_options, row in zip(prompts, options, batched):
        assert row == pytest.approx(one_forward_scores(model, prompt, row_options), abs=1e-5)


def test_a_prompt_that_is_the_shared_prefix_keeps_its_last_token_to_score_with():
    """One prompt is a prefix of the others: the shared part must stop a token short of it."""
    model = tiny_model("llama")
    prompts = [[5, 6, 7], [5, 6, 7, 8, 9], [5, 6, 7, 1]]
    options = [[[3], [4, 2]], [[3]], [[2, 2, 2]]]
    assert E._common_prefix(prompts) == 2
    for prompt, row_options, row in zip(prompts, options, E.batched_option_logprobs(model, prompts, options)):
        assert row == pytest.approx(one_forward_scores(model, prompt, row_options), abs=1e-5)


@pytest.mark.parametrize("options", [
    [[[3], [4]], [[2]]],  # one token each: no option forward at all
    [[[3, 1, 2], [4, 2]], [[2, 2, 2, 2], [1], [4, 2]]],  # a group per length, one length shared by both rows
])
def test_options_of_one_token_and_of_several_lengths_score_as_one_forward_each(options):
    model = tiny_model("llama")
    prompts = [[5, 6, 7], [5, 6, 8, 9]]
    for prompt, row_options, row in zip(prompts, options, E.batched_option_logprobs(model, prompts, options)):
        assert row == pytest.approx(one_forward_scores(model, prompt, row_options), abs=1e-5)


def test_batched_option_scores_name_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least one token"):
        E.batched_option_logprobs(model, [[1, 2], []], [[[3]], [[3]]])
    with pytest.raises(ValueError, match="at least one token"):
        E.batched_option_logprobs(model, [[1, 2]], [[[3], []]])
    with pytest.raises(ValueError, match="2 prompts but 1 option lists"):
        E.batched_option_logprobs(model, [[1, 2], [1, 3]], [[[3]]])


def test_pad_left_puts_each_row_at_the_right_edge():
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
