"""Text generation settings: `--config=configs/generate.py:<variant>`, every field a flag too.

Variants:
  default  SmolLM2-135M-Instruct, greedy, 256 new tokens, speculative decoding with the shipped
           drafter (drafters/smollm2-eagle, SnapKV 256, gamma 3) when the verifier is the one it
           was trained for, else autoregressive (`drafter="auto"`); `--config.drafter=none`
           decodes autoregressively, `self` or `layers:<k>` speculate with those;
           `--config.keep_rate=0.25` prefills a quarter of a long prompt (speculative prefill,
           autoregressive decoding after it unless a drafter without feature input is named).
"""

import ml_collections


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  if variant != "default":
    raise ValueError(f"unknown variant {variant!r}; valid: default")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""        # verifier: a .gguf file or HF folder; "" = SmolLM2-135M-Instruct
  config.mesh = ""                 # "data=4,model=2" (parallel.make_mesh); "" = all on data
  config.drafter = "auto"       # a drafters.load source, "none" (autoregressive) or "auto"
  config.policy = "snapkv"      # the drafter's KV policy; "full" keeps its whole cache
  config.budget = 256           # kept prompt keys per layer and KV head
  config.rule = "block"
  config.num_paths = 1
  config.gamma = 3               # the shipped drafter's chains rarely pass 3 accepted tokens
  config.temperature = 0.0      # 0 = greedy
  config.top_p = 1.0
  config.seed = 0
  config.max_new_tokens = 256
  config.prefill_chunk = 512
  config.stop = ()              # strings that end the output, e.g. ("\n\n",)
  # Speculative prefill (budgetdraft.specprefill): the verifier prefills this fraction of the
  # prompt's chunks, picked by the drafter, or by `scorer` when decoding autoregressively.
  config.keep_rate = 1.0        # 1 = the full prefill
  config.scorer = "layers:15"   # a drafters.load source
  return config
