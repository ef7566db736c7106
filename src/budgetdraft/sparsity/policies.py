"""KV selection policies: each is a score function, prompt keys [L, B, Hkv, S] -> importance.

- streaming (StreamingLLM): recency; with the forced sinks this keeps sinks + the latest tokens.
- snapkv (SnapKV): attention mass from the last `observation` prompt queries, average-pooled over
  neighbouring key positions so that kept keys come with their context.
- h2o (H2O): attention mass accumulated over every prompt query (heavy hitters).
- lookahead (SpecPrefill / Lookahead Q-Cache): attention mass from the queries of a few tokens the
  drafter itself generates after the prompt, a proxy of the queries decoding will actually issue.
- chunk_retrieval (TriForce, BudgetDraft's published setting): chunks of `chunk` prompt positions,
  scored per layer and KV head by the last prompt key (a proxy of the next query) . the chunk's
  mean key; chunk 0 always kept. No forward pass: it reads the prefilled keys.
- random: a control.
Scores come from the drafter's own forward passes over its prefilled full cache (`key_scores`); an
EAGLE-style drafter's passes also take its feature inputs over the prompt (`features`).
Every score function has the signature of `policy_scores`; `POLICIES` is the registry.
"""

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.transformer import Transformer

if TYPE_CHECKING:
  from budgetdraft.sparsity.selection import SparsityConfig


def key_scores(config: ModelConfig, params, cache: FullKVCache, tokens, positions, features=None):
  """Attention mass each cached key receives from queries `tokens` at `positions` [B, T].

  The tokens' own keys are (re)written at their positions first, exactly as in a forward pass.
  Returns (scores [L, B, Hkv, S], hidden [B, T, dim], cache).
  """
  (hidden, cache), sown = Transformer(config).apply(
      {"params": params}, tokens, positions, cache.truncate(positions[:, 0]),
      features=features, mutable="intermediates")
  return sown["intermediates"]["key_scores"][0], hidden, cache


def _last_tokens(prompt, prompt_lengths, count):
  """The last `count` tokens of each right-padded prompt row, and their positions."""
  positions = jnp.maximum(prompt_lengths[:, None] - count + jnp.arange(count)[None, :], 0)
  return jnp.take_along_axis(prompt, positions, axis=1), positions


def _rows_at(features, positions):
  """features [B, T, F] at positions [B, N] (None stays None)."""
  if features is None:
    return None
  return jnp.take_along_axis(features, positions[..., None], axis=1)


def streaming_scores(config, params, cache, prompt, prompt_lengths, sparsity, rng, features=None):
  del config, params, prompt, prompt_lengths, sparsity, rng, features
  shape = cache.k.shape[:3] + (cache.capacity,)
  return jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.float32), shape)


def random_scores(config, params, cache, prompt, prompt_lengths, sparsity, rng, features=None):
  del config, params, prompt, prompt_lengths, sparsity, features
  return jax.random.uniform(rng, cache.k.shape[:3] + (cache.capacity,))


def chunk_retrieval_scores(config, params, cache, prompt, prompt_lengths, sparsity, rng,
                           features=None):
  """Every position gets its chunk's score (last key . chunk-mean key); chunk 0 gets +inf.

  With whole chunks tied and ties going to the earlier position, `selection.keep_mask` then keeps
  whole chunks, best first. The last, partial chunk of a prompt averages its valid keys only.
  """
  del config, params, prompt, rng, features
  chunk = sparsity.chunk
  layers, batch, kv_heads, capacity, head_dim = cache.k.shape
  num_chunks = -(-capacity // chunk)
  keys = cache.k.astype(jnp.float32)
  valid = jnp.arange(capacity)[None, :] < prompt_lengths[:, None]  # [B, S]
  keys = jnp.where(valid[None, :, None, :, None], keys, 0.0)
  pad = [(0, 0)] * 3 + [(0, num_chunks * chunk - capacity), (0, 0)]
  sums = jnp.pad(keys, pad).reshape(layers, batch, kv_heads, num_chunks, chunk, head_dim).sum(4)
  counts = jnp.pad(valid, [(0, 0), (0, num_chunks * chunk - capacity)]).reshape(
      batch, num_chunks, chunk).sum(-1)
  means = sums / jnp.maximum(counts, 1)[None, :, None, :, None]
  last = jnp.maximum(prompt_lengths - 1, 0)[None, :, None, None, None]
  last_key = jnp.take_along_axis(keys, jnp.broadcast_to(last, keys.shape[:3] + (1, head_dim)),
                                 axis=3)[:, :, :, 0]  # [L, B, Hkv, D]
  scores = jnp.einsum("lbhd,lbhcd->lbhc", last_key, means)
  scores = jnp.where(jnp.arange(num_chunks) == 0, jnp.inf, scores)
  return jnp.repeat(scores, chunk, axis=-1)[..., :capacity]


def snapkv_scores(config, params, cache, prompt, prompt_lengths, sparsity, rng, features=None):
  del rng
  tokens, positions = _last_tokens(prompt, prompt_lengths, sparsity.observation)
  scores, _, _ = key_scores(config, params, cache, tokens, positions,
                            _rows_at(features, positions))
  pooled = jax.lax.reduce_window(scores, 0.0, jax.lax.add, (1, 1, 1, sparsity.pool),
                                 (1, 1, 1, 1), "SAME")
  return pooled / sparsity.pool


def h2o_scores(config, params, cache, prompt, prompt_lengths, sparsity, rng, features=None):
  """Chunk by chunk (unrolled), each chunk's queries over the slots up to its end: the later
  keys are causally invisible, and attending to them too doubled the scoring time. The last
  chunk is only as wide as the prompt, so no padding query adds mass; a ragged batch's shorter
  rows still get their own pad tokens' mass (spread over their keys)."""
  del rng, prompt_lengths
  total = jnp.zeros(cache.k.shape[:3] + (cache.capacity,), jnp.float32)
  for start in range(0, prompt.shape[1], sparsity.score_chunk):
    end = min(start + sparsity.score_chunk, prompt.shape[1])
    tokens = prompt[:, start:end]
    positions = jnp.broadcast_to(jnp.arange(start, end), tokens.shape)
    prefix = cache.map_slots(lambda x, end=end: x[..., :end, :])
    scores, _, _ = key_scores(config, params, prefix, tokens, positions,
                              _rows_at(features, positions))
    total = total.at[..., :end].add(scores)
  return total


def lookahead(config: ModelConfig, params, cache: FullKVCache, prompt, prompt_lengths,
              count: int):
  """Greedy look-ahead of `count` tokens after the prompt with the full cache.

  Returns (tokens [B, count], their positions, cache). The tokens are written past the prompt, so
  the cache is widened if it lacks the room.
  """
  model = Transformer(config)
  cache = cache.reserve(prompt.shape[1] + count)
  last, last_positions = _last_tokens(prompt, prompt_lengths, 1)
  hidden, cache = model.apply({"params": params}, last, last_positions,
                              cache.truncate(prompt_lengths - 1))
  tokens = []
  for step in range(count):
    logits = model.apply({"params": params}, hidden[:, -1], method=Transformer.logits)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens.append(token)
    if step + 1 < count:
      hidden, cache = model.apply({"params": params}, token[:, None],
                                  (prompt_lengths + step)[:, None], cache)
  positions = prompt_lengths[:, None] + jnp.arange(count)[None, :]
  return jnp.stack(tokens, axis=1), positions, cache


def attention_probs(config: ModelConfig, params, cache: FullKVCache, tokens, positions):
  """Every head's attention probabilities [L, B, Hkv, G, T, S] of queries `tokens` at `positions`
  [B, T] over the cache (their own keys (re)written first, as in `key_scores`)."""
  _, sown = Transformer(config).apply({"params": params}, tokens, positions,
                                      cache.truncate(positions[:, 0]), mutable="attention")
  return sown["attention"]["probs"][0]


def lookahead_scores(config, params, cache, prompt, prompt_lengths, sparsity, rng, features=None):
  """The attention mass the drafter's own `sparsity.lookahead` greedy next tokens give each key."""
  del rng
  if config.feature_dim:
    raise ValueError("the lookahead policy generates with the drafter alone; an EAGLE-style "
                     "drafter needs the verifier's hidden states: use snapkv, h2o or streaming")
  tokens, positions, cache = lookahead(config, params, cache, prompt, prompt_lengths,
                                       sparsity.lookahead)
  return key_scores(config, params, cache, tokens, positions)[0]


POLICIES = {"streaming": streaming_scores, "snapkv": snapkv_scores, "h2o": h2o_scores,
            "lookahead": lookahead_scores, "chunk_retrieval": chunk_retrieval_scores,
            "random": random_scores}


def policy_scores(config: ModelConfig, params, cache: FullKVCache, prompt, prompt_lengths,
                  sparsity: "SparsityConfig", rng, features=None):
  """Scores [L, B, Hkv, S >= prompt length] of `sparsity.policy` for a prefilled drafter cache.

  features: [B, T, F] feature inputs over the prompt, for a drafter with a feature input.
  """
  return POLICIES[sparsity.policy](config, params, cache, prompt, prompt_lengths, sparsity, rng,
                                   features=features)
