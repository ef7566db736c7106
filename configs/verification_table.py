"""Exact verification-rule table: `--config=configs/verification_table.py:<variant>`.

Variants:
  default  vocabulary 3, gamma 3, 2 paths, four divergences, 3 random Markov pairs each (~1 min).
"""

import ml_collections


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  if variant != "default":
    raise ValueError(f"unknown variant {variant!r}; valid: default")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.vocab_size = 3          # tiny: the enumeration is V^(gamma K)
  config.gamma = 3
  config.num_paths = 2
  config.mixes = (0.1, 0.3, 0.6, 0.9)  # drafter = (1 - mix) target + mix other
  config.seeds = 3               # random pairs averaged per mix
  return config
