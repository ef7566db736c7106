"""Speedup experiment configs: `--config=configs/speedup.py:<variant>`.

Variants:
  default  what `make run` runs: 4K context, 256 new tokens, the shipped EAGLE-style drafter
           (drafters/smollm2-eagle) at two KV budgets and with a full cache, greedy and at
           temperature 1, beside self-drafting and a layer cut (< 10 min on a 2-core CPU);
  full     4K and 8K, every policy at budgets 256-2048, every verification rule (hours on CPU).
  trained  the drafters trained by experiments/train_drafter.py (run those first) at 4K;
  pruned   the Bonsai 50% drafter trained by configs/budgetdraft_smollm2.py:pruned (run it first)
           beside the shipped drafter, as `default` measures them (~6 min);
  paper    BudgetDraft's published protocol (issue 19): greedy, 256 new tokens, 9 prompts (the
           paper's 10 less its warm-up; compilation here is ahead of time and never timed),
           TriForce chunk retrieval at budgets 256-2048 with no eviction of generated tokens, a
           context-blind control (4 sinks + the last 64 prompt tokens) and the full-cache drafter,
           over the gamma grid {3, 5, 10, 15, 30, 65}; gamma 5 is the primary row and a secondary
           table takes the best gamma per setting. Prompts of 3800 tokens (the paper's "4K") and
           7870 (SmolLM2's 8192 positions less 256 new tokens and a 65-token draft; the paper's
           8192 and 16384 need a longer-context --config.checkpoint and --config.contexts).
           Hours on a 2-core CPU;
  paper_quick  the same protocol at 2-core scale: 3 prompts per context (3800 tokens, and
           7930 = 8192 less 256 new tokens and a 6-token draft), gamma in {3, 5} (~50 min);
  long16k  16K contexts on a user's longer-context checkpoint (Llama-3.x / Qwen2.x safetensors or
           GGUF with their rope scaling): --config.checkpoint=/models/Llama-3.2-1B-Instruct.
           Self-drafting over SnapKV and a 4-layer cut. SmolLM2 (8192 positions) is refused.
A row's drafter is a `drafters.load` source: `layers:<k>`, `self`, `trained:<workdir>` or
`checkpoint:<path>`; policy None = the drafter keeps a full cache; temperature and gamma None
= the config's.
"""

import ml_collections


SHIPPED = "trained:drafters/smollm2-eagle"  # the drafter committed with the repository


def _row(drafter, policy=None, budget=None, rule="block", num_paths=1, temperature=None,
         gamma=None, **sparsity):
  """One table row; `sparsity` overrides the config's shared SparsityConfig fields."""
  return {"drafter": drafter, "policy": policy, "budget": budget, "rule": rule,
          "num_paths": num_paths, "temperature": temperature, "gamma": gamma,
          "sparsity": sparsity}


PAPER_GAMMAS = (3, 5, 10, 15, 30, 65)


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""        # "" = the embedded SmolLM2-135M-Instruct GGUF
  config.dataset = "long_books"
  config.data_dir = "data"
  config.split = "validation"
  config.num_prompts = 1
  config.max_new_tokens = 64
  config.gamma = 4
  config.temperature = 0.0
  config.prefill_chunk = 512
  config.mesh = ""              # "data=4,model=2" (parallel.make_mesh); "" = every device on
                                # data when there are several, else none
  # SparsityConfig fields shared by every row (a row sets the policy and the budget).
  config.sparsity = ml_collections.ConfigDict({"sinks": 4, "window": 64, "recent": 128})
  if variant == "default":
    config.contexts = (4096,)
    config.max_new_tokens = 256
    config.gamma = 3              # the shipped drafter's chains rarely pass 3 accepted tokens
    config.rows = [
        _row(SHIPPED, "snapkv", 256),
        _row(SHIPPED, "snapkv", 512),
        _row(SHIPPED),
        _row(SHIPPED, "snapkv", 256, gamma=2),
        _row(SHIPPED, "snapkv", 256, temperature=1.0),
        _row("self", "snapkv", 512),
        _row("layers:8", "snapkv", 512),
    ]
  elif variant == "full":
    config.contexts = (4096, 8192)
    config.num_prompts = 4
    rows = [_row("layers:8"), _row("self")]
    for drafter in ("layers:8", "self"):
      for policy in ("streaming", "snapkv", "h2o", "lookahead", "random"):
        rows += [_row(drafter, policy, budget) for budget in (256, 512, 1024, 2048)]
      rows += [_row(drafter, "snapkv", 1024, rule=rule)
               for rule in ("tokenwise", "greedy")]
      rows += [_row(drafter, "snapkv", 1024, rule=rule, num_paths=paths)
               for rule in ("specinfer", "gbv") for paths in (2, 4)]
    config.rows = rows
  elif variant == "trained":
    config.contexts = (4096,)
    trained = lambda name: f"trained:checkpoints/budgetdraft_smollm2_{name}"
    config.rows = [_row("layers:6", "snapkv", 256)]
    config.rows += [_row(trained(name), "snapkv", 256) for name in ("naive", "single", "multiview")]
    config.rows += [_row(trained("multiview"), "snapkv", budget) for budget in (128, 1024)]
    config.rows += [_row(trained("multiview"))]
    config.rows += [_row(trained("eagle"), "snapkv", 256), _row(trained("eagle"))]
  elif variant == "pruned":
    config.contexts = (4096,)
    config.max_new_tokens = 256
    config.gamma = 3
    pruned = "trained:checkpoints/budgetdraft_smollm2_pruned"
    config.rows = [_row(SHIPPED, "snapkv", 256), _row(pruned, "snapkv", 256),
                   _row(pruned, "snapkv", 256, gamma=4), _row(pruned)]
  elif variant in ("paper", "paper_quick"):
    gammas = PAPER_GAMMAS if variant == "paper" else (3, 5)
    headroom = max(gammas) + 1  # a last round's whole draft chain fits (prompt_length)
    config.contexts = (3800 + 256 + headroom, 8192)
    config.num_prompts = 9 if variant == "paper" else 3
    config.max_new_tokens = 256
    config.gamma = 5
    config.sparsity = ml_collections.ConfigDict(
        {"sinks": 0, "window": 0, "chunk": 8, "recent": 256})
    config.rows = []
    for gamma in gammas:
      config.rows += [_row(SHIPPED, "chunk_retrieval", budget, gamma=gamma)
                      for budget in (256, 512, 1024, 2048)]
      config.rows += [_row(SHIPPED, "streaming", 68, gamma=gamma, sinks=4, window=64),
                      _row(SHIPPED, gamma=gamma)]
  elif variant == "long16k":
    config.contexts = (16384,)
    config.max_new_tokens = 128
    config.rows = [_row("self", "snapkv", 1024), _row("self", "snapkv", 2048),
                   _row("layers:4", "snapkv", 1024), _row("layers:4")]
  else:
    raise ValueError(f"unknown speedup variant {variant!r}; valid: default, full, trained, "
                     "pruned, paper, paper_quick, long16k")
  return config
