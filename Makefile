# imm-ray: set-up, demo, tests, benchmarks, local cluster.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imm-installed
RUN_DIR ?= runs/demo
CONFIG ?= jobs/configs/demo.yaml
PYTEST_ARGS ?=
CLUSTER_WORKERS ?= 0

# Data: data.dir, else $IMM_DATA_DIR when set, else the sets bundled with the package, else the
# hub (the embedded model and the bundled sets need no network; tests run offline on their own).
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo docs lint test test-quick bench bench-merge bench-serve bench-sft bench-generate gpu-smoke compare study cluster-up cluster-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(PY) -m jobs.imm_run --config $(CONFIG) --run-dir $(RUN_DIR)

compare: setup
	$(PY) -m jobs.imm_run --config jobs/configs/compare-cpu.yaml --run-dir $(if $(filter command line,$(origin RUN_DIR)),$(RUN_DIR),runs/compare-cpu)

# The powered study (jobs/configs/study-cpu.yaml says what and how long): per seed a run of si, rest and
# imm (fixed λ) and a run of imm with merge.select frontier, then the layer analysis across seeds and
# the reports. Each run resumes where it stopped; STUDY_SEEDS=0 runs one seed.
STUDY_SEEDS ?= 0 1
STUDY_DIR = $(if $(filter command line,$(origin RUN_DIR)),$(RUN_DIR),runs/study-cpu)
STUDY_RUN = $(PY) -m jobs.imm_run --config jobs/configs/study-cpu.yaml

study: setup
	set -e; for s in $(STUDY_SEEDS); do \
	  seeds="generate.seed=$$s train.seed=$$s merge.seed=$$s"; \
	  $(STUDY_RUN) --run-dir $(STUDY_DIR)/fixed/seed-$$s $$seeds run.name=study-cpu-fixed-seed-$$s; \
	  $(STUDY_RUN) --run-dir $(STUDY_DIR)/frontier/seed-$$s $$seeds run.name=study-cpu-frontier-seed-$$s \
	    'run.arms=[imm]' merge.select=frontier; \
	done; \
	for group in fixed frontier; do \
	  $(PY) -m imm_ray.cli analyze --combine $(foreach s,$(STUDY_SEEDS),$(STUDY_DIR)/$$group/seed-$(s)); \
	  for s in $(STUDY_SEEDS); do $(PY) -m imm_ray.cli report --run-dir $(STUDY_DIR)/$$group/seed-$$s; done; \
	done

# docs/config.md: every config key with its type, default and meaning, from the pydantic models.
docs: setup
	$(PY) -m imm_ray.cli config show --markdown > docs/config.md

lint: setup
	$(VENV)/bin/ruff check .

# --durations: the slowest tests in every CI log, so that whoever trims CI time sees where it goes.
test: setup lint
	$(PY) -m pytest tests --durations=30 $(PYTEST_ARGS)

test-quick: setup lint
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: bench-merge bench-serve

bench-merge: setup
	$(PY) tests/bench/bench_merge.py

bench-serve: setup
	$(PY) tests/bench/bench_serve_hotswap.py

# SFT stage: fixed overhead, packed vs padded tokens/s, and each rank's peak RSS with ddp and fsdp
# against imm plan's estimate (BENCH_SFT_ARGS="--large 128" is quicker, "--memory-only" just the latter).
bench-sft: setup
	$(PY) tests/bench/bench_sft.py $(BENCH_SFT_ARGS)

# The GPU path on one NVIDIA GPU in minutes (says so and exits 0 without a GPU): cluster/README.md.
gpu-smoke: setup
	PY=$(PY) bash scripts/gpu_smoke.sh

# Generation/evaluation tokens/s: raw vLLM, the pool, ray.data.llm, hf (smaller:
# BENCH_GENERATE_ARGS="--prompts 32 --max-tokens 128 --eval-prompts 64 --skip hf").
bench-generate: setup
	$(PY) tests/bench/bench_generate.py $(BENCH_GENERATE_ARGS)

# A Ray cluster on 127.0.0.1: the head and CLUSTER_WORKERS worker nodes (see cluster/README.md).
cluster-up: setup
	bash cluster/local/up.sh $(CLUSTER_WORKERS)

cluster-down:
	bash cluster/local/down.sh

clean:
	rm -rf $(VENV) .pytest_cache
