import pytest
import torch

import fastcl
from fastcl.ops import backends


def test_info_reports_version_and_backends():
    info = fastcl.info()
    assert info["version"] == fastcl.__version__
    assert set(info["backends"]) == {"torch", "triton", "cuda"}
    assert info["backends"]["torch"]["available"]
    assert info["decode_closure"].startswith(("C++", "Python ("))
    for name, entry in info["backends"].items():
        assert entry["available"] or entry["reason"], f"{name} unavailable without a reason"


def test_auto_picks_torch_on_cpu():
    assert backends.resolve("auto", "cpu") == "torch"


def test_fastcl_backend_environment_variable(monkeypatch):
    import pytest

    from helpers import tiny_model

    monkeypatch.setenv("FASTCL_BACKEND", "torch")
    learner = fastcl.patch(tiny_model("llama"), rank=2)
    assert learner.config.backend == "torch"
    monkeypatch.setenv("FASTCL_BACKEND", "cuda")
    with pytest.raises(fastcl.BackendUnavailable, match="cuda"):
        fastcl.patch(tiny_model("llama"), rank=2)


def test_demo_command_passes_its_options(monkeypatch, capsys):
    """`fastcl demo` hands its flags to run_demo (the demo itself runs in test_demo.py); an unknown
    domain stops at the command line."""
    import fastcl.demo
    from fastcl import cli

    calls = []
    monkeypatch.setattr(fastcl.demo, "run_demo", lambda **kwargs: calls.append(kwargs) or 0)
    assert cli.main(["demo", "--domain", "people", "--companies", "3", "--seed", "2", "--out", "p.png"]) == 0
    assert cli.main(["demo"]) == 0
    assert calls == [{"seed": 2, "companies": 3, "out": "p.png", "domain": "people"},
                     {"seed": 0, "companies": 6, "out": "fastcl-demo.png", "domain": "companies"}]
    with pytest.raises(SystemExit):
        cli.main(["demo", "--domain", "pets"])
    assert "invalid choice: 'pets'" in capsys.readouterr().err


def test_machine_names_what_changes_a_runs_numbers():
    from fastcl.info import describe_machine, machine, machine_differences
    from fastcl.precision import cpu_has_native_bf16

    here = machine("cpu", "auto")
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert here["input_gradients"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert machine("cpu", "bfloat16")["input_gradients"] == "bfloat16"
    assert machine("cpu", None)["input_gradients"] == "float32"
    assert machine("cpu", "auto", torch.bfloat16)["input_gradients"] == "bfloat16"  # already bf16: unchanged
    assert "input gradients in float32" in describe_machine(machine("cpu", None))
    assert machine_differences(here, dict(here)) == []
    flipped = "float32" if here["input_gradients"] == "bfloat16" else "bfloat16"
    other = {**here, "cpu_capability": "ANOTHER", "input_gradients": flipped}
    assert machine_differences(here, other) == [f"cpu_capability: {here['cpu_capability']!r} != 'ANOTHER'",
                                                f"input_gradients: {here['input_gradients']!r} != {flipped!r}"]
    assert machine_differences(None, here) == ["machine not recorded for ours"]
