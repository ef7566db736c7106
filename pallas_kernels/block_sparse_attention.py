"""Block-sparse flash attention over a position-ordered KV sequence, with a custom VJP.

Query block i (of `block_q` queries) visits only the KV blocks listed in block_table[..., i, :count];
inside a visited block, key j is visible to a query iff j <= the query's position and (key_keep[j]
or j >= the query's `ring_from`): a kept set plus, per query, a window of the latest keys. What it
serves today:
  - causal attention over the full cache (`ModelConfig.attention_impl="pallas"`: prefill and
    decode; the table lists every block up to the chunk's end);
  - decode over a kept set read straight from a full cache (no compact copy: the table lists the
    kept blocks, key_keep the kept tokens), measured by experiments/bench_kernels.py;
  - BudgetDraft's training views (`MaskedKVCache`): the kept prompt keys, and the ring of the last
    `ring_size` tokens since the compression point as each query's `ring_from`.
The triton layout loads the listed blocks with dynamic slices of the KV ref; the mosaic layout
makes the table slot a grid axis (see `_mosaic_forward`). The backward pass recomputes
probabilities from the saved log-sum-exp and walks the same (query block, KV block) pairs, in jnp.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import online_softmax
from pallas_kernels.backend import TRITON, choose, pad_to_power_of_two

_MASKED = -1e30


def _listed_blocks(block_table, block_counts, num_kv_blocks):
  """[B, Hkv, NQB, NKB] bool: which KV blocks each query block visits."""
  valid = jnp.arange(block_table.shape[-1]) < block_counts[..., None]
  one_hot = jax.nn.one_hot(block_table, num_kv_blocks, dtype=jnp.int32) * valid[..., None]
  return one_hot.sum(-2) > 0


_NO_RING = np.iinfo(np.int32).max


def block_sparse_attention_reference(q, k, v, query_positions, key_keep, block_table,
                                     block_counts, *, block_q: int, block_k: int, ring_from=None):
  """q: [B, Tq, H, D]; k, v: [B, Hkv, S, D] (key j at position j); query_positions: [B, Tq];
  key_keep: [B, Hkv, S] int (1 = keep); block_table: [B, Hkv, Tq / block_q, max_blocks] int32;
  block_counts: [B, Hkv, Tq / block_q] int32; ring_from: [B, Tq] int32, each query also sees the
  keys from there on (None: no ring). Returns [B, Tq, H, D] in q's dtype; a query that sees no
  key returns zeros.
  """
  batch, num_q, num_heads, head_dim = q.shape
  num_kv_heads, num_keys = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  listed = _listed_blocks(block_table, block_counts, num_keys // block_k)
  listed = jnp.repeat(jnp.repeat(listed, block_q, axis=2), block_k, axis=3)  # [B, Hkv, Tq, S]
  key_pos = jnp.arange(num_keys)[None, None, :]
  causal = key_pos <= query_positions[:, :, None]  # [B, Tq, S]
  if ring_from is None:
    ring_from = jnp.full(query_positions.shape, _NO_RING, jnp.int32)
  in_ring = key_pos >= ring_from[:, :, None]  # [B, Tq, S]
  visible = listed & ((key_keep[:, :, None, :] > 0) | in_ring[:, None]) & causal[:, None]
  grouped = q.reshape(batch, num_q, num_kv_heads, group, head_dim).astype(jnp.float32)
  scores = jnp.einsum("btkgd,bksd->bkgts", grouped, k.astype(jnp.float32)) * head_dim ** -0.5
  scores = jnp.where(visible[:, :, None], scores, _MASKED)
  probs = jnp.where(visible[:, :, None], jax.nn.softmax(scores, axis=-1), 0.0)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(jnp.float32))
  return out.reshape(batch, num_q, num_heads, head_dim).astype(q.dtype)


def _kernel(table_ref, count_ref, q_ref, bounds_ref, k_ref, v_ref, keep_ref, out_ref, lse_ref,
            *, block_k):
  queries = q_ref[0, 0, 0].astype(jnp.float32) * q_ref.shape[-1] ** -0.5   # [R, D]
  query_pos, ring_from = bounds_ref[0, 0, 0, 0], bounds_ref[0, 0, 0, 1]      # [R] each
  num_rows, head_dim = queries.shape

  def visit(j, carry):
    running_max, denom, acc = carry
    start = pl.multiple_of(table_ref[0, 0, 0, j] * block_k, block_k)
    keys = k_ref[0, 0, pl.ds(start, block_k), :].astype(jnp.float32)
    values = v_ref[0, 0, pl.ds(start, block_k), :].astype(jnp.float32)
    keep = keep_ref[0, 0, pl.ds(start, block_k)]
    key_pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    visible = (((keep[None, :] > 0) | (key_pos >= ring_from[:, None]))
               & (key_pos <= query_pos[:, None]))
    scores = jax.lax.dot_general(queries, keys, (((1,), (1,)), ((), ())))
    scores = jnp.where(visible, scores, _MASKED)
    new_max = jnp.maximum(running_max, scores.max(axis=1))
    weights = jnp.where(visible, jnp.exp(scores - new_max[:, None]), 0.0)
    rescale = jnp.exp(running_max - new_max)
    return (new_max, denom * rescale + weights.sum(axis=1),
            acc * rescale[:, None] + jnp.dot(weights, values))

  init = (jnp.full((num_rows,), _MASKED, jnp.float32), jnp.zeros((num_rows,), jnp.float32),
          jnp.zeros((num_rows, head_dim), jnp.float32))
  running_max, denom, acc = jax.lax.fori_loop(0, count_ref[0, 0, 0], visit, init)
  safe = jnp.maximum(denom, 1e-30)
  out_ref[0, 0, 0] = (acc / safe[:, None]).astype(out_ref.dtype)
  lse_ref[0, 0, 0] = running_max + jnp.log(safe)


def _mosaic_kernel(table_ref, count_ref, q_ref, bounds_ref, k_ref, v_ref, keep_ref, out_ref,
                   lse_ref, max_ref, denom_ref, acc_ref, *, block_k, num_q_blocks, max_blocks):
  """One (batch, KV head, query block, table slot j) grid point: the index maps fetched the
  slot's KV block (scalar-prefetched table); the online softmax lives in scratch across j."""
  b, h, i, j = (pl.program_id(axis) for axis in range(4))
  row = (b * pl.num_programs(1) + h) * num_q_blocks + i

  @pl.when(j == 0)
  def _():
    online_softmax.reset(max_ref, denom_ref, acc_ref)

  @pl.when(j < count_ref[row])
  def _():
    queries = q_ref[0, 0, 0].astype(jnp.float32) * q_ref.shape[-1] ** -0.5   # [R, D]
    query_pos, ring_from = bounds_ref[0, 0, 0, 0], bounds_ref[0, 0, 0, 1]      # [R] each
    start = table_ref[row * max_blocks + j] * block_k
    keys = k_ref[0, 0].astype(jnp.float32)                                     # [BK, D]
    values = v_ref[0, 0].astype(jnp.float32)
    keep = keep_ref[0, 0, 0]                                                   # [1, BK]
    key_pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    visible = ((keep > 0) | (key_pos >= ring_from[:, None])) & (key_pos <= query_pos[:, None])
    scores = jax.lax.dot_general(queries, keys, (((1,), (1,)), ((), ())))
    online_softmax.update(max_ref, denom_ref, acc_ref, scores, visible, values)

  @pl.when(j == max_blocks - 1)
  def _():
    safe = online_softmax.safe_denominator(denom_ref)
    out_ref[0, 0, 0] = (acc_ref[...] / safe).astype(out_ref.dtype)
    lse_ref[0, 0, 0, 0] = (max_ref[...] + jnp.log(safe))[:, 0]


def _mosaic_forward(q_blocks, bounds, k, v, key_keep, block_table, block_counts, block_k,
                    interpret):
  """The TPU layout of `_forward`'s call: the table slot is a grid axis and the table and counts
  are scalar-prefetched, so each step's index map DMAs exactly one listed KV block (slots past a
  row's count repeat its last block, which the pipeline does not fetch again)."""
  from jax.experimental.pallas import tpu as pltpu  # Mosaic only; importable on every backend

  batch, num_kv_heads, num_q_blocks, rows, head_dim = q_blocks.shape
  num_keys, max_blocks = k.shape[2], block_table.shape[-1]
  table, counts = block_table.reshape(-1), block_counts.reshape(-1)

  def kv_block(b, h, i, j, table, counts):
    row = (b * num_kv_heads + h) * num_q_blocks + i
    slot = jnp.maximum(jnp.minimum(j, counts[row] - 1), 0)
    return table[row * max_blocks + slot]

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, num_kv_heads, num_q_blocks, max_blocks),
      in_specs=[
          pl.BlockSpec((1, 1, 1, rows, head_dim), lambda b, h, i, j, *_: (b, h, i, 0, 0)),
          pl.BlockSpec((1, 1, 1, 2, rows), lambda b, h, i, j, *_: (b, 0, i, 0, 0)),
          pl.BlockSpec((1, 1, block_k, head_dim),
                       lambda b, h, i, j, *t: (b, h, kv_block(b, h, i, j, *t), 0)),
          pl.BlockSpec((1, 1, block_k, head_dim),
                       lambda b, h, i, j, *t: (b, h, kv_block(b, h, i, j, *t), 0)),
          pl.BlockSpec((1, 1, 1, 1, block_k),
                       lambda b, h, i, j, *t: (b, h, kv_block(b, h, i, j, *t), 0, 0)),
      ],
      out_specs=[pl.BlockSpec((1, 1, 1, rows, head_dim), lambda b, h, i, j, *_: (b, h, i, 0, 0)),
                 pl.BlockSpec((1, 1, 1, 1, rows), lambda b, h, i, j, *_: (b, h, i, 0, 0))],
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, head_dim), jnp.float32)])
  # (1, block_k), (2, rows) and (1, rows) as the last two block dims: the full extent of a small
  # axis and a lane-dim block, the shapes Mosaic tiles.
  keep_blocks = key_keep.reshape(batch, num_kv_heads, num_keys // block_k, 1, block_k)
  out, lse = pl.pallas_call(
      functools.partial(_mosaic_kernel, block_k=block_k, num_q_blocks=num_q_blocks,
                        max_blocks=max_blocks),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q_blocks.shape, q_blocks.dtype),
                 jax.ShapeDtypeStruct((batch, num_kv_heads, num_q_blocks, 1, rows), jnp.float32)],
      interpret=pltpu.InterpretParams() if interpret else False,
  )(table, counts, q_blocks, bounds, k, v, keep_blocks)
  return out, lse[:, :, :, 0]


def _grouped(q, num_kv_heads, block_q):
  """q [B, Tq, H, D] -> [B, Hkv, NQB, R = G * block_q, D] (rows ordered (g, t))."""
  batch, num_q, num_heads, head_dim = q.shape
  group, num_blocks = num_heads // num_kv_heads, num_q // block_q
  blocks = q.reshape(batch, num_blocks, block_q, num_kv_heads, group, head_dim)
  return blocks.transpose(0, 3, 1, 4, 2, 5).reshape(batch, num_kv_heads, num_blocks,
                                                    group * block_q, head_dim)


def _grouped_bounds(query_positions, ring_from, group, block_q):
  """[B, Tq] positions and ring starts -> [B, 1, NQB, 2, R], rows ordered as `_grouped`'s."""
  batch, num_q = query_positions.shape
  num_blocks = num_q // block_q
  bounds = jnp.stack([query_positions, ring_from], axis=1).reshape(batch, 2, num_blocks, 1,
                                                                     block_q)
  bounds = jnp.broadcast_to(bounds, (batch, 2, num_blocks, group, block_q))
  return bounds.transpose(0, 2, 1, 3, 4).reshape(batch, 1, num_blocks, 2, group * block_q)


def _ungrouped(blocks, num_heads, block_q):
  batch, num_kv_heads, num_blocks, _, head_dim = blocks.shape
  group = num_heads // num_kv_heads
  out = blocks.reshape(batch, num_kv_heads, num_blocks, group, block_q, head_dim)
  return out.transpose(0, 2, 4, 1, 3, 5).reshape(batch, num_blocks * block_q, num_heads, head_dim)


def _forward(q, k, v, query_positions, ring_from, key_keep, block_table, block_counts, block_q,
             block_k, variant, interpret):
  batch, num_q, num_heads, head_dim = q.shape
  num_kv_heads, num_keys = k.shape[1], k.shape[2]
  q_blocks = _grouped(q, num_kv_heads, block_q)
  bounds = _grouped_bounds(query_positions, ring_from, num_heads // num_kv_heads, block_q)
  if variant == "mosaic":
    out, lse = _mosaic_forward(q_blocks, bounds, k, v, key_keep, block_table, block_counts,
                               block_k, interpret)
    return _ungrouped(out, num_heads, block_q), lse
  rows = q_blocks.shape[3]
  q_blocks = pad_to_power_of_two(q_blocks, 3, 0)
  bounds = pad_to_power_of_two(bounds, 4, -1)  # position -1, ring from -1: a padded row sees no key
  num_q_blocks, padded_rows = q_blocks.shape[2], q_blocks.shape[3]
  max_blocks = block_table.shape[-1]
  out, lse = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k),
      grid=(batch, num_kv_heads, num_q_blocks),
      in_specs=[
          pl.BlockSpec((1, 1, 1, max_blocks), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((1, 1, 1), lambda b, h, i: (b, h, i)),
          pl.BlockSpec((1, 1, 1, padded_rows, head_dim), lambda b, h, i: (b, h, i, 0, 0)),
          pl.BlockSpec((1, 1, 1, 2, padded_rows), lambda b, h, i: (b, 0, i, 0, 0)),
          pl.BlockSpec((1, 1, num_keys, head_dim), lambda b, h, i: (b, h, 0, 0)),
          pl.BlockSpec((1, 1, num_keys, head_dim), lambda b, h, i: (b, h, 0, 0)),
          pl.BlockSpec((1, 1, num_keys), lambda b, h, i: (b, h, 0)),
      ],
      out_specs=[pl.BlockSpec((1, 1, 1, padded_rows, head_dim), lambda b, h, i: (b, h, i, 0, 0)),
                 pl.BlockSpec((1, 1, 1, padded_rows), lambda b, h, i: (b, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(q_blocks.shape, q.dtype),
                 jax.ShapeDtypeStruct(q_blocks.shape[:-1], jnp.float32)],
      interpret=interpret,
      compiler_params=TRITON,
  )(block_table, block_counts, q_blocks, bounds, k, v, key_keep)
  return _ungrouped(out[:, :, :, :rows], num_heads, block_q), lse[..., :rows]


def _backward(q, k, v, query_positions, ring_from, key_keep, block_table, block_counts, out, lse,
              d_out, block_q, block_k):
  """Gradients over the listed (query block, KV block) pairs, from the saved log-sum-exp."""
  num_heads, head_dim = q.shape[2], q.shape[3]
  num_kv_heads, num_keys = k.shape[1], k.shape[2]
  scale = head_dim ** -0.5
  q_blocks = _grouped(q.astype(jnp.float32), num_kv_heads, block_q)
  do_blocks = _grouped(d_out.astype(jnp.float32), num_kv_heads, block_q)
  o_blocks = _grouped(out.astype(jnp.float32), num_kv_heads, block_q)
  bounds = _grouped_bounds(query_positions, ring_from, num_heads // num_kv_heads, block_q)
  max_blocks = block_table.shape[-1]
  key_index = block_table[..., :, None] * block_k + jnp.arange(block_k)   # [B, Hkv, NQB, M, BK]
  key_index = key_index.reshape(key_index.shape[:3] + (max_blocks * block_k,))
  listed = (jnp.arange(max_blocks) < block_counts[..., None])            # [B, Hkv, NQB, M]
  listed = jnp.repeat(listed, block_k, axis=-1)                           # [B, Hkv, NQB, M*BK]

  def per_block(keys, values, keep, index, listed, queries, bounds, d_out, out, lse):
    k_sel, v_sel = keys[index].astype(jnp.float32), values[index].astype(jnp.float32)
    positions, ring_from = bounds
    kept = (keep[index][None] > 0) | (index[None] >= ring_from[:, None])
    visible = listed[None] & kept & (index[None] <= positions[:, None])
    scores = queries @ k_sel.T * scale
    probs = jnp.where(visible, jnp.exp(scores - lse[:, None]), 0.0)
    d_values = probs.T @ d_out
    d_probs = d_out @ v_sel.T
    d_scores = probs * (d_probs - jnp.sum(d_out * out, axis=-1, keepdims=True))
    return d_scores @ k_sel * scale, d_scores.T @ queries * scale, d_values

  over_blocks = jax.vmap(per_block, in_axes=(None, None, None, 0, 0, 0, 0, 0, 0, 0))
  over_heads = jax.vmap(over_blocks, in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0, 0))
  over_batch = jax.vmap(over_heads)
  d_q, d_k_sel, d_v_sel = over_batch(k, v, key_keep, key_index, listed, q_blocks,
                                     bounds[:, 0], do_blocks, o_blocks, lse)
  scatter = jax.vmap(jax.vmap(lambda index, grads: jnp.zeros(
      (num_keys, head_dim), jnp.float32).at[index.reshape(-1)].add(
          grads.reshape(-1, head_dim))))
  d_k, d_v = scatter(key_index, d_k_sel), scatter(key_index, d_v_sel)
  return _ungrouped(d_q, num_heads, block_q).astype(q.dtype), d_k.astype(k.dtype), d_v.astype(
      v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _attention(q, k, v, query_positions, ring_from, key_keep, block_table, block_counts, block_q,
               block_k, variant, interpret):
  return _forward(q, k, v, query_positions, ring_from, key_keep, block_table, block_counts,
                  block_q, block_k, variant, interpret)[0]


def _attention_fwd(q, k, v, query_positions, ring_from, key_keep, block_table, block_counts,
                   block_q, block_k, variant, interpret):
  out, lse = _forward(q, k, v, query_positions, ring_from, key_keep, block_table, block_counts,
                      block_q, block_k, variant, interpret)
  return out, (q, k, v, query_positions, ring_from, key_keep, block_table, block_counts, out,
               lse)


def _attention_bwd(block_q, block_k, variant, interpret, residuals, d_out):
  del variant, interpret
  q, k, v, *masks, out, lse = residuals
  d_q, d_k, d_v = _backward(q, k, v, *masks, out, lse, d_out, block_q, block_k)
  no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (d_q, d_k, d_v) + tuple(no_grad(x) for x in masks)


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q, k, v, query_positions, key_keep, block_table, block_counts, *,
                           block_q: int, block_k: int, ring_from=None, variant: str | None = None,
                           interpret: bool | None = None):
  """Pallas version of `block_sparse_attention_reference` (same signature), differentiable in
  q, k, v. Tq must be a multiple of block_q and S of block_k. variant / interpret: see
  `backend.choose` (None = this platform's)."""
  if q.shape[1] % block_q or k.shape[2] % block_k:
    raise ValueError(f"Tq={q.shape[1]} / S={k.shape[2]} must be multiples of block_q={block_q} / "
                     f"block_k={block_k}")
  variant, interpret = choose(variant, interpret)
  return _block_sparse_attention(q, k, v, query_positions, key_keep, block_table, block_counts,
                                 ring_from, block_q=block_q, block_k=block_k, variant=variant,
                                 interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "variant", "interpret"))
def _block_sparse_attention(q, k, v, query_positions, key_keep, block_table, block_counts,
                            ring_from, *, block_q, block_k, variant, interpret):
  if ring_from is None:
    ring_from = jnp.full(query_positions.shape, _NO_RING, jnp.int32)
  return _attention(q, k, v, query_positions, ring_from.astype(jnp.int32),
                    key_keep.astype(jnp.int32), block_table, block_counts, block_q, block_k,
                    variant, interpret)
