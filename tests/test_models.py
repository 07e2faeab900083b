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


def test_the_kernel_folder_hands_its_name_to_hugging_faces_kernels_from_the_checkout_root():
    """Python started in a checkout's root finds kernels/ first as the top-level `kernels`; it
    hands that name to Hugging Face's package (transformers imports it), and fastcl.kernels
    still loads from kernels/."""
    import importlib.metadata
    import subprocess

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5 does not need it)")
    folder = Path(importlib.util.find_spec("fastcl.kernels").submodule_search_locations[0])
    if folder.name != "kernels" or not (folder.parent / "fastcl").is_dir():
        pytest.skip("an installed fastcl, not a source checkout: no kernels/ beside fastcl/")
    script = ("import kernels, fastcl.kernels, sys; from kernels import CUDAProperties; "
              "print(kernels.__file__); print(fastcl.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", script], cwd=folder.parent, capture_output=True, text=True, check=True)
    hugging_face, ours = out.stdout.split()
    assert Path(hugging_face).parent != folder, "kernels/ kept the name"
    assert Path(ours).parent == folder
