"""Text generation settings: `--config=configs/generate.py:<variant>`, every field a flag too.

Variants:
  default  SmolLM2-135M-Instruct, greedy, 256 new tokens, autoregressive until a trained drafter
           ships with the project (issue 13); `--config.drafter=self` or `layers:<k>` speculates.
"""

import ml_collections


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  if variant != "default":
    raise ValueError(f"unknown variant {variant!r}; valid: default")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""        # verifier: a .gguf file or HF folder; "" = SmolLM2-135M-Instruct
  config.drafter = "none"       # a drafters.load source, or "none" for autoregressive decoding
  config.policy = "snapkv"      # the drafter's KV policy; "full" keeps its whole cache
  config.budget = 256           # kept prompt keys per layer and KV head
  config.rule = "block"
  config.num_paths = 1
  config.gamma = 4
  config.temperature = 0.0      # 0 = greedy
  config.top_p = 1.0
  config.seed = 0
  config.max_new_tokens = 256
  config.prefill_chunk = 512
  config.stop = ()              # strings that end the output, e.g. ("\n\n",)
  return config
