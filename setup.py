"""Build fastcl: pure Python everywhere, plus the C++ decode closure fastcl._serving and the CUDA
extension fastcl._C where they can be built.

FASTCL_BUILD_CUDA=1 requires the extension, =0 never builds it, unset builds it when torch has
CUDA and nvcc is found. TORCH_CUDA_ARCH_LIST chooses the architectures (default "8.0;9.0a").
fastcl._serving (csrc/serving, torch C++ only, any device) is built whenever torch is importable
at build time; FASTCL_BUILD_SERVING=0 skips it, =1 makes a failed compile fail the build (unset,
a failed compile leaves the Python closure).
FASTCL_LOCAL_VERSION sets the wheel's local version label (fastcl-0.1.0+<label>); unset, a
CUDA build is labelled after torch's CUDA ("cu124"), a pure build gets no label.
The Triton kernels live in kernels/ and install as fastcl.kernels.

The helpers are importable without building (tests/test_cuda_build.py compiles csrc/ with the
same sources and flags on a machine without a GPU); setup() runs only as a script, which is
how pip and setuptools' PEP 517 backend run this file.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0a"
# On top of what torch's BuildExtension adds itself (COMMON_NVCC_FLAGS, -std=c++20, -fPIC and
# the -gencode flags of TORCH_CUDA_ARCH_LIST). No --use_fast_math: the kernels have nothing
# transcendental to speed up, and its flush-to-zero would make the fp32 path differ from the
# reference on denormals. -lineinfo lets compute-sanitizer name source lines.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]
# PEP 440 local version label: alphanumerics separated by dots.
_LOCAL_LABEL = re.compile(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*")


def cuda_sources():
    """The extension's translation units: kernels and launchers (.cu), the torch binding (.cpp)."""
    csrc = ROOT / "csrc"
    return [str(p.relative_to(ROOT)) for p in sorted(csrc.glob("*.cu")) + sorted(csrc.glob("*.cpp"))]


def serving_sources():
    """fastcl._serving's translation units: torch C++ only, no CUDA (csrc/serving)."""
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "serving").glob("*.cpp"))]


def base_version():
    text = (ROOT / "fastcl" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def local_version(built_cuda, cuda_version):
    """The label after '+': FASTCL_LOCAL_VERSION if set (empty for none), else cuXYZ for a CUDA
    build (the convention of torch's own wheels), else none."""
    label = os.environ.get("FASTCL_LOCAL_VERSION")
    if label is None:
        label = "cu" + cuda_version.replace(".", "") if built_cuda and cuda_version else ""
    if label and not _LOCAL_LABEL.fullmatch(label):
        sys.exit(f"FASTCL_LOCAL_VERSION={label!r} is not a PEP 440 local version label "
                 "(letters and digits, separated by dots, e.g. cu124 or cu124.torch213)")
    return label


def package_version(label):
    return base_version() + (f"+{label}" if label else "")


_NO_TORCH = "torch is not importable at build time (install torch first, build with --no-build-isolation)"


def _build_switch(variable, what, why_not):
    """(build `what`?, why not) under the switch `variable`: 0 never, 1 required (the build stops
    with the reason), unset when it can. why_not() returns "" when it can be built."""
    flag = os.environ.get(variable)
    if flag == "0":
        return False, f"{variable}=0"
    reason = why_not()
    if not reason:
        return True, ""
    if flag == "1":
        sys.exit(f"{variable}=1 but {what} cannot be built: {reason}")
    return False, reason


def _cuda_missing():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return _NO_TORCH
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc not found (set CUDA_HOME)"
    return ""


def _torch_cpp_missing():
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError:
        return _NO_TORCH
    return ""


def cuda_build_wanted():
    """(build the extension?, why not)."""
    return _build_switch("FASTCL_BUILD_CUDA", "the CUDA extension", _cuda_missing)


def serving_build_wanted():
    """(build fastcl._serving?, why not). It needs only a C++ compiler and torch's CPU headers."""
    return _build_switch("FASTCL_BUILD_SERVING", "fastcl._serving", _torch_cpp_missing)


def _torch_versions():
    try:
        import torch
    except ImportError:
        return None, None
    return torch.__version__, torch.version.cuda


def _write_build_info(info):
    text = json.dumps(info, indent=4).replace("null", "None").replace("true", "True").replace("false", "False")
    (ROOT / "fastcl" / "_build_info.py").write_text(
        '"""Written by setup.py: what this build of fastcl was built with."""\n' f"BUILD_INFO = {text}\n"
    )


def main():
    from setuptools import setup

    built, reason = cuda_build_wanted()
    serving, serving_reason = serving_build_wanted()
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    torch_version, cuda_version = _torch_versions()
    version = package_version(local_version(built, cuda_version))
    _write_build_info({
        "version": version,
        "cuda_extension": built,
        "cuda_extension_reason": reason,
        "torch": torch_version,
        "cuda": cuda_version,
        "arch_list": archs if built else None,
        "serving_extension": serving,  # attempted; fastcl.info() says whether it imports
        "serving_extension_reason": serving_reason,
    })
    ext_modules, cmdclass = [], {}
    if built:
        from torch.utils.cpp_extension import CUDAExtension

        ext_modules.append(CUDAExtension("fastcl._C", cuda_sources(),
                                         extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}))
    else:
        print(f"fastcl: building without the CUDA extension ({reason})")
    if serving:
        from torch.utils.cpp_extension import CppExtension

        # optional: without a C++ compiler the install still succeeds, with the Python closure.
        ext_modules.append(CppExtension("fastcl._serving", serving_sources(), extra_compile_args=CXX_FLAGS,
                                        optional=os.environ.get("FASTCL_BUILD_SERVING") != "1"))
    else:
        print(f"fastcl: building without fastcl._serving ({serving_reason})")
    if ext_modules:
        from torch.utils.cpp_extension import BuildExtension

        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    setup(
        version=version,
        packages=["fastcl", "fastcl.ops", "fastcl.kernels", "fastcl.data"],
        package_dir={"fastcl": "fastcl", "fastcl.kernels": "kernels"},
        package_data={"fastcl.data": ["*.txt", "*.jsonl"]},  # the probes and texts evaluate.py reads
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
