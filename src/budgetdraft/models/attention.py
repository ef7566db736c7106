"""Chunked (flash-style) attention of a few new queries over a preallocated KV cache, in jnp.

Keys are visited block by block with an online softmax, and only blocks below the longest valid length
are visited, so a decode step over a half-empty 16K cache reads half of it, and a 16K prefill never
materializes a [T, S] score matrix larger than [chunk, block].
"""

import jax
import jax.numpy as jnp

_MASKED = -1e30


def visible_mask(cache_length, chunk_mask, key_index):
  """Which keys each new query may attend to.

  cache_length: [B] entries that precede the chunk; chunk_mask: [B, T, T] (query i may see chunk
  token t: causal, or a tree); key_index: [K] cache indices. Returns [B, T, K] bool: key j is visible
  iff j < cache_length, or j - cache_length = t with chunk_mask[i, t].
  """
  num_new = chunk_mask.shape[-1]
  offset = key_index[None, :] - cache_length[:, None]  # [B, K]
  in_chunk = (offset >= 0) & (offset < num_new)
  chunk_hit = jnp.take_along_axis(
      chunk_mask, jnp.clip(offset, 0, num_new - 1)[:, None, :].repeat(chunk_mask.shape[1], 1),
      axis=2)
  return (offset < 0)[:, None, :] | (in_chunk[:, None, :] & chunk_hit)


def cached_attention(q, k_all, v_all, layer, cache_length, chunk_mask, block):
  """Attention of new queries over layer `layer` of a stacked cache.

  q: [B, T, H, D] after RoPE; k_all, v_all: [L, B, Hkv, S, D] already holding the new chunk at
  [cache_length, cache_length + T); chunk_mask: [B, T, T]. Returns [B, T, H, D] in the cache dtype.
  """
  batch, num_new, num_heads, head_dim = q.shape
  num_kv_heads, capacity = k_all.shape[2], k_all.shape[3]
  block = min(block, capacity)
  if capacity % block:
    raise ValueError(f"cache capacity {capacity} is not a multiple of the attention block {block}")
  group = num_heads // num_kv_heads
  q = q.reshape(batch, num_new, num_kv_heads, group, head_dim).astype(jnp.float32)
  q = q * (head_dim ** -0.5)
  num_blocks = (jnp.max(cache_length) + num_new + block - 1) // block

  def visit(i, carry):
    running_max, denom, acc = carry  # [B, Hkv, G, T], [B, Hkv, G, T], [B, Hkv, G, T, D]
    start = i * block
    k = jax.lax.dynamic_slice(k_all, (layer, 0, 0, start, 0),
                              (1, batch, num_kv_heads, block, head_dim))[0]
    v = jax.lax.dynamic_slice(v_all, (layer, 0, 0, start, 0),
                              (1, batch, num_kv_heads, block, head_dim))[0]
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(jnp.float32))
    mask = visible_mask(cache_length, chunk_mask, start + jnp.arange(block))[:, None, None]
    scores = jnp.where(mask, scores, _MASKED)
    new_max = jnp.maximum(running_max, scores.max(-1))
    weights = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
    rescale = jnp.exp(running_max - new_max)
    denom = denom * rescale + weights.sum(-1)
    acc = acc * rescale[..., None] + jnp.einsum("bkgts,bksd->bkgtd", weights,
                                                v.astype(jnp.float32))
    return new_max, denom, acc

  stats_shape = (batch, num_kv_heads, group, num_new)
  init = (jnp.full(stats_shape, _MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros(stats_shape + (head_dim,), jnp.float32))
  _, denom, acc = jax.lax.fori_loop(0, num_blocks, visit, init)
  out = acc / denom[..., None]  # every query sees at least itself, so denom > 0
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, num_new, num_heads, head_dim).astype(
      k_all.dtype)
