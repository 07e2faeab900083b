"""fastcl.info(): version, build metadata, and which backends run here and why others do not."""

from __future__ import annotations

import platform

import torch

from ._version import __version__
from .ops import backends
from .precision import cpu_has_native_bf16


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
