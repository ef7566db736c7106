"""BudgetDraft drafter training for the SmolLM2-135M verifier: `--config=configs/budgetdraft_smollm2.py:<variant>`.

Variants (one trainer; they differ only in the sparse branch):
  naive      naive distillation: the full-cache branch alone (num_views = 0);
  single     single-budget sparse training: one view at budget 256 + the full branch;
  multiview  BudgetDraft: 2 views per step with budgets drawn log-uniformly from 128..512, + the
             full branch (the default);
  eagle      the cheap drafter `make run` ships (issue 13): one fresh block fed the verifier's
             hidden states (EAGLE) and a head over the 8192 most frequent training tokens, trained
             with the multi-view recipe + a hidden-state regression, P = C = 512, 4400 steps
             over 2000 cached sequences (~2.2 h on 2 cores, + ~50 min for the teacher cache);
             `--config.self_fed_weight=1.0` adds a pass fed its own hidden states (EAGLE-3's
             training-time test); 1000 such steps on top did not change tokens per call
             (results/eagle_self_fed.md);
  gpu        the multi-view recipe at accelerator scale (4K prompts, 5 budgets, 2000 steps;
             not run yet: no accelerator was lent to this project);
  pruned     the Bonsai 50% verifier (issue 16; run experiments/prune.py first) trained further
             with the multi-view recipe, P = 512, C = 256, teacher on the fly;
  self_naive, self_multiview
             issue 15's family (a): the whole verifier (all 30 blocks) as its own drafter, trained
             naively (full cache only) or with the multi-view recipe over budgets 96-256
             (1/11 to 1/4 of the 1024-token prompts), at a fine-tuning learning rate
             and without gradient through the prompt's prefill. Its full-cache branch starts at
             the teacher, so naive distillation only chases the teacher's top-64 truncation;
             `--config.targets=argmax` trains on the teacher's argmax instead (published);
  self_naive_kl, self_multiview_kl
             the same without the teacher's drift: the teacher is the verifier's whole law on
             the fly and the loss forward KL alone, so the drafter starts at a stationary point
             of the full branch (grad norm 1e-5, against 0.58 with TV's kink); Adam still walks
             it off (20-24 s a multi-view step, 11 s a naive one on 2 cores).
The naive / single / multiview variants fit a 2-core machine in about 15 minutes each and share
one teacher cache; eagle's cache also holds the verifier's hidden states.
The entry point converts this dict into a `training.config.TrainConfig` (typed, validated).
"""

import ml_collections

VARIANTS = ("naive", "single", "multiview", "eagle", "gpu", "pruned", "self_naive",
            "self_multiview", "self_naive_kl", "self_multiview_kl")


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

  config.drafter = "layers"       # "layers": the verifier's first k blocks; "eagle": fresh ones
  config.drafter_layers = 6       # k (+ the verifier's embedding and head, shared)
  config.pruned_from = ""         # drafter "pruned": a directory written by experiments/prune.py
  config.draft_vocab = 0          # > 0: a head over the most frequent training tokens only
  config.feature_weight = 0.0     # eagle: hidden-state regression weight
  config.self_fed_weight = 0.0    # eagle: loss weight of a pass fed its own hidden states
  config.prompt_len = 1024        # compression point P inside each training sequence
  config.continuation = 256       # C positions after P carry the losses
  config.batch_size = 1
  config.steps = 100
  config.num_sequences = 0        # sequences cycled through; 0 = steps x batch_size (one pass)

  config.learning_rate = 3e-4
  config.warmup_steps = 10
  config.weight_decay = 0.0
  config.grad_clip = 1.0
  config.kl_weight = 0.5          # forward-KL share of the divergence (gradient early on)
  config.rejection_weight = 1.0   # expected-rejection (TV) share
  config.targets = "soft"         # "argmax": cross-entropy to the teacher's argmax (published)
  config.prefix_gradient = True   # False: the prompt's keys are prefilled without gradient

  # SparsityConfig fields of the inference selection that builds the views (budgets below).
  config.sparsity = ml_collections.ConfigDict(
      {"policy": "snapkv", "sinks": 4, "window": 64, "recent": 128})
  config.gamma = 4                # views see the last recent + gamma tokens, like the ring
  config.budgets = (128, 256, 512)
  config.num_views = 2
  config.sparse_weight = 1.0      # lambda

  config.teacher = ml_collections.ConfigDict()
  config.teacher.top_k = 64       # 0 = the verifier's whole law (on the fly only)
  config.teacher.cache_dir = "checkpoints/teacher_smollm2_p1024_c256"  # "" = on the fly

  config.log_every = 10
  config.checkpoint_every = 20
  config.allow_config_change = False  # resume a workdir under a changed recipe (logged)
  config.mesh = ""                # "data=4,model=2"; "" = every device on data (if several)

  if variant == "naive":
    config.num_views = 0
  elif variant.startswith("self_"):
    config.drafter_layers = 30    # SmolLM2-135M's every block: the verifier drafting for itself
    config.budgets = (96, 128, 192, 256)  # 1/11 to 1/4 of P (64 = P/16 < sinks + window)
    config.learning_rate = 3e-5
    config.prefix_gradient = False
    if variant.startswith("self_naive"):
      config.num_views = 0
    if variant.endswith("_kl"):
      config.kl_weight, config.rejection_weight = 1.0, 0.0
      config.teacher.top_k = 0  # the whole law, on the fly
      config.teacher.cache_dir = ""
  elif variant == "single":
    config.budgets = (256,)
    config.num_views = 1
  elif variant == "eagle":
    config.drafter = "eagle"
    config.drafter_layers = 1
    config.draft_vocab = 8192
    config.feature_weight = 1.0
    config.prompt_len = 512
    config.continuation = 512
    config.budgets = (128, 256)
    config.steps = 4400           # 2400 steps over 1000 sequences, then extended to 4400 over
    config.num_sequences = 2000   # 2000 (see drafters/smollm2-eagle/README.md)
    config.learning_rate = 1e-3
    config.warmup_steps = 50
    config.teacher.cache_dir = "checkpoints/teacher_smollm2_eagle_p512_c512"
    config.checkpoint_every = 50
  elif variant == "pruned":
    config.drafter = "pruned"
    config.pruned_from = "checkpoints/pruned_smollm2/bonsai-50"
    config.prompt_len = 512
    config.budgets = (128, 256)
    config.steps = 150
    config.teacher.cache_dir = ""
    config.checkpoint_every = 25
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
