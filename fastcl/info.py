"""fastcl.info(): version, build metadata, and which backends run here and why others do not."""

from __future__ import annotations

import platform
from typing import Optional

import torch

from ._version import __version__
from .ops import backends
from .precision import cpu_has_native_bf16, input_gradient_dtype


def build_info() -> dict:
    """What the package was built with, written by setup.py; empty for a source checkout."""
    try:
        from . import _build_info
    except ImportError:
        return {}
    return dict(_build_info.BUILD_INFO)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or platform's answer where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def serving_closure() -> str:
    """Which decode closure the torch backend serves live fast weights with, and why."""
    from .ops import reference

    if reference.compiled_serving_forward is not None:
        # fp32 CPU decode (up to max_fused_rows rows) runs the adapter as one loop; the rest ATen.
        return f"C++ (fastcl._serving; fused adapter loop for <= {reference.max_fused_rows} fp32 CPU rows)"
    why = build_info().get("serving_extension_reason") or "fastcl._serving did not build or import"
    return f"Python ({why})"


def machine(device: str = "cpu", backward_dtype: Optional[str] = "auto", dtype: torch.dtype = torch.float32) -> dict:
    """Where a run happened, with the two things that change its numbers between CPUs: the vector
    ISA ATen and fastcl._serving's decode dispatch to (different sums, so different greedy answers
    at near-ties), and what `backward_dtype` resolves to here (bf16 input gradients only on CPUs
    with native bf16), which changes what is learned. Benchmarks record it beside their results."""
    device_type = torch.device(device).type
    low = input_gradient_dtype(backward_dtype, dtype, device_type)
    cpu = device_type == "cpu"
    return {
        "device": cpu_model() if cpu else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "input_gradients": str(low or dtype).replace("torch.", ""),
    }


def describe_machine(m: dict) -> str:
    """machine()'s dict as one line for a benchmark's header."""
    return (f"{m['device']} (CPU {m['cpu_capability']}, native bf16 {'yes' if m['cpu_native_bf16'] else 'no'}), "
            f"{m['threads']} threads, input gradients in {m['input_gradients']}")


def machine_differences(ours: Optional[dict], theirs: Optional[dict]) -> list[str]:
    """What differs between two machine() records that changes results ("key: ours != theirs"),
    or why they cannot be compared (a record missing): empty when two runs are comparable."""
    if not ours or not theirs:
        return ["machine not recorded for " + " and ".join(n for n, m in (("ours", ours), ("theirs", theirs)) if not m)]
    keys = ("device", "cpu_capability", "cpu_native_bf16", "input_gradients", "threads")
    return [f"{k}: {ours.get(k)!r} != {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def info() -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {}
    for name in backends.BACKENDS:
        ok, reason = backends.status(name, device)
        report[name] = {"available": ok, "reason": reason}
    return {
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "auto_backend": backends.resolve("auto", device),
        "cpu_native_bf16": cpu_has_native_bf16(),  # backward_dtype="auto" runs input gradients in bf16 (fp32 models)
        "backends": report,
        "decode_closure": serving_closure(),
        "build": build_info(),
    }
