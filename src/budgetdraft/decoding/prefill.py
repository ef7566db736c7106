"""Chunked prefill: a long prompt runs through the model `chunk_size` tokens at a time.

Peak activation memory is that of one chunk, so a 16K prompt fits a laptop; the chunks share one
compiled step (`lax.scan`).
"""

import jax
import jax.numpy as jnp

from budgetdraft.kv_cache import FullKVCache
from budgetdraft.models.transformer import Transformer


def prefill(model: Transformer, params, prompt, prompt_lengths, cache: FullKVCache,
            chunk_size: int):
  """Appends right-padded prompts to the cache.

  prompt: [B, T] (row b valid up to prompt_lengths[b] >= 1). Returns (logits [B, V] float32 after
  each row's last prompt token, cache with length += prompt_lengths).
  """
  batch, prompt_len = prompt.shape
  num_chunks = -(-prompt_len // chunk_size)
  padded = jnp.pad(prompt, ((0, 0), (0, num_chunks * chunk_size - prompt_len)))
  chunks = padded.reshape(batch, num_chunks, chunk_size).transpose(1, 0, 2)
  offsets = jnp.arange(num_chunks) * chunk_size

  def step(carry, xs):
    cache, last_hidden = carry
    tokens, offset = xs
    start = cache.length
    positions = start[:, None] + jnp.arange(chunk_size)[None, :]
    hidden, cache = model.apply({"params": params}, tokens, positions, cache)
    num_valid = jnp.clip(prompt_lengths - offset, 0, chunk_size)
    last_index = prompt_lengths - 1 - offset
    holds_last = (last_index >= 0) & (last_index < chunk_size)
    picked = jnp.take_along_axis(hidden, jnp.clip(last_index, 0, chunk_size - 1)[:, None, None],
                                 axis=1)[:, 0]
    last_hidden = jnp.where(holds_last[:, None], picked, last_hidden)
    return (cache.truncate(start + num_valid), last_hidden), None

  init_hidden = jnp.zeros((batch, model.config.dim), model.config.dtype)
  (cache, last_hidden), _ = jax.lax.scan(step, (cache, init_hidden), (chunks, offsets))
  logits = model.apply({"params": params}, last_hidden, method=Transformer.logits)
  return logits, cache


def check_request(config, prompt_len: int, max_new_tokens: int, chunk_size: int) -> int:
  """Validates a generation request at the boundary; returns the cache capacity it needs."""
  if prompt_len < 1 or max_new_tokens < 1 or chunk_size < 1:
    raise ValueError(f"prompt_len={prompt_len}, max_new_tokens={max_new_tokens} and "
                     f"chunk_size={chunk_size} must all be >= 1")
  if prompt_len + max_new_tokens > config.max_context:
    raise ValueError(
        f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
        f"context of {config.max_context} tokens; shorten the prompt or override max_context")
  return -(-prompt_len // chunk_size) * chunk_size + max_new_tokens
