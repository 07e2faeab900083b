"""Every tuned config of every Triton kernel, alone, against the PyTorch reference, on a GPU.

    python bench/triton_config_sweep.py [--workers 8] [--json sweep.json]
    python bench/triton_config_sweep.py --device cpu --rows 7 40 --dtypes float32   # runs? (interpreter)

tests/test_triton.py's every-config test stops at the first fault, and an illegal address
breaks the CUDA context of its process, so it cannot say which other configs fault too. Here
each (kernel, config, dtype) runs in its own process with CUDA_LAUNCH_BLOCKING=1, over row
counts 7, 133 and 1100 (16-, 64- and 128-row tiles; the dX kernel's
tiles stop at 64 rows, kernels.bwd_block_m) and two shapes that are not multiples of
any block (72 -> 200 and 200 -> 72, r = 16). Only the stage that uses the kernel runs: the
forward for _fwd_prefill / _fwd_decode / _shrink, the backward for _bwd / _grad_b; a kernel
that shares the stage (the forward after _shrink, _grad_b after _bwd) is pinned to its first
config. Prints one row per case: ok, WRONG (largest error relative to the reference's largest
entry) or FAULT (the error text), and a config the GPU cannot fit is "no room"; exits 1 if any
case is wrong or faults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNELS = ["_fwd_prefill", "_fwd_decode", "_shrink", "_bwd", "_grad_b"]
DTYPES = ["float32", "float16", "bfloat16"]
# Relative to the reference's largest entry: inputs are rounded to the dtype first, so what is
# left is accumulation order and the rounding of the outputs.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
SHAPES = [(72, 200), (200, 72)]


def rows_for(kernel: str, rows: list[int]) -> list[int]:
    """The decode kernel takes at most 16 rows, the prefill one more."""
    return [m for m in rows if (m <= 16) == (kernel == "_fwd_decode") or kernel not in ("_fwd_decode", "_fwd_prefill")]


def run_case(kernel: str, index: int, dtype_name: str, device: str, rows: list[int]) -> list[dict]:
    """In the child: every row count and shape for one config; stops at the first fault."""
    import torch
    from triton.runtime.errors import OutOfResources

    from fastcl.kernels import lowrank_linear as k
    from fastcl.ops import reference

    dtype = getattr(torch, dtype_name)
    tuned = getattr(k, kernel)
    tuned.configs = [tuned.configs[index]]
    partner = {"_shrink": "_fwd_prefill", "_bwd": "_grad_b"}.get(kernel)
    if partner:  # the other kernel of the stage: one config, so its autotuning runs nothing else
        getattr(k, partner).configs = [getattr(k, partner).configs[0]]
    results = []
    for M in rows_for(kernel, rows):
        for d_in, d_out in SHAPES:
            g = torch.Generator().manual_seed(M + d_in)
            x = torch.randn(M, d_in, generator=g).to(dtype).to(device)
            W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype).to(device)
            b = torch.randn(d_out, generator=g).to(dtype).to(device)
            A = (torch.randn(16, d_in, generator=g) / d_in**0.5).to(dtype).to(device)
            B = (torch.randn(d_out, 16, generator=g) * 0.1).to(device)
            dy = torch.randn(M, d_out, generator=g).to(dtype).to(device)
            case = dict(kernel=kernel, config=str(tuned.configs[0]), dtype=dtype_name, M=M, shape=f"{d_in}x{d_out}")
            try:
                got, want = {}, {}
                if kernel in ("_fwd_prefill", "_fwd_decode", "_shrink"):
                    got["y"], got["s"] = k.lowrank_linear_fwd(x, W, b, A, B, 0.5,
                                                              shrink="split" if kernel == "_shrink" else "fused")
                    want["y"], want["s"] = reference.lowrank_linear_fwd(x.float(), W.float(), b.float(), A.float(), B, 0.5)
                else:
                    s = reference.lowrank_linear_fwd(x.float(), W.float(), b.float(), A.float(), B, 0.5)[1].to(dtype)
                    got["dB"], want["dB"] = torch.zeros_like(B), torch.zeros_like(B)
                    got["dX"] = k.lowrank_linear_bwd(dy, s, W, A, B, got["dB"], 0.5, kernel == "_bwd")
                    want["dX"] = reference.lowrank_linear_bwd(dy.float(), s.float(), W.float(), A.float(), B,
                                                              want["dB"], 0.5, kernel == "_bwd")
                    if kernel == "_grad_b":
                        del got["dX"], want["dX"]
                if device != "cpu":
                    torch.cuda.synchronize()
            except OutOfResources:
                results.append(dict(case, result="no room"))
                continue
            except Exception as exc:  # an illegal address lands here; the context is gone after it
                results.append(dict(case, result="FAULT", error=str(exc).splitlines()[0][:200]))
                return results
            errors = {name: ((got[name].float() - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-30)).item()
                      for name in got}
            bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype_name]}  # NaN is bad too
            results.append(dict(case, result="WRONG" if bad else "ok", errors=errors))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cpu: the interpreter's one config a kernel, to check "
                        "that the script runs")
    parser.add_argument("--rows", type=int, nargs="+", default=[7, 133, 1100])
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--case", nargs=3, metavar=("KERNEL", "INDEX", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.case[2], args.device, args.rows)))
        return

    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = env["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("triton_config_sweep needs a CUDA GPU (or --device cpu to check that it runs)")
    from fastcl.kernels import lowrank_linear as k

    cases = [(kernel, i, dtype) for kernel in KERNELS for i in range(len(getattr(k, kernel).configs))
             for dtype in args.dtypes]
    common = ["--device", args.device, "--rows", *map(str, args.rows)]

    def child(case):
        done = subprocess.run([sys.executable, __file__, "--case", case[0], str(case[1]), case[2], *common],
                              capture_output=True, text=True, env=env, timeout=300)
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return [dict(kernel=case[0], config=f"#{case[1]}", dtype=case[2], result="FAULT", error=f"rc {done.returncode}: {tail}")]
        return json.loads(lines[-1])

    with ThreadPoolExecutor(args.workers) as pool:
        results = [row for rows in pool.map(child, cases) for row in rows]
    for r in results:
        detail = r.get("error") or " ".join(f"{n} {e:.1e}" for n, e in r.get("errors", {}).items())
        print(f"{r['result']:8s} {r['kernel']:13s} {r['dtype']:8s} M={r.get('M', '-'):<5} {r.get('shape', '-'):7s} "
              f"{r['config']}  {detail}")
    bad = [r for r in results if r["result"] in ("WRONG", "FAULT")]
    print(f"{len(results)} cases, {len(bad)} wrong or faulting")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
