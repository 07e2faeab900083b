"""Benchmark scripts that CI cannot run for real (they need a GPU) still run here, at toy sizes,
so that they do not rot between the sessions that are lent one."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_end_to_end_runs_on_the_cpu_at_toy_sizes(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_end_to_end.py"), "--device", "cpu", "--batch", "1", "--seq", "8",
         "--new-tokens", "2", "--warmup", "0", "--repeat", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["ms"]) >= {"forward", "observe[torch]", "step[torch]", "peft_step"}
    # step[...] is a difference of two timings (observe+step minus observe): it can be noise.
    assert all(result["ms"][k] > 0 for k in ("forward", "observe[torch]", "peft_step"))
    assert set(result["generate_tokens_per_s"]) == {"unpatched", "live_adapter[torch]", "consolidated"}
    assert "| observe[torch] |" in proc.stdout


def test_profile_observe_runs_with_random_weights_at_toy_sizes():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_observe.py"), "--random-weights", "--batch", "1", "--seq", "8",
         "--rows", "3"], capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for phase in ("no-grad forward", "forward with grad", "loss gradient", "backward"):
        assert phase in proc.stdout and f"floor: {phase}" in proc.stdout
    assert "extra cost of learning, observe()" in proc.stdout and "extra cost of learning, floor" in proc.stdout
    assert "observe() under the profiler" in proc.stdout and "aten::mm" in proc.stdout
