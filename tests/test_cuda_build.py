"""CI checks of the CUDA extension that need no GPU (they run in `make test`):

- nvcc compiles every csrc/*.cu for each architecture of setup.py's default list (sm_80,
  sm_90a) with the flags torch's BuildExtension would pass: objects only, no warnings, no
  register spills;
- the torch binding csrc/binding.cpp compiles against the installed torch (the CPU wheel here),
  links with those objects and libcudart into a loadable _C module, and its argument checks
  run on CPU tensors;
- the pure-Python wheel builds with FASTCL_BUILD_CUDA unset, installs into a fresh venv,
  imports, runs the op, and reports why the cuda backend is unavailable;
- setup.py's version label logic (the +cuXXX of cluster wheels).

nvcc missing is a failure, not a skip: CI has it. On a machine without the CUDA toolkit, set
FASTCL_SKIP_CUDA_COMPILE=1 to skip the compile checks with that reason shown.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from fastcl.errors import BackendUnavailable

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastcl_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only under __main__
    return module


SETUP = _load_setup()


def _run(cmd, what, timeout=300, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(map(str, cmd))}\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _tool(name, env_home=None):
    if os.environ.get("FASTCL_SKIP_CUDA_COMPILE") == "1":
        pytest.skip("FASTCL_SKIP_CUDA_COMPILE=1: the CUDA compile checks are switched off on this machine")
    candidates = [shutil.which(name)]
    if env_home:
        candidates += [os.path.join(os.environ.get(env_home, ""), "bin", name), f"/usr/local/cuda/bin/{name}"]
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    pytest.fail(f"{name} not found on PATH{' or in $' + env_home + '/bin' if env_home else ''}: CI compiles csrc/ "
                "on every run and needs it (install the CUDA toolkit, nvcc 13.0 on this project's machines, "
                "or set FASTCL_SKIP_CUDA_COMPILE=1 to skip these checks explicitly)")


def _nvcc_flags():
    """What BuildExtension passes to nvcc for a .cu source of fastcl._C, minus include paths
    (the kernels include no torch header)."""
    from torch.utils import cpp_extension

    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = SETUP.DEFAULT_ARCHS
    try:
        arch_flags = cpp_extension._get_cuda_arch_flags()
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    return (list(cpp_extension.COMMON_NVCC_FLAGS) + ["-std=c++20", "-Xcompiler", "-fPIC"] + SETUP.NVCC_FLAGS
            + arch_flags)


def _expected_archs():
    return ["sm_" + a.replace(".", "") for a in SETUP.DEFAULT_ARCHS.split(";")]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_build")


@pytest.fixture(scope="module")
def objects(build_dir):
    """Compile every csrc/*.cu (nvcc) once for the module; returns {source: (object, ptxas log)}."""
    nvcc = _tool("nvcc", env_home="CUDA_HOME")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, "no csrc/*.cu found"
    flags = _nvcc_flags() + ["-Xptxas", "-v", "--Werror", "all-warnings", "--threads", "2"]
    built = {}
    for src in sources:
        obj = build_dir / (src.stem + ".o")
        proc = _run([nvcc, "-c", str(src), "-o", str(obj), *flags], f"nvcc {src.name}", cwd=CSRC)
        built[src] = (obj, proc.stdout + proc.stderr)
    return built


def test_setup_builds_every_csrc_translation_unit():
    sources = SETUP.cuda_sources()
    assert sources == sorted(sources, key=lambda s: (not s.endswith(".cu"), s))
    assert {Path(s).name for s in sources} == {p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")}
    assert not any(s.endswith((".h", ".cuh")) for s in sources), "headers are not translation units"


def test_nvcc_compiles_every_kernel_source_for_each_architecture(objects):
    for src, (obj, log) in objects.items():
        assert obj.stat().st_size > 0, f"{src.name}: empty object"
        compiled_for = set(re.findall(r"Compiling entry function '[^']+' for '(sm_\w+)'", log))
        assert compiled_for == set(_expected_archs()), f"{src.name}: kernels compiled for {compiled_for}"
        spills = [line for line in log.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)]
        assert not spills, f"{src.name}: a kernel spills registers:\n" + "\n".join(spills)


def test_cuda_sources_include_no_torch_header():
    """The split of DESIGN.md: .cu/.cuh include CUDA headers only, the binding torch only."""
    for path in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        bad = [i for i in includes if i.startswith(("torch", "ATen", "c10", "pybind11"))]
        assert not bad, f"{path.name} includes {bad}: CUDA sources must not need torch headers"
    binding_includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', (CSRC / "binding.cpp").read_text())
    bad = [i for i in binding_includes if i.startswith(("cuda", "c10/cuda", "ATen/cuda", "mma"))]
    assert not bad, f"binding.cpp includes {bad}: it must compile against torch's CPU wheel"


@pytest.fixture(scope="module")
def extension(objects, build_dir):
    """fastcl._C built from the binding and the kernel objects against the installed torch."""
    from torch.utils import cpp_extension

    cxx = _tool("c++")
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    binding_obj = build_dir / "binding.o"
    includes = [f"-I{CSRC}"] + [f"-isystem{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-isystem{sysconfig.get_paths()['include']}")
    _run([cxx, "-c", str(CSRC / "binding.cpp"), "-o", str(binding_obj), "-std=c++20", "-fPIC", "-O0", "-Wall",
          "-Wextra", "-Werror", *includes, "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
          f"-D_GLIBCXX_USE_CXX11_ABI={abi}"], "c++ binding.cpp")
    # nvcc links as torch's build does, with the CUDA runtime linked statically: no rpath to find.
    so = build_dir / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    _run([_tool("nvcc", env_home="CUDA_HOME"), "-shared", "-o", str(so), str(binding_obj),
          *(str(o) for o, _ in objects.values()), f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu",
          "-ltorch_python"], "linking _C")
    loader = importlib.machinery.ExtensionFileLoader("_C", str(so))
    spec = importlib.util.spec_from_file_location("_C", so, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _fwd_inputs(M=5, d_in=16, d_out=12, r=4, dtype=torch.float32):
    return dict(x=torch.randn(M, d_in, dtype=dtype), weight=torch.randn(d_out, d_in, dtype=dtype),
                bias=torch.randn(d_out, dtype=dtype), A=torch.randn(r, d_in, dtype=dtype), B=torch.randn(d_out, r),
                scale=0.5, stream=0)


def _bwd_inputs(M=5, d_in=16, d_out=12, r=4):
    return dict(dy=torch.randn(M, d_out), s=torch.randn(M, r), weight=torch.randn(d_out, d_in),
                A=torch.randn(r, d_in), B=torch.randn(d_out, r), grad_B=torch.zeros(d_out, r), scale=0.5,
                needs_dx=True, stream=0)


def test_binding_builds_links_and_exposes_the_launchers(extension):
    assert extension.MAX_RANK == 64 and extension.DECODE_MAX_ROWS == 8
    assert "scale" in extension.lowrank_linear_fwd.__doc__


@pytest.mark.parametrize("change,message", [
    (dict(), "x is on cpu; the CUDA backend needs CUDA tensors"),
    (dict(x=torch.randn(5, 16, dtype=torch.float64)), "x has dtype Double"),
    (dict(x=torch.randn(2, 5, 16)), "x must be 2-D"),
    (dict(B=torch.randn(12, 4, dtype=torch.float16)), "B has dtype Half, expected Float"),
    (dict(weight=torch.randn(12, 15)), r"weight has shape \[12, 15\], expected \[12, 16\]"),
    (dict(A=torch.randn(65, 16), B=torch.randn(12, 65)), "rank 65 is outside 1..64"),
    (dict(bias=torch.randn(11)), r"bias has shape \[11\], expected \[12\]"),
    (dict(weight=torch.randn(12, 32)[:, ::2]), "weight must be row-major"),
    (dict(x=torch.randn(16, 5).t()), "x must be contiguous"),
])
def test_binding_forward_names_the_bad_argument(extension, change, message):
    with pytest.raises(RuntimeError, match=message):
        extension.lowrank_linear_fwd(**{**_fwd_inputs(), **change})


def test_binding_accepts_a_transposed_conv1d_weight_up_to_the_device_check(extension):
    conv1d_weight = torch.randn(16, 12).t()  # GPT-2 stores (d_in, d_out)
    with pytest.raises(RuntimeError, match="x is on cpu"):
        extension.lowrank_linear_fwd(**{**_fwd_inputs(), "weight": conv1d_weight})


@pytest.mark.parametrize("change,message", [
    (dict(), "dy is on cpu; the CUDA backend needs CUDA tensors"),
    (dict(grad_B=torch.zeros(4, 12).t()), r"grad_B \(it is updated in place, so it cannot be copied\) must be contiguous"),
    (dict(grad_B=torch.zeros(12, 4, dtype=torch.float16)), "grad_B has dtype Half, expected Float"),
    (dict(s=torch.randn(5, 3)), r"s has shape \[5, 3\], expected \[5, 4\]"),
    (dict(s=torch.randn(5, 4, dtype=torch.float16)), "s has dtype Half, expected Float"),
])
def test_binding_backward_names_the_bad_argument(extension, change, message):
    with pytest.raises(RuntimeError, match=message):
        extension.lowrank_linear_bwd(**{**_bwd_inputs(), **change})


def test_adapter_refuses_a_rank_above_the_kernels_limit_before_calling_the_extension(monkeypatch, extension):
    """fastcl.ops.cuda_backend checks the rank in Python: on the lent H200's image, a message
    formatted inside _C crashed the process instead of raising (bench/RESULTS.md)."""
    from types import SimpleNamespace

    from fastcl.ops import cuda_backend

    def never(*args, **kwargs):
        raise AssertionError("the extension must not be called with a rank it refuses")

    monkeypatch.setattr(cuda_backend, "_C", SimpleNamespace(MAX_RANK=extension.MAX_RANK, lowrank_linear_fwd=never,
                                                            lowrank_linear_bwd=never))
    fwd, bwd = _fwd_inputs(r=65), _bwd_inputs(r=65)
    with pytest.raises(RuntimeError, match="rank 65 is outside 1..64.*backend \"torch\" or \"triton\""):
        cuda_backend.lowrank_linear_fwd(fwd["x"], fwd["weight"], fwd["bias"], fwd["A"], fwd["B"], 0.5)
    with pytest.raises(RuntimeError, match="rank 65 is outside 1..64"):
        cuda_backend.lowrank_linear_bwd(bwd["dy"], bwd["s"], bwd["weight"], bwd["A"], bwd["B"], bwd["grad_B"], 0.5, True)


# --- setup.py's version label ---------------------------------------------------------------

@pytest.mark.parametrize("env,built,cuda,expected", [
    (None, False, None, "0.1.0"),
    (None, True, "12.4", "0.1.0+cu124"),
    (None, True, "13.0", "0.1.0+cu130"),
    ("cu124.torch213", True, "12.4", "0.1.0+cu124.torch213"),
    ("", True, "12.4", "0.1.0"),
    ("cpu", False, None, "0.1.0+cpu"),
])
def test_local_version_label(monkeypatch, env, built, cuda, expected):
    if env is None:
        monkeypatch.delenv("FASTCL_LOCAL_VERSION", raising=False)
    else:
        monkeypatch.setenv("FASTCL_LOCAL_VERSION", env)
    monkeypatch.setattr(SETUP, "base_version", lambda: "0.1.0")
    assert SETUP.package_version(SETUP.local_version(built, cuda)) == expected


def test_invalid_local_version_label_is_refused(monkeypatch):
    monkeypatch.setenv("FASTCL_LOCAL_VERSION", "cu12-4/bad")
    with pytest.raises(SystemExit, match="not a PEP 440 local version label"):
        SETUP.local_version(True, "12.4")


def test_build_switch_on_cpu_torch(monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("torch here has CUDA")
    monkeypatch.delenv("FASTCL_BUILD_CUDA", raising=False)
    assert SETUP.cuda_build_wanted() == (False, f"torch {torch.__version__} is a CPU build")
    monkeypatch.setenv("FASTCL_BUILD_CUDA", "0")
    assert SETUP.cuda_build_wanted() == (False, "FASTCL_BUILD_CUDA=0")
    monkeypatch.setenv("FASTCL_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="FASTCL_BUILD_CUDA=1 but the CUDA extension cannot be built: .*CPU build"):
        SETUP.cuda_build_wanted()


def test_serving_extension_switch(monkeypatch):
    assert SETUP.serving_sources() == ["csrc/serving/serving_forward.cpp"]
    monkeypatch.delenv("FASTCL_BUILD_SERVING", raising=False)
    assert SETUP.serving_build_wanted() == (True, "")
    monkeypatch.setenv("FASTCL_BUILD_SERVING", "0")
    assert SETUP.serving_build_wanted() == (False, "FASTCL_BUILD_SERVING=0")
    monkeypatch.setattr(SETUP, "_torch_cpp_missing", lambda: "no torch here")
    monkeypatch.delenv("FASTCL_BUILD_SERVING")
    assert SETUP.serving_build_wanted() == (False, "no torch here")
    monkeypatch.setenv("FASTCL_BUILD_SERVING", "1")
    with pytest.raises(SystemExit, match="FASTCL_BUILD_SERVING=1 but fastcl._serving cannot be built: no torch here"):
        SETUP.serving_build_wanted()


def test_base_version_is_the_package_version():
    import fastcl

    assert SETUP.base_version() == fastcl.__version__


# --- the pure wheel -----------------------------------------------------------------------------

_IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  ".benchmarks", "*.so", "_build_info.py", "out", "*.safetensors")

_SMOKE = textwrap.dedent("""
    import importlib.metadata, importlib.util, json, sys
    import torch
    import fastcl
    from fastcl.evaluate import load_probes, load_text
    from fastcl.ops import lowrank_linear
    x, W, A, B = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    y = lowrank_linear(x, W, None, A, B, torch.zeros(5, 2), 0.5, backend="torch")
    ok = torch.allclose(y, x @ W.t() + 0.5 * (x @ A.t()) @ B.t(), atol=1e-5)
    print(json.dumps({"file": fastcl.__file__, "dist_version": importlib.metadata.version("fastcl"),
                      "info": fastcl.info(), "has_C": importlib.util.find_spec("fastcl._C") is not None,
                      "has_serving": importlib.util.find_spec("fastcl._serving") is not None,
                      "op_ok": ok, "probes": len(load_probes()), "text": len(load_text("general_text.txt"))},
                     default=str))
""")


def test_cpu_wheel_builds_installs_and_reports_why_cuda_is_unavailable(tmp_path):
    """On CPU torch the wheel holds fastcl._serving (the C++ decode closure) but never fastcl._C."""
    if torch.version.cuda is not None:
        pytest.skip("torch here has CUDA: the wheel would include the extension (this check is for CPU torch)")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORED)  # build in a copy: the checkout stays untouched
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTCL_BUILD_CUDA", "FASTCL_BUILD_SERVING", "PIP_REQUIRE_VIRTUALENV")}
    env["FASTCL_LOCAL_VERSION"] = "cpu"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist")],
         "pip wheel", cwd=src, env=env)
    wheels = list((tmp_path / "dist").glob("*.whl"))
    assert len(wheels) == 1 and re.fullmatch(r"fastcl-0\.1\.0\+cpu-cp3\d+-cp3\d+-linux_\w+\.whl", wheels[0].name), \
        f"expected one platform wheel (it holds fastcl._serving), +cpu label: {[w.name for w in wheels]}"

    # A fresh venv without pip (fast); the wheel goes in first, and only then does a .pth lend it
    # the dependencies already installed here (torch, transformers), so pip never sees this
    # environment's editable fastcl.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "venv")
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheels[0])],
         "pip install the wheel", env=env)
    site = subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    Path(site, "_fastcl_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = _run([str(python), "-c", _SMOKE], "import fastcl in the fresh venv", cwd=tmp_path, env=env).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["file"].startswith(str(venv)), f"imported {report['file']}, not the installed wheel"
    assert report["dist_version"] == "0.1.0+cpu"
    assert report["op_ok"]
    assert report["probes"] >= 100 and report["text"] > 1000, "the wheel must ship fastcl/data (probes, texts)"
    assert not report["has_C"], "a CPU build must not ship fastcl._C"
    assert report["has_serving"] and report["info"]["decode_closure"].startswith("C++ (fastcl._serving")
    cuda = report["info"]["backends"]["cuda"]
    assert not cuda["available"]
    assert cuda["reason"] == f"fastcl._C was not built: torch {torch.__version__} is a CPU build"
    build = report["info"]["build"]
    assert build["cuda_extension"] is False and build["version"] == "0.1.0+cpu" and build["torch"] == torch.__version__


def test_backend_cuda_names_why_the_extension_is_missing():
    from fastcl.ops import backends, cuda_backend

    if importlib.util.find_spec("fastcl._C") is not None:
        pytest.skip("fastcl._C is built in this checkout")
    assert cuda_backend.UNAVAILABLE_REASON.startswith("fastcl._C was not built: ")
    available, reason = backends.status("cuda", "cpu")
    assert not available and reason == cuda_backend.UNAVAILABLE_REASON
    with pytest.raises(BackendUnavailable, match="fastcl._C was not built"):
        backends.resolve("cuda", "cpu")
