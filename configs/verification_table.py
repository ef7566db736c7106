"""Exact verification-rule table: `--config=configs/verification_table.py:<variant>`.

Variants:
  default  the BV toy example and random Markov pairs (vocabulary 3, gamma 2, four divergences,
           3 pairs each), K = 1..4 paths (~10 min on 2 cores; the K = 4 LPs dominate).
"""

import ml_collections


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  if variant != "default":
    raise ValueError(f"unknown variant {variant!r}; valid: default")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.vocab_size = 3          # tiny: the enumeration is V^(gamma K)
  config.gamma = 2
  config.num_paths = (1, 2, 3, 4)
  config.mixes = (0.1, 0.3, 0.6, 0.9)  # drafter = (1 - mix) target + mix other
  config.seeds = 3               # random pairs averaged per mix
  return config
