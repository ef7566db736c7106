"""Decode attention over a compact sparse KV cache (kept prompt keys + recent ring, any positions).

A few new queries per row (1 for AR, gamma + 1 or a tree row for drafting / verification) attend to
C cache slots whose original token positions are `key_positions` (-1 = empty slot). A key is visible
to a query iff 0 <= key position <= query position, so kept keys at arbitrary positions, the ring
and the chunk itself need no other mask. GQA: the G query heads of a KV head share one program.

Two layouts (`backend.choose`): "triton", grid (batch, kv_heads), each program holds its [G*T, D]
queries and walks the KV slots in blocks with an online softmax (an in-kernel loop); "mosaic"
(TPU), grid (batch, kv_heads, KV blocks), each step gets one KV block from its index map (so the
next block's DMA overlaps this one's compute) and carries the softmax in VMEM scratch.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import online_softmax
from pallas_kernels.backend import TRITON, choose, pad_to_power_of_two

_MASKED = -1e30


def sparse_decode_attention_reference(q, k, v, key_positions, query_positions):
  """q: [B, T, H, D]; k, v: [B, Hkv, C, D]; key_positions: [B, Hkv, C]; query_positions: [B, T].

  Returns [B, T, H, D] in q's dtype.
  """
  batch, num_new, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[1]
  group = num_heads // num_kv_heads
  grouped = q.reshape(batch, num_new, num_kv_heads, group, head_dim).astype(jnp.float32)
  scores = jnp.einsum("btkgd,bksd->bkgts", grouped, k.astype(jnp.float32)) * head_dim ** -0.5
  visible = (key_positions[:, :, None, :] >= 0) & (
      key_positions[:, :, None, :] <= query_positions[:, None, :, None])  # [B, Hkv, T, C]
  scores = jnp.where(visible[:, :, None], scores, _MASKED)
  probs = jnp.where(visible[:, :, None], jax.nn.softmax(scores, axis=-1), 0.0)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(jnp.float32))
  return out.reshape(batch, num_new, num_heads, head_dim).astype(q.dtype)


def _kernel(q_ref, k_ref, v_ref, key_pos_ref, query_pos_ref, out_ref, *, block):
  queries = q_ref[0, 0].astype(jnp.float32) * q_ref.shape[-1] ** -0.5      # [GT, D]
  query_pos = query_pos_ref[0, 0]                                          # [GT]
  num_rows, head_dim = queries.shape

  def visit(i, carry):
    running_max, denom, acc = carry
    start = pl.multiple_of(i * block, block)
    keys = k_ref[0, 0, pl.ds(start, block), :].astype(jnp.float32)         # [BK, D]
    values = v_ref[0, 0, pl.ds(start, block), :].astype(jnp.float32)
    key_pos = key_pos_ref[0, 0, pl.ds(start, block)]                        # [BK]
    scores = jax.lax.dot_general(queries, keys, (((1,), (1,)), ((), ())))   # [GT, BK]
    visible = (key_pos[None, :] >= 0) & (key_pos[None, :] <= query_pos[:, None])
    scores = jnp.where(visible, scores, _MASKED)
    new_max = jnp.maximum(running_max, scores.max(axis=1))
    weights = jnp.where(visible, jnp.exp(scores - new_max[:, None]), 0.0)
    rescale = jnp.exp(running_max - new_max)
    denom = denom * rescale + weights.sum(axis=1)
    acc = acc * rescale[:, None] + jnp.dot(weights, values)
    return new_max, denom, acc

  init = (jnp.full((num_rows,), _MASKED, jnp.float32), jnp.zeros((num_rows,), jnp.float32),
          jnp.zeros((num_rows, head_dim), jnp.float32))
  _, denom, acc = jax.lax.fori_loop(0, k_ref.shape[2] // block, visit, init)
  out_ref[0, 0] = (acc / jnp.maximum(denom, 1e-30)[:, None]).astype(out_ref.dtype)


def _mosaic_kernel(q_ref, query_pos_ref, k_ref, v_ref, key_pos_ref, out_ref, max_ref, denom_ref,
                   acc_ref):
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _():
    online_softmax.reset(max_ref, denom_ref, acc_ref)

  queries = q_ref[0, 0].astype(jnp.float32) * q_ref.shape[-1] ** -0.5      # [GT, D]
  query_pos = query_pos_ref[0, 0, 0]                                       # [GT]
  keys = k_ref[0, 0].astype(jnp.float32)                                   # [BK, D]
  values = v_ref[0, 0].astype(jnp.float32)
  key_pos = key_pos_ref[0, 0, 0]                                           # [1, BK]
  scores = jax.lax.dot_general(queries, keys, (((1,), (1,)), ((), ())))   # [GT, BK]
  visible = (key_pos >= 0) & (key_pos <= query_pos[:, None])
  online_softmax.update(max_ref, denom_ref, acc_ref, scores, visible, values)

  @pl.when(j == pl.num_programs(2) - 1)
  def _():
    out_ref[0, 0] = (acc_ref[...] / online_softmax.safe_denominator(denom_ref)).astype(
        out_ref.dtype)


def _mosaic_call(q_grouped, k, v, key_positions, query_rows, block, interpret):
  """The TPU layout: KV blocks as the last grid axis ((1, block) key-position blocks: the full
  extent of a size-1 axis and a lane-dim block, which Mosaic tiles)."""
  from jax.experimental.pallas import tpu as pltpu  # Mosaic only; importable on every backend

  batch, num_kv_heads, rows, head_dim = q_grouped.shape
  num_blocks = k.shape[2] // block
  return pl.pallas_call(
      _mosaic_kernel,
      grid=(batch, num_kv_heads, num_blocks),
      in_specs=[
          pl.BlockSpec((1, 1, rows, head_dim), lambda b, h, j: (b, h, 0, 0)),
          pl.BlockSpec((1, 1, 1, rows), lambda b, h, j: (b, 0, 0, 0)),
          pl.BlockSpec((1, 1, block, head_dim), lambda b, h, j: (b, h, j, 0)),
          pl.BlockSpec((1, 1, block, head_dim), lambda b, h, j: (b, h, j, 0)),
          pl.BlockSpec((1, 1, 1, 1, block), lambda b, h, j: (b, h, j, 0, 0)),
      ],
      out_specs=pl.BlockSpec((1, 1, rows, head_dim), lambda b, h, j: (b, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(q_grouped.shape, q_grouped.dtype),
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, head_dim), jnp.float32)],
      interpret=pltpu.InterpretParams() if interpret else False,
  )(q_grouped, query_rows[:, :, None], k, v,
    key_positions.reshape(batch, num_kv_heads, num_blocks, 1, block))


def sparse_decode_attention(q, k, v, key_positions, query_positions, *, block: int = 128,
                            variant: str | None = None, interpret: bool | None = None):
  """Pallas version of `sparse_decode_attention_reference` (same signature and result).

  C is padded to a multiple of `block` with empty slots. A query that sees no key returns zeros
  (the reference returns the mean of nothing too, as zeros). variant / interpret: see
  `backend.choose` (None = this platform's).
  """
  variant, interpret = choose(variant, interpret)
  return _sparse_decode_attention(q, k, v, key_positions, query_positions, block=block,
                                  variant=variant, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block", "variant", "interpret"))
def _sparse_decode_attention(q, k, v, key_positions, query_positions, *, block, variant,
                             interpret):
  batch, num_new, num_heads, head_dim = q.shape
  num_kv_heads, capacity = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  block = min(block, pl.next_power_of_2(capacity))
  padded = pl.cdiv(capacity, block) * block
  if padded != capacity:
    pad = ((0, 0), (0, 0), (0, padded - capacity))
    k, v = jnp.pad(k, pad + ((0, 0),)), jnp.pad(v, pad + ((0, 0),))
    key_positions = jnp.pad(key_positions, pad, constant_values=-1)
  rows = group * num_new  # query rows of one KV head: (g, t) flattened
  q_grouped = q.reshape(batch, num_new, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  q_grouped = q_grouped.reshape(batch, num_kv_heads, rows, head_dim)
  query_rows = jnp.tile(query_positions, (1, group)).reshape(batch, 1, rows)
  if variant == "mosaic":
    out = _mosaic_call(q_grouped, k, v, key_positions, query_rows, block, interpret)
    out = out.reshape(batch, num_kv_heads, group, num_new, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, num_new, num_heads, head_dim)
  kernel = functools.partial(_kernel, block=block)
  q_grouped = pad_to_power_of_two(q_grouped, 2, 0)
  query_rows = pad_to_power_of_two(query_rows, 2, -1)  # a padded row sees no key
  padded_rows = q_grouped.shape[2]
  out = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads),
      in_specs=[
          pl.BlockSpec((1, 1, padded_rows, head_dim), lambda b, h: (b, h, 0, 0)),
          pl.BlockSpec((1, 1, padded, head_dim), lambda b, h: (b, h, 0, 0)),
          pl.BlockSpec((1, 1, padded, head_dim), lambda b, h: (b, h, 0, 0)),
          pl.BlockSpec((1, 1, padded), lambda b, h: (b, h, 0)),
          pl.BlockSpec((1, 1, padded_rows), lambda b, h: (b, 0, 0)),
      ],
      out_specs=pl.BlockSpec((1, 1, padded_rows, head_dim), lambda b, h: (b, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(q_grouped.shape, q.dtype),
      interpret=interpret,
      compiler_params=TRITON,
  )(q_grouped, k, v, key_positions, query_rows)[:, :, :rows]
  out = out.reshape(batch, num_kv_heads, group, num_new, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, num_new, num_heads, head_dim)
