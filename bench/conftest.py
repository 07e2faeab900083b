"""Settings shared by every benchmark in bench/: threads, and the machine description in the JSON.

FASTCL_BENCH_THREADS=N sets torch's intra-op threads for the whole run. On a machine that other
work is loading, use 1: OpenMP's spinning barriers make N threads on N busy cores many times
slower, and the ratios that the report prints would then measure the neighbours.
"""

from __future__ import annotations

import os

# Nothing in a benchmark may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from fastcl.info import cpu_model  # noqa: E402
from fastcl.precision import cpu_has_native_bf16  # noqa: E402

if os.environ.get("FASTCL_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTCL_BENCH_THREADS"]))

_LOAD_AT_START = os.getloadavg()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastcl"] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),  # backward_dtype="auto" runs dX in bf16 only where True
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # 1, 5 and 15 minute load averages when the run started and when it ended: other work on
        # the machine skews absolute times (ratios measured side by side suffer less).
        "loadavg_start": list(_LOAD_AT_START),
        "loadavg_end": list(os.getloadavg()),
    }
