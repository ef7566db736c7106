"""Acceptance vs KV budget: `--config=configs/acceptance_vs_budget.py:<variant>`.

Variants:
  smollm2  the drafters trained by `make drafters` (naive, single-budget, BudgetDraft) and the
           untrained 6-layer cut, against SmolLM2-135M at 4K and 8K (~10 min on a 2-core CPU).
Drafters are `drafters.load` sources with a label for the table.
"""

import ml_collections


def get_config(variant: str = "smollm2") -> ml_collections.ConfigDict:
  if variant != "smollm2":
    raise ValueError(f"unknown variant {variant!r}; valid: smollm2")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""           # verifier; "" = the embedded SmolLM2-135M-Instruct GGUF
  config.dataset = "long_books"
  config.data_dir = "data"
  config.split = "validation"
  config.contexts = (4096, 8192)   # prompt + new tokens
  config.num_prompts = 2
  config.max_new_tokens = 64
  config.gamma = 4
  config.prefill_chunk = 512
  config.budgets = (128, 256, 512, 1024, 2048)  # plus the full cache
  config.sparsity = ml_collections.ConfigDict(     # SparsityConfig fields but the budget
      {"policy": "snapkv", "sinks": 4, "window": 64, "recent": 128})
  trained = "trained:checkpoints/budgetdraft_smollm2_"
  config.drafters = (("untrained cut", "layers:6"), ("naive", trained + "naive"),
                     ("single-budget", trained + "single"), ("BudgetDraft", trained + "multiview"))
  return config
