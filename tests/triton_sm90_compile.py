"""Compile every Triton kernel for sm_90 (H100) down to a cubin, without a GPU.

The interpreter runs the kernels' Python, not triton's compiler, so a kernel can pass every
interpreter test and still fail to compile (types that differ between branches, dot shapes the
tensor cores refuse, too much shared memory). triton ships ptxas, so this catches those on a
CPU-only machine. Run by tests/test_triton.py in a subprocess without TRITON_INTERPRET (the
kernels must be imported as compiled functions); exits non-zero naming each kernel that failed.
"""

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the kernels must be imported as compiled functions")

import fastcl.kernels.lowrank_linear as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FP32_POINTERS = {"b_ptr", "gb_ptr"}  # B and its accumulator
SMEM_LIMIT = 227 * 1024  # H100 per-block shared memory


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def compile_for_sm90(fn, dtype, constexprs, num_warps=4, num_stages=3):
    src = ASTSource(fn, signature(fn, dtype, constexprs), constexprs)
    compiled = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    if compiled.metadata.shared > SMEM_LIMIT:
        raise RuntimeError(f"needs {compiled.metadata.shared} B of shared memory (H100: {SMEM_LIMIT})")


# The largest GPU configs of each kernel (they bound shared memory), at the largest R_PAD in the
# benchmark (r = 64), in bf16; and one fp32 case for the IEEE/TF32 dot paths.
CASES = [
    (K._lowrank_linear_fwd_kernel, "bf16", dict(HAS_BIAS=True, FUSE_SHRINK=True, R_PAD=64, PRECISION="ieee",
                                                BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), 8, 3),
    (K._lowrank_linear_fwd_kernel, "bf16", dict(HAS_BIAS=False, FUSE_SHRINK=False, R_PAD=64, PRECISION="ieee",
                                                BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1), 4, 3),
    (K._lowrank_linear_fwd_kernel, "fp32", dict(HAS_BIAS=True, FUSE_SHRINK=True, R_PAD=16, PRECISION="tf32",
                                                BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 4),
    (K._lowrank_shrink_kernel, "bf16", dict(R_PAD=64, PRECISION="ieee", BLOCK_M=128, BLOCK_K=256), 4, 3),
    (K._lowrank_linear_bwd_kernel, "bf16", dict(R_PAD=64, PRECISION="ieee", BLOCK_M=16,
                                                BLOCK_N=128, BLOCK_K=128, GROUP_M=8), 8, 3),
    (K._lowrank_linear_bwd_kernel, "bf16", dict(R_PAD=64, PRECISION="ieee", BLOCK_M=128,
                                                BLOCK_N=128, BLOCK_K=128, GROUP_M=8), 8, 3),
    (K._lowrank_linear_bwd_kernel, "fp32", dict(R_PAD=16, PRECISION="ieee", BLOCK_M=64,
                                                BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4, 4),
    (K._lowrank_grad_b_kernel, "bf16", dict(R_PAD=64, PRECISION="ieee", BLOCK_M=128, BLOCK_N=128), 4, 3),
]


def main() -> int:
    failed = 0
    for fn, dtype, constexprs, warps, stages in CASES:
        label = f"{fn.__name__} {dtype} {constexprs}"
        try:
            compile_for_sm90(fn, dtype, constexprs, warps, stages)
            print(f"ok     {label}")
        except Exception as exc:  # report every kernel, not just the first failure
            failed += 1
            print(f"FAILED {label}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
