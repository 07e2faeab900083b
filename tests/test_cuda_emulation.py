"""The CUDA kernels, run on the CPU: csrc/lowrank_linear_kernels.cuh compiled with g++ against
the emulation in tests/cuda_emu/include (one fiber per CUDA thread, a WMMA stand-in that checks
alignment and warp-uniform use), through the same plan the GPU launcher uses, and compared
with a float64 reference over odd shapes, every dtype, ranks 1 to 64, bias or not, both weight
layouts, with and without dX. AddressSanitizer and UBSan make any out-of-bounds access or
misaligned vector load fail the run.

This checks the kernels' logic without a GPU. It cannot see timing, the GPU memory model or
the real tensor cores: tests/test_cuda_backend.py does that on a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler (c++/g++) on PATH: the kernel emulation needs one (CI has g++)")
    binary = tmp_path_factory.mktemp("cuda_emu") / "check_kernels"
    cmd = [cxx, "-std=c++20", "-O2", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-Wall", "-Wno-unknown-pragmas", "-Werror", f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc'}",
           str(EMU / "check_kernels.cpp"), "-o", str(binary)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"compiling the emulation failed:\n$ {' '.join(cmd)}\n{proc.stderr[-6000:]}"
    return binary


def test_kernels_match_the_float64_reference_under_emulation(checker):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([str(checker)], capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"kernel emulation failed (exit {proc.returncode}):\n{output[-8000:]}"
    summary = re.search(r"(\d+) cases, 0 failures", output)
    assert summary and int(summary.group(1)) >= 150, f"the sweep did not run in full:\n{output[-2000:]}"
