"""fastcl.models: the default model's loader names what stops it."""

import importlib.util
import sys
from pathlib import Path

import pytest

from fastcl import models


def raise_import_error(*args, **kwargs):
    raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")


def test_a_kernel_folder_imported_as_hugging_faces_kernels_is_named_in_the_load_error(monkeypatch):
    """With a checkout's root on sys.path, fastcl's kernels/ is imported as the top-level
    `kernels` (Hugging Face's package, which transformers imports): the error says so instead
    of sending the user to reinstall; otherwise it keeps the install hint."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", raise_import_error)
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    with pytest.raises(ImportError, match="Install what the GGUF loader needs") as plain:
        models.load_default()
    assert "imported as Hugging Face" not in str(plain.value)

    folder = Path(importlib.util.find_spec("fastcl.kernels").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("kernels", folder / "__init__.py")
    monkeypatch.setitem(sys.modules, "kernels", importlib.util.module_from_spec(spec))
    assert models.shadowing_kernels_folder() == folder
    with pytest.raises(ImportError, match=r"kernels.*imported as Hugging Face's `kernels` package.*not `python -m pytest`"):
        models.load_default()
