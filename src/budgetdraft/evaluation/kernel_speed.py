"""Pallas sparse-attention kernels vs their jnp references: time, bytes moved, share of bandwidth.

For each model shape, budget and context: the sparse decode kernel over a compact cache of
`budget` kept keys, and the block-sparse kernel reading the same kept set (as kept blocks) straight
from a full cache of `context` keys. Bytes moved = the K/V (and positions) a kernel must read +
queries and outputs. Each backend runs its own layout (`pallas_kernels.backend.choose`: mosaic on
TPU, triton on GPU). On CPU the kernels run in interpret mode: the table then only certifies
agreement with the reference; its times say nothing about the kernels, and no bandwidth share is
reported.
"""

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.evaluation import timing
import pallas_kernels
from pallas_kernels import backend

# name -> (query heads, kv heads, head dim, dtype)
SHAPES = {"smollm2": (9, 3, 64, jnp.float32), "llama3-8b": (32, 8, 128, jnp.bfloat16)}


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
  compiled = timing.compiled(jax.jit(fn), *args)
  compiled(*args)
  return timing.timed(compiled, *args, repeats=5)


def kernel_speed(shapes: list[str], contexts: list[int], budgets: list[int], *, queries: int,
                 block: int, bandwidth: float) -> list[dict]:
  """One row per (shape, context, budget <= context)."""
  variant, interpret = backend.choose(None, None)
  share = lambda num_bytes, seconds: ("n/a (interpret)" if interpret
                                      else num_bytes / seconds / bandwidth)
  rows = []
  for shape in shapes:
    for context in contexts:
      for budget in budgets:
        if budget > context:
          continue
        compact, gathered, moved, position_bytes = _case(shape, budget, context, queries, block)
        reference, reference_s = _time(pallas_kernels.sparse_decode_attention_reference, compact)
        kernel, kernel_s = _time(
            lambda *a: pallas_kernels.sparse_decode_attention(*a, block=block), compact)
        gathered_out, gathered_s = _time(
            lambda *a: pallas_kernels.block_sparse_attention(*a, block_q=queries, block_k=block),
            gathered)
        error = max(float(jnp.max(jnp.abs(out.astype(jnp.float32) -
                                          reference.astype(jnp.float32))))
                    for out in (kernel, gathered_out))
        rows.append({
            "shape": shape, "kernels": variant + (" (interpret)" if interpret else ""),
            "context": context, "budget": budget,
            "reference us": 1e6 * reference_s, "compact kernel us": 1e6 * kernel_s,
            "gather kernel us": 1e6 * gathered_s,
            "MB moved": (moved + position_bytes) / 1e6,
            "compact BW share": share(moved + position_bytes, kernel_s),
            "gather BW share": share(moved, gathered_s),
            "max abs err": error})
        logging.info("%s", rows[-1])
  return rows
