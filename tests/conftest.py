import os

# Nothing in the suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA, the Triton kernels run on CPU tensors under triton's interpreter. triton 3.9
# reads TRITON_INTERPRET (triton.knobs.runtime.interpret) when @triton.jit decorates a kernel,
# i.e. when fastcl.kernels is first imported, not at launch; so it is set here, before pytest
# imports any test module. With CUDA the same tests run the compiled kernels. Elsewhere in the
# suite it only changes what backends.status("triton", "cpu") reports; "auto" still picks torch
# on the CPU (tests/test_info.py and tests/test_triton.py check that).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct, loaded once per session (about 15 s). Tests must not change it:
    use the `fresh_smollm` fixture for anything that patches."""
    import fastcl

    return fastcl.models.load_default()


@pytest.fixture
def fresh_smollm(smollm):
    """The session's SmolLM2, unpatched and with its original weights restored afterwards."""
    from fastcl.benchmark import restored

    model, tokenizer = smollm
    with restored(model):
        yield model, tokenizer
