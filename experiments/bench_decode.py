"""Autoregressive prefill time and decode speed of the verifier, against the memory-bandwidth floor.

  python experiments/bench_decode.py --data_dir=data --contexts=1024,4096,8192

A decode step must read every weight and the valid part of the KV cache once, so
floor = (weight bytes + KV bytes) / measured read bandwidth; `x floor` is how far a step is from it.
"""

import os

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from budgetdraft import benchmarking, tables
from budgetdraft import tokenizer as tokenizer_lib
from budgetdraft.data import packing, readers
from budgetdraft.decoding import autoregressive
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.models import checkpoint_io

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "GGUF file or HF folder (default: SmolLM2).")
_DATA_DIR = flags.DEFINE_string("data_dir", "data", "Holds the prepared long_books dataset.")
_DATASET = flags.DEFINE_enum("dataset", "long_books", readers.DATASETS, "Prompt source.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096", "8192"],
                              "Total tokens (prompt + generated) per measurement.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens decoded per measurement.")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "Prefill chunk.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_decode", "Results path (no extension).")


def main(argv):
  del argv
  path = _CHECKPOINT.value or checkpoint_io.default_verifier_path()
  config, params = checkpoint_io.load_checkpoint(path)
  tokenizer = tokenizer_lib.load_tokenizer(path)
  bandwidth = benchmarking.read_bandwidth()
  logging.info("read bandwidth %.1f GB/s", bandwidth / 1e9)
  weight_bytes = benchmarking.tree_bytes(params)
  contexts = [int(c) for c in _CONTEXTS.value]
  new_tokens = _NEW_TOKENS.value
  prompts = packing.first_windows(readers.documents(_DATASET.value, _DATA_DIR.value, "validation"),
                                  tokenizer, max(contexts) - new_tokens, 1)
  static = dict(config=config, sampling=SamplingConfig(), eos_id=None, pad_id=0)
  rows = []
  for context in contexts:
    prompt_len = context - new_tokens
    prompt = jnp.asarray(prompts[:1, :prompt_len])
    lengths = jnp.array([prompt_len], jnp.int32)
    logging.info("context %d: compiling prefill", context)
    start = autoregressive.start.lower(
        params, prompt, lengths, jax.random.key(0), max_new_tokens=new_tokens,
        chunk_size=_CHUNK.value, **static).compile()
    state, prefill_s = benchmarking.timed(start, params, prompt, lengths, jax.random.key(0))
    decode = autoregressive.decode.lower(params, state, **static).compile()
    state, decode_s = benchmarking.timed(decode, params, state)
    steps = int(state.step) - 1  # the first token came from prefill
    step_s = decode_s / steps
    kv_bytes = 2 * config.num_layers * config.num_kv_heads * context * config.head_dim * (
        config.dtype.itemsize)
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    rows.append({"context": context, "prompt tokens": prompt_len,
                 "prefill s": prefill_s, "prefill tok/s": prompt_len / prefill_s,
                 "decode tok/s": 1 / step_s, "ms/step": 1e3 * step_s,
                 "floor ms/step": 1e3 * floor_s, "x floor": step_s / floor_s})
    logging.info("%s", rows[-1])
  table = tables.markdown_table(rows)
  print(table)
  notes = (f"Model: {os.path.basename(path)} ({weight_bytes / 1e6:.0f} MB of {config.param_dtype} weights, "
           f"{config.compute_dtype} compute). Batch 1, greedy, {new_tokens} new tokens.\n"
           f"Measured read bandwidth (max-reduction over 1 GiB): {bandwidth / 1e9:.1f} GB/s. "
           "Floor = (weights + KV at the full context) / bandwidth per decode step; "
           "`x floor` = measured step time / floor.")
  tables.write_results(_OUTPUT.value, "AR decode benchmark", table, rows, notes)


if __name__ == "__main__":
  app.run(main)
