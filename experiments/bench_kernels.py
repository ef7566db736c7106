"""Pallas sparse-attention kernels vs their jnp references: time, bytes moved, share of bandwidth.

  python experiments/bench_kernels.py                         # on a GPU/TPU: the measured table
  python experiments/bench_kernels.py --contexts=4096 --budgets=256,1024 --shapes=smollm2

For each model shape (SmolLM2-135M, a Llama-3-8B layer), budget and context: the sparse decode
kernel over a compact cache of `budget` kept keys, and the block-sparse kernel reading the same kept
set (as kept blocks) straight from a full cache of `context` keys. Bytes moved = the K/V (and
positions) the kernel must read + queries and outputs; achieved bandwidth is reported as a fraction
of the measured device read bandwidth. On CPU the kernels run in interpret mode: the table then only
certifies agreement with the reference, its times say nothing about the kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from budgetdraft import benchmarking, tables
import pallas_kernels

# name -> (query heads, kv heads, head dim, dtype)
SHAPES = {"smollm2": (9, 3, 64, jnp.float32), "llama3-8b": (32, 8, 128, jnp.bfloat16)}

_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), "Model shapes to run.")
_BUDGETS = flags.DEFINE_list("budgets", ["256", "1024", "4096"], "Kept keys per KV head.")
_CONTEXTS = flags.DEFINE_list("contexts", ["4096", "16384", "32768"], "Full-cache lengths.")
_QUERIES = flags.DEFINE_integer("queries", 5, "New tokens per row (gamma + 1).")
_BLOCK = flags.DEFINE_integer("block", 128, "KV block of both kernels.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_kernels", "Results path (no extension).")


def _case(shape, budget, context, queries, block):
  num_heads, num_kv_heads, head_dim, dtype = SHAPES[shape]
  keys = jax.random.split(jax.random.key(budget + context), 4)
  q = jax.random.normal(keys[0], (1, queries, num_heads, head_dim), dtype)
  k_full = jax.random.normal(keys[1], (1, num_kv_heads, context, head_dim), dtype)
  v_full = jax.random.normal(keys[2], (1, num_kv_heads, context, head_dim), dtype)
  rng = np.random.default_rng(budget)
  num_blocks = context // block
  kept_blocks = np.sort(rng.choice(num_blocks - 1, budget // block - 1, replace=False))
  kept_blocks = np.append(kept_blocks, num_blocks - 1)          # the recent block is always kept
  table = jnp.asarray(np.broadcast_to(kept_blocks, (1, num_kv_heads, 1, len(kept_blocks))),
                      jnp.int32)
  counts = jnp.full((1, num_kv_heads, 1), len(kept_blocks), jnp.int32)
  keep = jnp.ones((1, num_kv_heads, context), jnp.int32)
  positions = (kept_blocks[:, None] * block + np.arange(block)).reshape(-1)
  compact_positions = jnp.asarray(np.broadcast_to(positions, (1, num_kv_heads, budget)), jnp.int32)
  index = jnp.asarray(positions)
  k_compact, v_compact = k_full[:, :, index], v_full[:, :, index]
  query_positions = jnp.asarray([context - queries + np.arange(queries)], jnp.int32)
  compact = (q, k_compact, v_compact, compact_positions, query_positions)
  gathered = (q, k_full, v_full, query_positions, keep, table, counts)
  kv_bytes = 2 * num_kv_heads * budget * head_dim * jnp.dtype(dtype).itemsize
  io_bytes = 2 * q.nbytes
  return compact, gathered, kv_bytes + io_bytes, compact_positions.nbytes


def _time(fn, args):
  compiled = jax.jit(fn).lower(*args).compile()
  compiled(*args)
  return benchmarking.timed(compiled, *args, repeats=5)


def main(argv):
  del argv
  bandwidth = benchmarking.read_bandwidth()
  device = jax.devices()[0]
  rows = []
  for shape in _SHAPES.value:
    for context in map(int, _CONTEXTS.value):
      for budget in map(int, _BUDGETS.value):
        if budget > context:
          continue
        compact, gathered, moved, position_bytes = _case(shape, budget, context, _QUERIES.value,
                                                         _BLOCK.value)
        static = dict(block_q=_QUERIES.value, block_k=_BLOCK.value)
        reference, reference_s = _time(pallas_kernels.sparse_decode_attention_reference, compact)
        kernel, kernel_s = _time(
            lambda *a: pallas_kernels.sparse_decode_attention(*a, block=_BLOCK.value), compact)
        gathered_out, gathered_s = _time(
            lambda *a: pallas_kernels.block_sparse_attention(*a, **static), gathered)
        error = max(float(jnp.max(jnp.abs(kernel.astype(jnp.float32) - reference.astype(
            jnp.float32)))), float(jnp.max(jnp.abs(gathered_out.astype(jnp.float32) -
                                                      reference.astype(jnp.float32)))))
        rows.append({
            "shape": shape, "context": context, "budget": budget,
            "reference us": 1e6 * reference_s, "compact kernel us": 1e6 * kernel_s,
            "gather kernel us": 1e6 * gathered_s,
            "MB moved": (moved + position_bytes) / 1e6,
            "compact BW share": (moved + position_bytes) / kernel_s / bandwidth,
            "gather BW share": moved / gathered_s / bandwidth,
            "max abs err": error})
        logging.info("%s", rows[-1])
  table = tables.markdown_table(rows)
  print(table)
  interpret = device.platform == "cpu"
  notes = (f"Device read bandwidth (max-reduction over 1 GiB): {bandwidth / 1e9:.1f} GB/s. "
           f"{_QUERIES.value} queries per row, batch 1, KV block {_BLOCK.value}. "
           + ("CPU: kernels ran in Pallas INTERPRET mode, so their times are not kernel speed; "
              "only `max abs err` (kernel vs reference) is meaningful here." if interpret else ""))
  tables.write_results(_OUTPUT.value, "Sparse-attention kernels", table, rows, notes)


if __name__ == "__main__":
  app.run(main)
