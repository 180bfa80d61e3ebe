# hf_specvol: `make run` (the main job) and `make test` (the test suite), from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch: the CPU wheel pinned here on machines without an NVIDIA driver; otherwise pip's default build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")

.PHONY: setup run test test-all bench lint clean study study-quick

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup  ## the main job: train_majority.py with its defaults (~30 s of training on 2 CPU cores, after a ~2 min first install)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/train_majority.py $(ARGS)

test: setup  ## the fast test suite (CI)
	$(PY) -m pytest -q

test-all: setup  ## fast and slow tests
	$(PY) -m pytest -q -m "slow or not slow"

study: setup  ## the study (recipes/configs/study_default.yaml; ~35-60 min on 2 CPU cores, resumable)
	$(PY) recipes/run_study.py --config recipes/configs/study_default.yaml $(ARGS)

study-quick: setup  ## smoke test of the study machinery (~1 min)
	$(PY) recipes/run_study.py --config recipes/configs/study_quick.yaml $(ARGS)

bench: setup  ## timing / memory benchmarks, not part of CI (docs/benchmarks.md); e.g. ARGS="--quick --threads 1"
	$(PY) benchmarks/run_all.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check hf_specvol data_builders recipes tests benchmarks

clean:
	rm -rf $(VENV) outputs *.egg-info
