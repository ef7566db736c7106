"""Speculative prefill configs: `--config=configs/specprefill.py:<variant>`.

Variants:
  default  4K and 8K, held-out books and pass-key prompts, the verifier's first 4 layers as the
           scorer and the first 15 as a stronger one, keep rates 10-50% (~25 min on 2 CPU cores);
  quick    one 2K book prompt and one pass-key prompt at two keep rates (a smoke run).
A scorer is a `drafters.load` source sharing the verifier's tokenizer (`layers:<k>`, `self`,
`trained:<workdir>`, `checkpoint:<path>`).
"""

import ml_collections


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""          # "" = the embedded SmolLM2-135M-Instruct GGUF
  config.mesh = ""                 # "data=4,model=2" (parallel.make_mesh); "" = all on data
  config.dataset = "long_books"
  config.data_dir = "data"
  config.split = "validation"
  config.scorers = ("layers:4", "layers:15")
  config.keep_rates = (0.1, 0.25, 0.5)
  config.contexts = (4096, 8192)
  config.book_prompts = 2         # held-out book windows per context
  config.passkey_prompts = 2      # pass-key prompts per context (needle depths spread over 10-90%)
  config.continuation = 32        # true next tokens scored by NLL (books) / the key (pass key)
  config.greedy_tokens = 32
  config.max_new_tokens = 64
  config.gamma = 4
  config.drafter_budget = 256
  config.prefill_chunk = 512
  # SpecPrefillConfig fields but the keep rate (see budgetdraft.specprefill).
  config.selection = ml_collections.ConfigDict(
      {"chunk": 32, "window": 32, "lookahead": 8, "pool": 13})
  if variant == "quick":
    config.contexts = (2048,)
    config.keep_rates = (0.25, 0.5)
    config.book_prompts = 1
    config.passkey_prompts = 1
  elif variant != "default":
    raise ValueError(f"unknown specprefill variant {variant!r}; valid: default, quick")
  return config
