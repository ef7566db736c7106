"""Peer systems measured beside ours in the same run, where their packages are installed.

HF transformers (PyTorch) runs the same checkpoint at the same precision: a GGUF file is loaded with
`from_pretrained(folder, gguf_file=...)`, which dequantizes it to float32 exactly as our loader does,
so both systems decode the same weights. torch and transformers are an optional extra
(`pip install -e .[peers]`), never a dependency of the project.
"""

import copy
import importlib.util
import os
import time

from absl import logging
import numpy as np

from budgetdraft.models.checkpoint_io import Checkpoint


def hf_installed() -> bool:
  return all(importlib.util.find_spec(name) for name in ("torch", "transformers"))


def _hf_model(path: str):
  import torch
  import transformers
  if os.path.isdir(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
        dtype=torch.float32)
  return model.eval()


def hf_decode_speed(model: Checkpoint, prompt_tokens, contexts: list[int], *, max_new_tokens: int,
                    bandwidth: float, weight_bytes: int, repeats: int = 3) -> list[dict]:
  """Rows like `decode_speed.decode_speed`'s for HF transformers' greedy AR decoding (prefill
  once per context, then the decode loop `repeats` times, each from a copy of the prefilled cache).
  Each row holds the emitted `tokens` for comparison."""
  import torch
  import transformers
  hf = _hf_model(model.path)
  system = f"HF transformers {transformers.__version__} (torch {torch.__version__})"
  rows = []
  for context in contexts:
    prompt_len = context - max_new_tokens
    ids = torch.as_tensor(np.asarray(prompt_tokens[:1, :prompt_len]), dtype=torch.long)
    with torch.inference_mode():
      started = time.perf_counter()
      out = hf(ids, use_cache=True)
      prefill_s = time.perf_counter() - started
      prefilled, first = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
      times = []
      for _ in range(repeats):
        cache = copy.deepcopy(prefilled)  # the loop grows the cache in place
        token, tokens = first, [int(first)]
        started = time.perf_counter()
        for _ in range(max_new_tokens - 1):
          out = hf(token, past_key_values=cache, use_cache=True)
          token = out.logits[:, -1].argmax(-1, keepdim=True)
          tokens.append(int(token))
        times.append(time.perf_counter() - started)
    times.sort()
    steps = max_new_tokens - 1
    step_s = times[len(times) // 2] / steps
    kv_bytes = 2 * model.config.num_layers * model.config.num_kv_heads * context * (
        model.config.head_dim * 4)
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    rows.append({"system": system, "context": context, "prompt tokens": prompt_len,
                 "prefill s": prefill_s, "prefill tok/s": prompt_len / prefill_s,
                 "decode tok/s": 1 / step_s, "ms/step": 1e3 * step_s,
                 "ms/step min-max": f"{1e3 * times[0] / steps:.1f}-{1e3 * times[-1] / steps:.1f}",
                 "floor ms/step": 1e3 * floor_s, "x floor": step_s / floor_s, "tokens": tokens})
    logging.info("%s", {k: v for k, v in rows[-1].items() if k != "tokens"})
  return rows
