"""Wall-clock seconds of work that may be queued on a GPU."""

from __future__ import annotations

import time

import torch


def seconds_since(start: float, device: torch.device) -> float:
    """time.perf_counter() - start once `device` has run what was queued on it: without the wait,
    kernels launched by one part would be charged to whichever part next reads a result. A CPU
    has finished every op when it returns, so there it is the plain difference."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
