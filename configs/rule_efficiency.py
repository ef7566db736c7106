"""Verification rules in the engine on SmolLM2: `--config=configs/rule_efficiency.py:<variant>`.

Variants:
  smollm2  temperature 1, gamma 4, 4K prompts; the drafter is the verifier itself over a SnapKV
           cache of 256 keys (the best-accepted drafter a fresh checkout has); token-wise and BV
           (K = 1), SpecInfer, residual BV and GBV at K = 2 and 4 (~40 min on 2 CPU cores).
"""

import ml_collections


def get_config(variant: str = "smollm2") -> ml_collections.ConfigDict:
  if variant != "smollm2":
    raise ValueError(f"unknown variant {variant!r}; valid: smollm2")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""            # verifier; "" = the embedded SmolLM2-135M-Instruct GGUF
  config.mesh = ""                 # "data=4,model=2" (parallel.make_mesh); "" = all on data
  config.drafter = "self"           # a drafters.load source
  config.dataset = "long_books"
  config.data_dir = "data"
  config.split = "validation"
  config.context = 4096
  config.num_prompts = 4
  config.max_new_tokens = 256
  config.gamma = 4
  config.temperature = 1.0
  config.top_p = 1.0
  config.prefill_chunk = 512
  config.sparsity = ml_collections.ConfigDict(
      {"policy": "snapkv", "budget": 256, "sinks": 4, "window": 64, "recent": 128})
  config.rules = (("tokenwise", 1), ("block", 1),
                  ("specinfer", 2), ("residual_bv", 2), ("gbv", 2),
                  ("specinfer", 4), ("residual_bv", 4), ("gbv", 4))
  return config
