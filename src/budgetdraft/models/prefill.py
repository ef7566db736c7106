"""Prefill and teacher forcing: running known tokens through the model into a cache.

`prefill` runs a long prompt `prefill_chunk` tokens at a time, so peak activation memory is that of
one chunk (a 16K prompt fits a laptop) and the chunks share one compiled step (`lax.scan`).
`prefill_cache` + `continuation_logits` give the logits of a known continuation after a prompt over
any cache (the verifier's full one, or a drafter's compressed one): the training teacher and the
acceptance measurement both use them; `negative_log_likelihood` scores whole sequences (perplexity,
pruning). `pad_prompts` and `check_request` are the request boundary
shared by the decoding loops.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache, KVCache
from budgetdraft.models.transformer import Transformer


def prefill(model: Transformer, params, prompt, prompt_lengths, cache: FullKVCache,
            prefill_chunk: int, positions=None, features=None, keep_hidden: bool = False):
  """Appends right-padded prompts to the cache.

  prompt: [B, T] (row b valid up to prompt_lengths[b] >= 1); positions: [B, T] increasing RoPE
  positions of the tokens (None: consecutive from the cache's length; a speculative prefill passes
  the original positions of the tokens it keeps); features: [B, T, F] for a model with a feature
  input (`feature_inputs`). Returns (logits [B, V] float32 after each row's last prompt token,
  cache with length += prompt_lengths), and hidden [B, T, dim] of every token if keep_hidden.
  """
  batch, prompt_len = prompt.shape
  num_chunks = -(-prompt_len // prefill_chunk)
  if positions is None:
    positions = cache.length[:, None] + jnp.arange(prompt_len)[None, :]
  pad = num_chunks * prefill_chunk - prompt_len
  as_chunks = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape(
      (batch, num_chunks, prefill_chunk) + x.shape[2:]).swapaxes(0, 1)
  chunks = as_chunks(prompt)
  offsets = jnp.arange(num_chunks) * prefill_chunk
  feature_chunks = as_chunks(features) if features is not None else jnp.zeros((num_chunks,))

  def step(carry, xs):
    cache, last_hidden = carry
    tokens, positions, offset, chunk_features = xs
    start = cache.length
    hidden, cache = model.apply({"params": params}, tokens, positions, cache,
                                features=chunk_features if features is not None else None)
    num_valid = jnp.clip(prompt_lengths - offset, 0, prefill_chunk)
    last_index = prompt_lengths - 1 - offset
    holds_last = (last_index >= 0) & (last_index < prefill_chunk)
    picked = jnp.take_along_axis(hidden, jnp.clip(last_index, 0, prefill_chunk - 1)[:, None, None],
                                 axis=1)[:, 0]
    last_hidden = jnp.where(holds_last[:, None], picked, last_hidden)
    return (cache.truncate(start + num_valid), last_hidden), hidden if keep_hidden else None

  init_hidden = jnp.zeros((batch, model.config.dim), model.config.dtype)
  (cache, last_hidden), hidden = jax.lax.scan(
      step, (cache, init_hidden), (chunks, as_chunks(positions), offsets, feature_chunks))
  logits = model.apply({"params": params}, last_hidden, method=Transformer.logits)
  if keep_hidden:
    hidden = hidden.swapaxes(0, 1).reshape(batch, num_chunks * prefill_chunk, -1)[:, :prompt_len]
    return logits, cache, hidden
  return logits, cache


def feature_inputs(hidden):
  """The feature input of an EAGLE-style drafter from the verifier's hidden states [B, T, dim]:
  position t sees the state at t - 1 (the one that predicted token t), position 0 sees zeros."""
  return jnp.pad(hidden, ((0, 0), (1, 0), (0, 0)))[:, :-1]


@functools.partial(jax.jit, static_argnames=("config", "capacity", "prefill_chunk"))
def prefill_cache(params, prompt, *, config: ModelConfig, capacity: int,
                  prefill_chunk: int) -> FullKVCache:
  """A full cache of `capacity` positions holding the prompt [B, P] (every row P tokens long)."""
  lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
  _, cache = prefill(Transformer(config), params, prompt, lengths,
                     FullKVCache.init(config, prompt.shape[0], capacity), prefill_chunk)
  return cache


@functools.partial(jax.jit, static_argnames=("config",))
def continuation_logits(params, cache: KVCache, continuation, *, config: ModelConfig):
  """Logits [B, C, V] of the continuation [B, C] fed, teacher-forced, after what `cache` holds."""
  model = Transformer(config)
  positions = cache.length[:, None] + jnp.arange(continuation.shape[1])[None, :]
  hidden, _ = model.apply({"params": params}, continuation, positions, cache)
  return model.apply({"params": params}, hidden, method=Transformer.logits)


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


def pad_prompts(prompts: list[list[int]], pad_id: int, vocab_size: int):
  """Right-pads token lists into ([B, T] int32, lengths [B] int32); every id must be a token."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  check_token_id("pad_id", pad_id, vocab_size)
  for row, tokens in enumerate(prompts):
    ids = np.asarray(tokens)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
      raise ValueError(f"prompt {row} holds token id {ids[bad[0]]} at position {bad[0]}, outside "
                       f"the model's vocabulary [0, {vocab_size})")
  width = max(len(p) for p in prompts)
  prompt = np.full((len(prompts), width), pad_id, np.int32)
  for row, p in zip(prompt, prompts):
    row[:len(p)] = p
  return jnp.asarray(prompt), jnp.asarray([len(p) for p in prompts], jnp.int32)


def check_token_id(name: str, token_id: int | None, vocab_size: int) -> None:
  """Refuses a special id (pad, EOS) outside the vocabulary; None means unset."""
  if token_id is not None and not 0 <= token_id < vocab_size:
    raise ValueError(f"{name}={token_id} is not a token id of the model's vocabulary "
                     f"[0, {vocab_size})")


def check_request(config: ModelConfig, prompt_len: int, max_new_tokens: int,
                  prefill_chunk: int) -> int:
  """Validates a generation request at the boundary; returns the cache capacity it needs."""
  if prompt_len < 1 or max_new_tokens < 1 or prefill_chunk < 1:
    raise ValueError(f"prompt_len={prompt_len}, max_new_tokens={max_new_tokens} and "
                     f"prefill_chunk={prefill_chunk} must all be >= 1")
  if prompt_len + max_new_tokens > config.max_context:
    raise ValueError(
        f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
        f"context of {config.max_context} tokens; shorten the prompt or override max_context")
  return request_capacity(prompt_len, max_new_tokens, prefill_chunk)


def request_capacity(prompt_len: int, max_new_tokens: int, prefill_chunk: int) -> int:
  """Cache positions a request writes: whole prefill chunks, then the new tokens."""
  return -(-prompt_len // prefill_chunk) * prefill_chunk + max_new_tokens
