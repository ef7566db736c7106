"""BudgetDraft drafter training for the SmolLM2-135M verifier: `--config=configs/budgetdraft_smollm2.py:<variant>`.

Variants (one trainer; they differ only in the sparse branch):
  naive      naive distillation: the full-cache branch alone (num_views = 0);
  single     single-budget sparse training: one view at budget 256 + the full branch;
  multiview  BudgetDraft: 2 views per step with budgets drawn log-uniformly from 128..512, + the
             full branch (the default);
  gpu        the multi-view recipe at accelerator scale (4K prompts, 5 budgets, 2000 steps;
             not run yet: no accelerator was lent to this project).
The CPU variants fit a 2-core machine in about 15 minutes each and share one teacher cache.
The entry point converts this dict into a `training.config.TrainConfig` (typed, validated).
"""

import ml_collections

VARIANTS = ("naive", "single", "multiview", "gpu")


def get_config(variant: str = "multiview") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid: {VARIANTS}")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""          # verifier; "" = the embedded SmolLM2-135M-Instruct GGUF
  config.dataset = "long_books"
  config.data_dir = "data"
  config.split = "train"
  config.workdir = f"checkpoints/budgetdraft_smollm2_{variant}"
  config.seed = 0

  config.drafter_layers = 6       # drafter = the verifier's first k layers (+ shared embed / head)
  config.prompt_len = 1024        # compression point P inside each training sequence
  config.continuation = 256       # C positions after P carry the losses
  config.batch_size = 1
  config.steps = 100

  config.learning_rate = 3e-4
  config.warmup_steps = 10
  config.weight_decay = 0.0
  config.grad_clip = 1.0
  config.kl_weight = 0.5          # forward-KL share of the divergence (gradient early on)

  # SparsityConfig fields of the inference selection that builds the views (budgets below).
  config.sparsity = ml_collections.ConfigDict(
      {"policy": "snapkv", "sinks": 4, "window": 64, "recent": 128})
  config.gamma = 4                # views see the last recent + gamma tokens, like the ring
  config.budgets = (128, 256, 512)
  config.num_views = 2
  config.sparse_weight = 1.0      # lambda

  config.teacher = ml_collections.ConfigDict()
  config.teacher.top_k = 64
  config.teacher.cache_dir = "checkpoints/teacher_smollm2_p1024_c256"  # "" = on the fly

  config.log_every = 10
  config.checkpoint_every = 20

  if variant == "naive":
    config.num_views = 0
  elif variant == "single":
    config.budgets = (256,)
    config.num_views = 1
  elif variant == "gpu":
    config.prompt_len = 4096
    config.continuation = 512
    config.batch_size = 2          # dense masked attention: memory grows with prompt_len^2
    config.steps = 2000
    config.budgets = (128, 256, 512, 1024, 2048)
    config.teacher.cache_dir = ""
    config.log_every = 20
    config.checkpoint_every = 200
  return config
