"""Acceptance vs KV budget: `--config=configs/acceptance_vs_budget.py:<variant>`.

Variants:
  smollm2  the drafters trained by `make drafters` (naive, single-budget, BudgetDraft) and the
           untrained 6-layer cut, against SmolLM2-135M at 4K and 8K (~10 min on a 2-core CPU);
  paper    BudgetDraft's published protocol (issue 19) for the drafters of
           configs/budgetdraft_paper.py (train them first): greedy, 256 new tokens, gamma 5,
           9 prompts of 3800 tokens and of 7931 (SmolLM2's 8192 positions less 256 + 5), TriForce
           chunk retrieval at budgets 256-2048 with no eviction of generated tokens;
  self     issue 15's family (a) before training: the verifier drafting for itself over
           streaming, SnapKV and H2O caches of 128-2048 keys (and its full cache), 8 held-out
           long_books prompts at 4K and 8K (~1 h on 2 cores, ~4 min a prompt at 8K; one context:
           --config.contexts="(4096,)");
  eagle    issue 15's family (b): the shipped EAGLE drafter (drafters/smollm2-eagle, trained with
           the BudgetDraft recipe on 512-token prompts) on the `self` grid, measured by the
           greedy engine itself (4K: 20 min on 2 cores beside another run);
  self_trained
           issue 15's family (a) trained: the verifier drafting for itself untrained, naively
           trained and BudgetDraft-trained, on the top-64 teacher with TV + KL
           (configs/budgetdraft_smollm2.py:self_naive, :self_multiview) and on the whole law
           with KL alone (:self_naive_kl, :self_multiview_kl; train them first), on the `self`
           grid, with paired gap tables (4K: ~6 min a drafter on 2 cores; `--config.task=copy`
           for the copy task);
  passkey, kv_retrieval, copy
           families (a) and (b) side by side on the `long_retrieval` task of that name (issue
           15: the answer is in distant context only), 8 prompts over depths 0.1-0.9 (copy:
           50 min on 2 cores, 100 s a prompt at 4K, 230-260 s at 8K).
Drafters are `drafters.load` sources with a label for the table. Results go to
results/acceptance_vs_budget (smollm2) or results/acceptance_vs_budget_<variant>.
"""

import ml_collections

RETRIEVAL_TASKS = ("passkey", "kv_retrieval", "copy")  # budgetdraft.data.long_retrieval.TASKS


def get_config(variant: str = "smollm2") -> ml_collections.ConfigDict:
  families = ("self", "self_trained", "eagle")
  if variant not in ("smollm2", "paper") + families + RETRIEVAL_TASKS:
    raise ValueError(f"unknown variant {variant!r}; valid: smollm2, paper, "
                     f"{', '.join(families + RETRIEVAL_TASKS)}")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""           # verifier; "" = the embedded SmolLM2-135M-Instruct GGUF
  config.mesh = ""                 # "data=4,model=2" (parallel.make_mesh); "" = all on data
  config.dataset = "long_books"
  config.task = ""                 # "" = continuations of `dataset`; else a long_retrieval task
  config.data_dir = "data"
  config.split = "validation"
  config.contexts = (4096, 8192)   # prompt + new tokens
  config.num_prompts = 2
  config.max_new_tokens = 64
  config.gamma = 4
  config.prefill_chunk = 512
  config.budgets = (128, 256, 512, 1024, 2048)  # plus the full cache
  config.policies = ("snapkv",)    # each at every budget
  config.sparsity = ml_collections.ConfigDict(     # SparsityConfig fields but policy and budget
      {"sinks": 4, "window": 64, "recent": 128})
  config.compare = ()               # (drafter, baseline) label pairs: a paired gap table
  trained = "trained:checkpoints/budgetdraft_smollm2_"
  config.drafters = (("untrained cut", "layers:6"), ("naive", trained + "naive"),
                     ("single-budget", trained + "single"), ("BudgetDraft", trained + "multiview"))
  if variant in RETRIEVAL_TASKS + families:
    # Issue 15's family (a), untrained: the verifier drafting for itself (accepted fully over its
    # full cache, so every lost token is the sparse cache's); family (b): the shipped drafter.
    config.task = variant if variant in RETRIEVAL_TASKS else ""
    config.contexts = (4096, 8192)
    config.num_prompts = 8
    config.policies = ("streaming", "snapkv", "h2o")
    config.budgets = (128, 256, 512, 1024, 2048)
    family_a, family_b = ("self", "self"), ("EAGLE", "trained:drafters/smollm2-eagle")
    trained_a = (("self naive", trained + "self_naive"),
                 ("self BudgetDraft", trained + "self_multiview"),
                 ("self naive KL", trained + "self_naive_kl"),
                 ("self BudgetDraft KL", trained + "self_multiview_kl"))
    config.drafters = {"self": (family_a,), "self_trained": (family_a,) + trained_a,
                       "eagle": (family_b,)}.get(variant, (family_a, family_b))
    if variant == "self_trained":
      config.compare = tuple(pair for kl in ("", " KL") for pair in (
          (f"self BudgetDraft{kl}", f"self naive{kl}"), (f"self BudgetDraft{kl}", "self"),
          (f"self naive{kl}", "self")))
  if variant == "paper":
    config.contexts = (3800 + 256 + 5, 8192)  # prompt = context - new tokens - gamma
    config.num_prompts = 9
    config.max_new_tokens = 256
    config.gamma = 5
    config.budgets = (256, 512, 1024, 2048)
    config.policies = ("chunk_retrieval",)
    config.sparsity = ml_collections.ConfigDict(
        {"chunk": 8, "sinks": 0, "window": 0, "recent": 256})
    paper = "trained:checkpoints/budgetdraft_paper_"
    config.drafters = (("untrained cut", "layers:6"), ("L_A only", paper + "la_only"),
                       ("BudgetDraft", paper + "paper"), ("L_A + 1.0 L_C", paper + "w1"),
                       ("fixed budget 1024", paper + "fixed1024"))
  return config
