"""Attention of a few new queries over a KV cache, in jnp.

Two implementations share one visibility rule (`visible_mask`):
- `chunked_attention`: flash-style online softmax over KV blocks of a position-ordered full cache,
  visiting only blocks below the longest valid length, so a 16K prefill never materializes more
  than [chunk, block] scores and a decode step over a half-empty cache reads half of it;
- `dense_attention`: one masked softmax over every slot, for small caches (the sparse drafter cache)
  and for passes that need the attention probabilities themselves (KV selection scores).
The Pallas kernels (`attention_impl` "pallas", or "auto" on TPU / GPU: `uses_kernels`) run through
`on_local_shards`; on a CPU, "auto" runs a decode step on the C++ kernels (`uses_cpu_kernels`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from budgetdraft import cpu_kernels
import pallas_kernels

_MASKED = -1e30


def visible_mask(chunk_start, chunk_mask, key_positions):
  """Which keys each new query may attend to.

  chunk_start: [B] position of the first new token; chunk_mask: [B, T, T] (query i may see chunk
  token t: causal, or a draft tree); key_positions: [B, ..., K] token position of each key slot
  (-1 = empty). Returns [B, ..., T, K]: a key is visible iff it precedes the chunk, or it is chunk
  token t = position - chunk_start with chunk_mask[i, t].
  """
  num_new = chunk_mask.shape[-1]
  extra_axes = key_positions.ndim - 2
  start = chunk_start.reshape((-1,) + (1,) * (extra_axes + 1))
  offset = key_positions - start  # [B, ..., K]
  in_chunk = (offset >= 0) & (offset < num_new)
  mask = chunk_mask.reshape(chunk_mask.shape[:1] + (1,) * extra_axes + chunk_mask.shape[1:])
  index = jnp.clip(offset, 0, num_new - 1)[..., None, :]  # [B, ..., 1, K]
  chunk_hit = jnp.take_along_axis(mask, jnp.broadcast_to(
      index, index.shape[:-2] + (num_new, index.shape[-1])), axis=-1)
  before = ((key_positions >= 0) & (offset < 0))[..., None, :]
  return before | (in_chunk[..., None, :] & chunk_hit)


def uses_kernels(attention_impl: str) -> bool:
  """Whether attention runs on the Pallas kernels: "pallas" always, "auto" where they compile
  (TPU, GPU; CPU only interprets them, far slower than jnp), "jnp" never."""
  return attention_impl == "pallas" or (attention_impl == "auto" and
                                        pallas_kernels.backend.compiled())


def uses_cpu_kernels(attention_impl: str) -> bool:
  """Whether a decode step runs on the C++ CPU kernels (`cpu_kernels`): "auto" on a CPU backend
  where they build, outside a mesh (GSPMD cannot split an FFI call; there XLA's ops run)."""
  return (attention_impl == "auto" and jax.default_backend() == "cpu"
          and jax.sharding.get_abstract_mesh().empty and cpu_kernels.available())


def _grouped_queries(q, num_kv_heads):
  batch, num_new, num_heads, head_dim = q.shape
  q = q.reshape(batch, num_new, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return q.astype(jnp.float32) * (head_dim ** -0.5)


def _ungroup(out, dtype):
  """[B, Hkv, G, T, D] -> [B, T, H, D]."""
  batch, num_kv_heads, group, num_new, head_dim = out.shape
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, num_new, num_kv_heads * group,
                                              head_dim).astype(dtype)


def on_local_shards(kernel, args: tuple, axes: tuple, out_axes: tuple):
  """kernel(*args), on each device's shard when a mesh is set (`parallel.running_on`).

  GSPMD cannot split a Pallas kernel, so under a mesh it runs in `shard_map`: each argument is
  split by its logical axes (`axes`, one name or None per dimension: "batch", "heads",
  "kv_heads") through the rules in context (`nn.logical_axis_rules`), and the kernel sees one
  device's rows and heads. A name whose mesh axis does not divide every dimension it labels stays
  whole (a query group never straddles devices). With no mesh: kernel(*args).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(*args)
  rules = dict(nn.get_logical_axis_rules())
  sizes = {}
  for arg, names in zip(args, axes):
    for size, name in zip(arg.shape, names):
      sizes.setdefault(name, set()).add(size)

  def mesh_axis(name):
    axis = rules.get(name)
    if axis not in mesh.axis_names or mesh.shape[axis] == 1:
      return None
    return axis if all(size % mesh.shape[axis] == 0 for size in sizes[name]) else None
  spec = lambda names: PartitionSpec(*(None if name is None else mesh_axis(name) for name in names))
  return jax.shard_map(kernel, mesh=mesh, in_specs=tuple(map(spec, axes)), out_specs=spec(out_axes),
                       check_vma=False)(*args)


# The logical axes of the kernels' arguments, in order, for `on_local_shards`: queries and outputs
# [B, T, H, D]; keys, values and block tables [B, Hkv, ., .]; key positions, keep flags and block
# counts [B, Hkv, .]; query positions and ring starts [B, T].
QUERIES = ("batch", None, "heads", None)
_BY_HEAD = ("batch", "kv_heads", None, None)
_PER_HEAD = ("batch", "kv_heads", None)
_PER_ROW = ("batch", None)
BLOCK_SPARSE_AXES = (QUERIES, _BY_HEAD, _BY_HEAD, _PER_ROW, _PER_HEAD, _BY_HEAD, _PER_HEAD,
                     _PER_ROW)  # the last: ring_from
SPARSE_DECODE_AXES = (QUERIES, _BY_HEAD, _BY_HEAD, _PER_HEAD, _PER_ROW)


def dense_attention(q, k, v, visible):
  """q: [B, T, H, D]; k, v: [B, Hkv, S, D]; visible: [B, 1 or Hkv, T, S].

  Returns (out [B, T, H, D], probs [B, Hkv, G, T, S] float32).
  """
  grouped = _grouped_queries(q, k.shape[1])
  scores = jnp.einsum("btkgd,bksd->bkgts", grouped, k.astype(jnp.float32))
  scores = jnp.where(visible[:, :, None], scores, _MASKED)  # visible: [B, Hkv or 1, 1, T, S]
  # The row max, floored so that a row with no visible key gets exp(-huge) = 0 everywhere: no
  # second masking pass. The output is normalized after the value product ([.., D], not [.., S]);
  # the normalized probabilities are only computed where a caller uses them.
  top = jnp.maximum(jax.lax.stop_gradient(scores.max(-1, keepdims=True)), _MASKED / 2)
  weights = jnp.exp(scores - top)
  denom = jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
  out = jnp.einsum("bkgts,bksd->bkgtd", weights, v.astype(jnp.float32)) / denom
  return _ungroup(out, k.dtype), weights / denom


def chunked_attention(q, k_all, v_all, layer, chunk_start, chunk_mask, block):
  """Online-softmax attention over layer `layer` of a stacked, position-ordered cache.

  q: [B, T, H, D] after RoPE; k_all, v_all: [L, B, Hkv, S, D] (slot index = token position)
  already holding the chunk at [chunk_start, chunk_start + T). Returns [B, T, H, D].
  """
  batch, num_new = q.shape[:2]
  num_kv_heads, capacity, head_dim = k_all.shape[2], k_all.shape[3], k_all.shape[4]
  block = min(block, capacity)
  if capacity % block:
    raise ValueError(f"cache capacity {capacity} is not a multiple of the attention block {block}")
  # [B, Hkv, G, T, D] once, outside the loop: contracting the [B, T, Hkv, G, D] layout in every
  # block visit ran at half the speed on a CPU (XLA transposed it each time).
  grouped = _grouped_queries(q, num_kv_heads).transpose(0, 2, 3, 1, 4)
  num_blocks = (jnp.max(chunk_start) + num_new + block - 1) // block
  # Blocks wholly before every row's chunk are visible to every query: they skip the mask (the
  # masked visit costs ~2x an unmasked one on a CPU), so only the last few blocks pay for it.
  num_unmasked = jnp.min(chunk_start) // block

  def visit(i, carry, masked: bool):
    running_max, denom, acc = carry  # [B, Hkv, G, T], [B, Hkv, G, T], [B, Hkv, G, T, D]
    start = i * block
    window = (1, batch, num_kv_heads, block, head_dim)
    k = jax.lax.dynamic_slice(k_all, (layer, 0, 0, start, 0), window)[0]
    v = jax.lax.dynamic_slice(v_all, (layer, 0, 0, start, 0), window)[0]
    scores = jnp.einsum("bkgtd,bksd->bkgts", grouped, k.astype(jnp.float32))
    if masked:
      key_positions = jnp.broadcast_to(start + jnp.arange(block), (batch, block))
      mask = visible_mask(chunk_start, chunk_mask, key_positions)[:, None, None]
      scores = jnp.where(mask, scores, _MASKED)
    new_max = jnp.maximum(running_max, scores.max(-1))
    weights = jnp.exp(scores - new_max[..., None])
    if masked:  # a row that saw no key yet has new_max = _MASKED, and exp(0) = 1 there
      weights = jnp.where(mask, weights, 0.0)
    rescale = jnp.exp(running_max - new_max)
    denom = denom * rescale + weights.sum(-1)
    acc = acc * rescale[..., None] + jnp.einsum("bkgts,bksd->bkgtd", weights,
                                                v.astype(jnp.float32))
    return new_max, denom, acc

  stats_shape = grouped.shape[:4]
  init = (jnp.full(stats_shape, _MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
          jnp.zeros(stats_shape + (head_dim,), jnp.float32))
  carry = jax.lax.fori_loop(0, num_unmasked, functools.partial(visit, masked=False), init)
  _, denom, acc = jax.lax.fori_loop(num_unmasked, num_blocks, functools.partial(visit, masked=True),
                                    carry)
  return _ungroup(acc / denom[..., None], k_all.dtype)  # every query sees itself: denom > 0
