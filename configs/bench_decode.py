"""AR decode benchmark against the bandwidth floor: `--config=configs/bench_decode.py:<variant>`.

Variants:
  smollm2  the embedded SmolLM2-135M-Instruct at 1K, 4K and 8K (`make bench`, ~5 min on 2 cores).
Any HF folder or GGUF file works with `--config.checkpoint=/models/Qwen2-0.5B`.
"""

import ml_collections


def get_config(variant: str = "smollm2") -> ml_collections.ConfigDict:
  if variant != "smollm2":
    raise ValueError(f"unknown variant {variant!r}; valid: smollm2")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.checkpoint = ""            # "" = the embedded SmolLM2-135M-Instruct GGUF
  config.mesh = ""                 # "data=4,model=2" (parallel.make_mesh); "" = all on data
  config.dataset = "long_books"
  config.data_dir = "data"
  config.split = "validation"
  config.contexts = (1024, 4096, 8192)  # prompt + generated tokens per measurement
  config.max_new_tokens = 64
  config.prefill_chunk = 512
  config.gamma = 4                  # the verify step feeds gamma + 1 tokens
  # Our layer layouts (`transformer.unroll`), in order: "packed" (the C++ CPU kernels),
  # "unrolled" (XLA's ops), "scanned".
  config.layouts = ("packed", "unrolled")
  config.hf_peer = True             # HF transformers side by side, where it is installed
  return config
