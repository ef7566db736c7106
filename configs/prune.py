"""Bonsai pruning of the verifier into drafters: `--config=configs/prune.py:<variant>`.

Variants:
  smollm2  SmolLM2-135M pruned by Bonsai to 50%, 30% and 15% of its decoder parameters (one
           iterative run), the one-shot activation-magnitude baseline and a layer cut of each
           size; then perplexity on held-out books, tokens per verifier call at 4K (greedy, gamma
           4, full cache and SnapKV 256) and draft step ms (~25 min on a 2-core CPU);
  smollm2_trained
           smollm2 plus a row for the Bonsai 50% model trained further by BudgetDraft (train it
           first: experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:pruned);
  quick    the same at smoke-test scale (one target, few masks, short prompts) for a look.
`--config.drafters=<source>,...` adds rows for any drafters (drafters.py sources) that run on
tokens alone. Pruned models go to <workdir>/<method>-<percent> (`drafters.load("pruned:<dir>")`);
a rerun reuses those already there. The table goes to results/bonsai_<variant>.
"""

import ml_collections

VARIANTS = ("smollm2", "smollm2_trained", "quick")


def get_config(variant: str = "smollm2") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid: {VARIANTS}")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""            # verifier; "" = the embedded SmolLM2-135M-Instruct GGUF
  config.mesh = ""                 # "data=4,model=2" (parallel.make_mesh); "" = all on data
  config.dataset = "long_books"
  config.data_dir = "data"
  config.workdir = f"checkpoints/pruned_{'quick' if variant == 'quick' else 'smollm2'}"
  config.targets = (0.5, 0.3, 0.15)  # kept fractions of the decoder's parameters
  config.channel_group = 128        # MLP channels per unit (SmolLM2: 12 units per layer)
  config.calibration_sequences = 2  # train-split sequences scoring every sub-model
  config.calibration_length = 257   # tokens each (T - 1 a multiple of 512 when longer)
  config.bonsai = ml_collections.ConfigDict({  # BonsaiConfig fields but the targets
      "max_step": 0.05, "masks_per_step": 32, "layer_rate": 0.25, "ridge": 1.0, "seed": 0})
  # Measurement.
  config.contexts = (4096,)         # prompt + new tokens
  config.num_prompts = 4
  config.max_new_tokens = 64
  config.gamma = 4
  config.prefill_chunk = 512
  config.budgets = (256,)           # plus the full cache
  config.sparsity = ml_collections.ConfigDict(
      {"policy": "snapkv", "sinks": 4, "window": 64, "recent": 128})
  config.drafters = ""              # more rows: comma-separated drafter sources (drafters.py),
                                    # e.g. trained:checkpoints/budgetdraft_smollm2_pruned
  config.held_out_sequences = 4     # validation-split sequences for perplexity
  config.held_out_length = 1025
  if variant == "smollm2_trained":
    config.drafters = "trained:checkpoints/budgetdraft_smollm2_pruned"
  if variant == "quick":
    config.targets = (0.5,)
    config.bonsai.masks_per_step = 8
    config.bonsai.max_step = 0.5
    config.contexts = (1024,)
    config.num_prompts = 1
    config.held_out_sequences = 1
    config.held_out_length = 513
  return config
