"""Pallas kernel benchmark: `--config=configs/bench_kernels.py:<variant>`.

Variants:
  default  SmolLM2 and Llama-3-8B head shapes, budgets 256-4096, contexts 4K-32K. On a GPU/TPU
           the measured table; on CPU (interpret mode) only the error column means anything.
"""

import ml_collections


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  if variant != "default":
    raise ValueError(f"unknown variant {variant!r}; valid: default")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.shapes = ("smollm2", "llama3-8b")  # evaluation.kernel_speed.SHAPES
  config.budgets = (256, 1024, 4096)        # kept keys per KV head
  config.contexts = (4096, 16384, 32768)    # full-cache lengths
  config.queries = 5                        # new tokens per row (gamma + 1)
  config.block = 128                        # KV block of both kernels
  return config
