"""KV caches as explicit pytrees.

The cache is preallocated to a static capacity; only `length` is dynamic, so committing or rolling back
tokens is a length change and never a copy.
"""

import flax.struct
import jax
import jax.numpy as jnp

from budgetdraft.models.config import ModelConfig


@flax.struct.dataclass
class FullKVCache:
  """Keys (after RoPE) and values of every past token.

  k, v: [layers, batch, kv_heads, capacity, head_dim]; length: [batch] int32, the number of valid
  entries per row (entries at index >= length are stale and never attended to).
  """

  k: jax.Array
  v: jax.Array
  length: jax.Array

  @classmethod
  def init(cls, config: ModelConfig, batch_size: int, capacity: int) -> "FullKVCache":
    """Zeroed cache; capacity is rounded up to a multiple of the attention block."""
    block = config.attention_block
    capacity = -(-capacity // block) * block
    shape = (config.num_layers, batch_size, config.num_kv_heads, capacity, config.head_dim)
    return cls(k=jnp.zeros(shape, config.dtype), v=jnp.zeros(shape, config.dtype),
               length=jnp.zeros((batch_size,), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.k.shape[3]

  @property
  def batch_size(self) -> int:
    return self.k.shape[1]

  def truncate(self, length: jax.Array) -> "FullKVCache":
    """Keeps the first `length` entries of each row: the commit/rollback of speculative decoding."""
    return self.replace(length=jnp.asarray(length, jnp.int32))

  def nbytes(self) -> int:
    return self.k.nbytes + self.v.nbytes
