"""KV caches as explicit pytrees with one protocol (`KVCache`): write a chunk's keys, attend to them.

Caches are preallocated to a static capacity and `length` (the position of the next token) is the
only dynamic size, so committing or rolling back tokens is a length change, never a copy. The model
only uses the protocol, so it runs unchanged on the verifier's full cache, on the drafter's sparse
cache, and on the masked full cache that stands in for a sparse one in training.
"""

import math
from typing import Protocol, Self

import flax.struct
import jax
import jax.numpy as jnp

from budgetdraft import cpu_kernels
from budgetdraft.models import attention
from budgetdraft.models.config import ModelConfig
import pallas_kernels


class KVCache(Protocol):
  """What the model and the decoding loops need of a cache. Every method returns a new cache.

  length: [B] int32, the position of each row's next token.
  """

  length: jax.Array

  def write(self, layer, k, v, positions) -> Self:
    """Stores k, v: [B, T, Hkv, D] of the chunk at `positions` [B, T] (starting at `length`)."""

  def attend(self, layer, q, chunk_mask) -> jax.Array:
    """Attention [B, T, H, D] of q [B, T, H, D] (chunk_mask [B, T, T] or None = causal)."""

  def attend_with_probs(self, layer, q, chunk_mask) -> tuple[jax.Array, jax.Array]:
    """`attend` plus the probabilities [B, Hkv, G, T, S] over the cache's slots."""

  def truncate(self, length) -> Self:
    """Keeps the first `length` positions of each row (rollback)."""

  def advance(self, num_new: int) -> Self:
    """Commits `num_new` written positions."""

  def gather_rows(self, rows) -> Self:
    """The cache of batch rows `rows` [N] (rows may repeat)."""

  def nbytes(self) -> int:
    """Bytes held on the device."""


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


# Up to this many new queries, a per-layer cache attends with one dense softmax over its slots
# (decode and verify steps: no block loop, no block copies); longer chunks (prefill) use blocks.
_DENSE_QUERIES = 16


def _causal_if_none(chunk_mask, batch: int, num_new: int):
  if chunk_mask is not None:
    return chunk_mask
  return jnp.broadcast_to(jnp.tril(jnp.ones((num_new, num_new), bool)), (batch, num_new, num_new))


class _Length:
  """Commit / rollback by length (`length` = next position), shared by the full and sparse caches."""

  def truncate(self, length):
    """Keeps the first `length` positions of each row."""
    return self.replace(length=jnp.broadcast_to(jnp.asarray(length, jnp.int32), self.length.shape))

  def advance(self, num_new: int):
    return self.replace(length=self.length + num_new)


@flax.struct.dataclass
class FullKVCache(_Length):
  """Keys (after RoPE) and values of every past token, in position order.

  k, v: [layers, batch, kv_heads, capacity, head_dim], or, for an unrolled model
  (`config.unroll_layers`, the decoding layout), a tuple of per-layer [batch, kv_heads, capacity,
  head_dim] arrays that a step reads and writes in place; length: [batch] int32 position of the
  next token. skipped: [batch] prompt positions never stored (a speculative prefill keeps a
  subset of the prompt, `specprefill`), so slot = position - skipped; 0 for an ordinary prefill.
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  length: jax.Array
  skipped: jax.Array
  attention_block: int = flax.struct.field(pytree_node=False, default=512)
  attention_impl: str = flax.struct.field(pytree_node=False, default="auto")

  @classmethod
  def init(cls, config: ModelConfig, batch_size: int, capacity: int) -> "FullKVCache":
    """Zeroed cache (per-layer arrays for an unrolled config); capacity is rounded up to a
    multiple of the attention block."""
    capacity = _round_up(capacity, config.attention_block)
    shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
    if config.unroll_layers:
      zeros = lambda: tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
    else:
      zeros = lambda: jnp.zeros((config.num_layers,) + shape, config.dtype)
    return cls(k=zeros(), v=zeros(), length=jnp.zeros((batch_size,), jnp.int32),
               skipped=jnp.zeros((batch_size,), jnp.int32),
               attention_block=config.attention_block, attention_impl=config.attention_impl)

  @property
  def layered(self) -> bool:
    """Whether k and v are tuples of per-layer arrays (the decoding layout)."""
    return isinstance(self.k, tuple)

  @property
  def capacity(self) -> int:
    return self.k[0].shape[2] if self.layered else self.k.shape[3]

  @property
  def batch_size(self) -> int:
    return self.k[0].shape[0] if self.layered else self.k.shape[1]

  @property
  def filled(self):
    """[B] slots in use: the slot of the next token."""
    return self.length - self.skipped

  def write(self, layer, k, v, positions) -> "FullKVCache":
    """Stores k, v: [B, T, Hkv, D] at the next T slots; writes past capacity drop."""
    del positions  # slots follow the chunk order; tree positions only affect RoPE
    rows = jnp.arange(k.shape[0])[:, None]
    slots = self.filled[:, None] + jnp.arange(k.shape[1])[None, :]
    if not self.layered:
      store = lambda stack, new: stack.at[layer, rows, :, slots].set(new.astype(stack.dtype),
                                                                      mode="drop")
      return self.replace(k=store(self.k, k), v=store(self.v, v))

    if k.shape[1] == 1:
      # One token: XLA:CPU turns a one-slot scatter into a dynamic-update-slice that it then
      # copies the whole layer array around (measured: 3x slower steps). Writing the token twice,
      # at its slot and the next one (past the length: unread, and overwritten by the next token;
      # dropped at capacity), keeps it a scatter, which updates in place.
      k, v = jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1)
      slots = self.filled[:, None] + jnp.arange(2)[None, :]

    def store(layers, new):  # the layer's own array; `layer` is a static index here
      layers = list(layers)
      layers[layer] = layers[layer].at[rows, :, slots].set(new.astype(layers[layer].dtype),
                                                           mode="drop")
      return tuple(layers)
    return self.replace(k=store(self.k, k), v=store(self.v, v))

  def attend(self, layer, q, chunk_mask):
    """Attention of q [B, T, H, D] over the cache (chunk_mask None = causal)."""
    if attention.uses_kernels(self.attention_impl) and chunk_mask is None:
      return self._attend_pallas(layer, q)
    if self.layered and q.shape[1] <= _DENSE_QUERIES:
      if (attention.uses_cpu_kernels(self.attention_impl) and
          cpu_kernels.supports_attention(q.shape[-1], self.capacity, q.shape[1])):
        return cpu_kernels.decode_attention(
            q, self.k[layer], self.v[layer], self.filled,
            _causal_if_none(chunk_mask, *q.shape[:2])).astype(q.dtype)
      return self.attend_with_probs(layer, q, chunk_mask)[0]
    chunk_mask = _causal_if_none(chunk_mask, *q.shape[:2])
    k, v, layer = ((self.k[layer][None], self.v[layer][None], 0) if self.layered
                   else (self.k, self.v, layer))
    return attention.chunked_attention(q, k, v, layer, self.filled, chunk_mask,
                                       self.attention_block)

  def _attend_pallas(self, layer, q):
    """Causal attention as one query block visiting every KV block up to the chunk's end."""
    batch, num_new = q.shape[:2]
    block = min(self.attention_block, self.capacity)
    num_blocks = self.capacity // block
    num_kv_heads = self.k[layer].shape[1]
    table = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32),
                             (batch, num_kv_heads, 1, num_blocks))
    counts = jnp.broadcast_to(((self.filled + num_new + block - 1) // block)[:, None, None],
                              (batch, num_kv_heads, 1)).astype(jnp.int32)
    keep = jnp.ones((batch, num_kv_heads, self.capacity), jnp.int32)
    slots = self.filled[:, None] + jnp.arange(num_new)[None, :]
    kernel = lambda *args: pallas_kernels.block_sparse_attention(*args, block_q=num_new,
                                                                 block_k=block)
    return attention.on_local_shards(
        kernel, (q, self.k[layer], self.v[layer], slots, keep, table, counts),
        attention.BLOCK_SPARSE_AXES[:-1], attention.QUERIES)  # no ring

  def attend_with_probs(self, layer, q, chunk_mask):
    """Dense attention over every slot (the probabilities feed KV selection scores)."""
    chunk_mask = _causal_if_none(chunk_mask, *q.shape[:2])
    slots = jnp.broadcast_to(jnp.arange(self.capacity), (self.batch_size, self.capacity))
    visible = attention.visible_mask(self.filled, chunk_mask, slots)[:, None]
    return attention.dense_attention(q, self.k[layer], self.v[layer], visible)

  def map_slots(self, fn) -> "FullKVCache":
    """The cache with fn applied to k and v as [..., B, Hkv, S, D] arrays (per layer or stacked)."""
    return self.replace(k=jax.tree.map(fn, self.k), v=jax.tree.map(fn, self.v))

  def reserve(self, capacity: int) -> "FullKVCache":
    """This cache with room for `capacity` positions: itself if it has it, else a padded copy."""
    if capacity <= self.capacity:
      return self
    extra = _round_up(capacity, self.attention_block) - self.capacity
    return self.map_slots(lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)]))

  def gather_rows(self, rows) -> "FullKVCache":
    return self.map_slots(lambda x: jnp.take(x, rows, axis=x.ndim - 4)).replace(
        length=self.length[rows], skipped=self.skipped[rows])

  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves((self.k, self.v)))


@flax.struct.dataclass
class SparseKVCache(_Length):
  """A drafter cache holding a kept subset of the prompt plus a ring of recent tokens.

  k, v: [layers, batch, kv_heads, capacity, head_dim]; positions: [layers, batch, kv_heads,
  capacity] original token position of each slot (-1 = empty); length: [batch] position of the next
  token. Slots [0, budget) hold the kept prompt keys (sink + selected + window, per layer and KV
  head); tokens at positions >= ring_base go to slot budget + (position - ring_base) % ring_size,
  so the ring always holds the last ring_size - gamma committed tokens even after rejected drafts.
  Keys are stored after RoPE at their original positions: a query sees true relative distances.
  """

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  length: jax.Array
  ring_base: jax.Array  # [batch] first position that lives in the ring (the prompt length)
  budget: int = flax.struct.field(pytree_node=False, default=0)
  attention_impl: str = flax.struct.field(pytree_node=False, default="auto")

  @classmethod
  def init(cls, config: ModelConfig, batch_size: int, budget: int,
           ring_size: int) -> "SparseKVCache":
    """Empty cache (no kept keys, empty ring, compression point 0)."""
    capacity = budget + ring_size
    shape = (config.num_layers, batch_size, config.num_kv_heads, capacity, config.head_dim)
    return cls(k=jnp.zeros(shape, config.dtype), v=jnp.zeros(shape, config.dtype),
               positions=jnp.full(shape[:4], -1, jnp.int32),
               length=jnp.zeros((batch_size,), jnp.int32),
               ring_base=jnp.zeros((batch_size,), jnp.int32), budget=budget,
               attention_impl=config.attention_impl)

  @property
  def capacity(self) -> int:
    return self.k.shape[3]

  @property
  def ring_size(self) -> int:
    return self.capacity - self.budget

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  def write(self, layer, k, v, positions) -> "SparseKVCache":
    """Stores k, v: [B, T, Hkv, D] of tokens at `positions` [B, T] in their ring slots.

    Tokens before ring_base (prompt tokens, re-fed by the decoding loop) are dropped: the prompt
    region already holds them if they were kept.
    """
    rows = jnp.arange(k.shape[0])[:, None]
    offset = positions - self.ring_base[:, None]
    slots = jnp.where(offset >= 0, self.budget + offset % self.ring_size, self.capacity)
    num_kv_heads = k.shape[2]
    stored_positions = jnp.broadcast_to(positions[:, :, None], positions.shape + (num_kv_heads,))
    return self.replace(
        k=self.k.at[layer, rows, :, slots].set(k.astype(self.k.dtype), mode="drop"),
        v=self.v.at[layer, rows, :, slots].set(v.astype(self.v.dtype), mode="drop"),
        positions=self.positions.at[layer, rows, :, slots].set(stored_positions, mode="drop"))

  def attend(self, layer, q, chunk_mask):
    """Attention of q [B, T, H, D] over the kept keys and the ring (chunk_mask None = causal)."""
    if attention.uses_kernels(self.attention_impl) and chunk_mask is None:
      query_positions = self.length[:, None] + jnp.arange(q.shape[1])[None, :]
      return attention.on_local_shards(
          pallas_kernels.sparse_decode_attention,
          (q, self.k[layer], self.v[layer], self.positions[layer], query_positions),
          attention.SPARSE_DECODE_AXES, attention.QUERIES)
    return self.attend_with_probs(layer, q, chunk_mask)[0]

  def attend_with_probs(self, layer, q, chunk_mask):
    chunk_mask = _causal_if_none(chunk_mask, *q.shape[:2])
    visible = attention.visible_mask(self.length, chunk_mask, self.positions[layer])
    return attention.dense_attention(q, self.k[layer], self.v[layer], visible)

  def gather_rows(self, rows) -> "SparseKVCache":
    return self.replace(k=self.k[:, rows], v=self.v[:, rows], positions=self.positions[:, rows],
                        length=self.length[rows], ring_base=self.ring_base[rows])

  def nbytes(self) -> int:
    return self.k.nbytes + self.v.nbytes + self.positions.nbytes


@flax.struct.dataclass
class MaskedKVCache:
  """A full cache seen through a sparse cache's eyes: the differentiable twin of `SparseKVCache`.

  Training cannot gather a different kept set per budget and differentiate through the gather and
  the ring, so it keeps every key and masks instead: a query at position i sees key j iff j <= i and
  (keep[layer, b, h, j], or j >= ring_base and i - j < ring_size) -- exactly the keys the sparse
  cache would hold after compressing at ring_base and then feeding tokens one at a time. One masked
  softmax over all slots (no dynamic loop), so reverse-mode differentiation works; with
  the kernels (`attention.uses_kernels`), the block-sparse kernel (keep mask + per-query ring) and
  its custom VJP.

  cache: the underlying `FullKVCache` (slot = position); keep: [L, B, Hkv, capacity] bool (all True
  = the full cache); ring_base: [B] the compression point (the prompt length).
  """

  cache: FullKVCache
  keep: jax.Array
  ring_base: jax.Array
  ring_size: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def length(self):
    return self.cache.length

  def truncate(self, length) -> "MaskedKVCache":
    return self.replace(cache=self.cache.truncate(length))

  def advance(self, num_new: int) -> "MaskedKVCache":
    return self.replace(cache=self.cache.advance(num_new))

  def write(self, layer, k, v, positions) -> "MaskedKVCache":
    return self.replace(cache=self.cache.write(layer, k, v, positions))

  def gather_rows(self, rows) -> "MaskedKVCache":
    return self.replace(cache=self.cache.gather_rows(rows), keep=self.keep[:, rows],
                        ring_base=self.ring_base[rows])

  def nbytes(self) -> int:
    return self.cache.nbytes() + self.keep.nbytes

  def attend(self, layer, q, chunk_mask):
    """Attention of q [B, T, H, D] over the visible keys (chunk_mask None = causal)."""
    if attention.uses_kernels(self.cache.attention_impl) and chunk_mask is None:
      return self._attend_pallas(layer, q)
    return self.attend_with_probs(layer, q, chunk_mask)[0]

  def _attend_pallas(self, layer, q):
    """The block-sparse kernel (differentiable by its custom VJP): the kept keys as its keep mask,
    the ring as each query's `ring_from`; query blocks visit every KV block up to their end."""
    batch, num_new = q.shape[:2]
    cache = self.cache
    block_k = min(cache.attention_block, cache.capacity)
    block_q = math.gcd(num_new, 128)
    num_q_blocks, num_kv_heads = num_new // block_q, cache.k.shape[2]
    query_positions = self.length[:, None] + jnp.arange(num_new)[None, :]
    last = query_positions.reshape(batch, num_q_blocks, block_q)[..., -1]
    counts = jnp.broadcast_to((last // block_k + 1)[:, None].astype(jnp.int32),
                              (batch, num_kv_heads, num_q_blocks))
    num_blocks = cache.capacity // block_k
    table = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32),
                             (batch, num_kv_heads, num_q_blocks, num_blocks))
    ring_from = jnp.maximum(self.ring_base[:, None], query_positions - self.ring_size + 1)
    kernel = lambda *args: pallas_kernels.block_sparse_attention(
        *args[:-1], block_q=block_q, block_k=block_k, ring_from=args[-1])
    args = (q, cache.k[layer], cache.v[layer], query_positions, self.keep[layer], table, counts,
            ring_from)
    return attention.on_local_shards(kernel, args, attention.BLOCK_SPARSE_AXES, attention.QUERIES)

  def attend_with_probs(self, layer, q, chunk_mask):
    batch, num_new = q.shape[:2]
    chunk_mask = _causal_if_none(chunk_mask, batch, num_new)
    key_positions = jnp.broadcast_to(jnp.arange(self.cache.capacity), (batch, self.cache.capacity))
    causal = attention.visible_mask(self.length, chunk_mask, key_positions)  # [B, T, S]
    query_positions = self.length[:, None] + jnp.arange(num_new)[None, :]
    distance = query_positions[:, :, None] - key_positions[:, None, :]
    in_ring = (key_positions >= self.ring_base[:, None])[:, None, :] & (distance < self.ring_size)
    visible = causal[:, None] & (self.keep[layer][:, :, None, :] | in_ring[:, None])
    return attention.dense_attention(q, self.cache.k[layer], self.cache.v[layer], visible)
