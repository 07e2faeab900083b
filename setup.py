"""Build fastcl: pure Python everywhere, plus the CUDA extension fastcl._C where it can be built.

FASTCL_BUILD_CUDA=1 requires the extension, =0 never builds it, unset builds it when torch has
CUDA and nvcc is found. TORCH_CUDA_ARCH_LIST chooses the architectures (default "8.0;9.0a").
The Triton kernels live in kernels/ and install as fastcl.kernels.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0a"


def _cuda_build_wanted():
    flag = os.environ.get("FASTCL_BUILD_CUDA")
    if flag == "0":
        return False, "FASTCL_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        reason = "torch is not importable at build time (install torch first, build with --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
            reason = "nvcc not found (set CUDA_HOME)"
        else:
            return True, ""
    if flag == "1":
        sys.exit(f"FASTCL_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    return False, reason


def _write_build_info(built_cuda, reason, archs):
    import json

    try:
        import torch

        torch_version, cuda_version = torch.__version__, torch.version.cuda
    except ImportError:
        torch_version = cuda_version = None
    info = {
        "cuda_extension": built_cuda,
        "cuda_extension_reason": reason,
        "torch": torch_version,
        "cuda": cuda_version,
        "arch_list": archs if built_cuda else None,
    }
    (ROOT / "fastcl" / "_build_info.py").write_text(
        '"""Written by setup.py: what this build of fastcl was built with."""\n'
        f"BUILD_INFO = {json.dumps(info, indent=4)}\n".replace("null", "None").replace("true", "True").replace("false", "False")
    )


def _extensions():
    built, reason = _cuda_build_wanted()
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    _write_build_info(built, reason, archs)
    if not built:
        print(f"fastcl: building without the CUDA extension ({reason})")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c[pu]*"))
    ext = CUDAExtension(
        "fastcl._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-DFASTCL_WITH_CUDA_TORCH"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=["fastcl", "fastcl.ops", "fastcl.kernels"],
    package_dir={"fastcl": "fastcl", "fastcl.kernels": "kernels"},
    package_data={"fastcl": ["data/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
