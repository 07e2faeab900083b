"""kernels/ in a checkout shares its name with Hugging Face's kernel package, which transformers imports."""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def test_the_kernel_folder_hands_its_name_to_hugging_faces_kernels_from_the_checkout_root():
    """Python started in a checkout's root finds kernels/ first as the top-level `kernels`; it
    hands that name to Hugging Face's package (transformers imports it), and fastcl.kernels
    still loads from kernels/."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5 does not need it)")
    folder = Path(importlib.util.find_spec("fastcl.kernels").submodule_search_locations[0])
    if folder.name != "kernels" or not (folder.parent / "fastcl").is_dir():
        pytest.skip("an installed fastcl, not a source checkout: no kernels/ beside fastcl/")
    script = ("import kernels, fastcl.kernels; from kernels import CUDAProperties; "
              "print(kernels.__file__); print(fastcl.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", script], cwd=folder.parent, capture_output=True, text=True, check=True)
    hugging_face, ours = out.stdout.split()
    assert Path(hugging_face).parent != folder, "kernels/ kept the name"
    assert Path(ours).parent == folder
