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

import numpy as np

from budgetdraft.evaluation import decode_speed
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
                    bandwidth: float, weight_bytes: int, reference_rows: list[dict],
                    repeats: int = 3) -> list[dict]:
  """Rows like `decode_speed.decode_speed`'s for HF transformers' greedy AR decoding (prefill
  once per context, then the decode loop `repeats` times, each from a copy of the prefilled cache),
  each with `same greedy tokens`: its leading tokens equal to the reference row's of that context."""
  import torch
  import transformers
  hf = _hf_model(model.path)
  system = f"HF transformers {transformers.__version__} (torch {torch.__version__})"
  reference = {row["context"]: row["tokens"] for row in reference_rows}
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
    row = decode_speed.speed_row(
        system, context=context, prompt_len=prompt_len, prefill_s=prefill_s,
        decode_times=sorted(times), steps=max_new_tokens - 1,
        floor_bytes=weight_bytes + decode_speed.kv_bytes(model.config, context, 4),  # float32
        bandwidth=bandwidth, tokens=tokens)
    row["same greedy tokens"] = decode_speed.same_prefix(tokens, reference[context])
    rows.append(row)
  return rows
