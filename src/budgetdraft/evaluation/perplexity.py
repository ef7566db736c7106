"""Perplexity of a model on token sequences (model quality, e.g. of a drafter cut or a pruned model)."""

import functools

import jax
import jax.numpy as jnp

from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.transformer import Transformer


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def negative_log_likelihood(params, tokens, *, config: ModelConfig, chunk_size: int = 512):
  """Mean next-token NLL (nats) of tokens [B, T] with T - 1 a multiple of chunk_size.

  Runs the cached model chunk by chunk, so memory holds one chunk's [chunk, V] logits at a time.
  """
  batch, length = tokens.shape
  if (length - 1) % chunk_size:
    raise ValueError(f"len(tokens) - 1 = {length - 1} must be a multiple of chunk_size={chunk_size}")
  model = Transformer(config)
  num_chunks = (length - 1) // chunk_size
  inputs = tokens[:, :-1].reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)
  targets = tokens[:, 1:].reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)

  def chunk_nll(cache, xs):
    chunk, target = xs
    positions = cache.length[:, None] + jnp.arange(chunk_size)[None]
    hidden, cache = model.apply({"params": params}, chunk, positions, cache)
    log_probs = jax.nn.log_softmax(model.apply({"params": params}, hidden,
                                               method=Transformer.logits))
    return cache, -jnp.take_along_axis(log_probs, target[..., None], -1)[..., 0].mean()

  cache = FullKVCache.init(config, batch, length - 1)
  _, nll = jax.lax.scan(chunk_nll, cache, (inputs, targets))
  return nll.mean()


def perplexity(params, tokens, *, config: ModelConfig, chunk_size: int = 512) -> float:
  return float(jnp.exp(negative_log_likelihood(params, tokens, config=config,
                                               chunk_size=chunk_size)))
