import pytest

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
