"""Decode throughput against batch size: `--config=configs/bench_batch.py:<variant>`.

Variants:
  smollm2  4K context, batch 1-16, 32 greedy new tokens: AR, self-drafting over SnapKV 512
           (gamma 4) and the shipped drafter (drafters/smollm2-eagle) over SnapKV 256 (gamma 3);
           4 distinct held-out prompts repeated to the batch (~20 min on a 2-core CPU; batch 32
           ran out of this machine's 24 GiB in AR decoding: pass --config.batch_sizes on a
           larger one).
A row's drafter is a `drafters.load` source; policy None = a full cache.
"""

import ml_collections

SHIPPED = "trained:drafters/smollm2-eagle"  # the drafter committed with the repository


def get_config(variant: str = "smollm2") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""           # "" = the embedded SmolLM2-135M-Instruct GGUF
  config.mesh = ""                 # "data=4,model=2" (parallel.make_mesh); "" = all on data
  config.dataset = "long_books"
  config.data_dir = "data"
  config.split = "validation"
  config.context = 4096
  config.distinct_prompts = 4      # prefilled once each; row i of a batch continues prompt i mod 4
  config.batch_sizes = (1, 2, 4, 8, 16)
  config.max_new_tokens = 32
  config.temperature = 0.0
  config.prefill_chunk = 512
  config.repeats = 3               # timed decode runs per cell (median and spread)
  config.sparsity = ml_collections.ConfigDict({"sinks": 4, "window": 64, "recent": 128})
  config.rows = [
      {"drafter": "self", "policy": "snapkv", "budget": 512, "gamma": 4},
      {"drafter": SHIPPED, "policy": "snapkv", "budget": 256, "gamma": 3},
  ]
  if variant != "smollm2":
    raise ValueError(f"unknown bench_batch variant {variant!r}")
  return config
