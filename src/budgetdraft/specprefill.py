"""Speculative prefill (SpecPrefill): a small model picks the prompt tokens the verifier prefills.

A scorer (any model sharing the tokenizer: a layer cut of the verifier, a trained drafter) prefills
the whole prompt, greedily looks `lookahead` tokens ahead, and reads every head's attention from
those queries to the prompt (`score`). Per (layer, head, query) the probabilities are renormalized
over the prompt and average-pooled over `pool` neighbouring positions; a token's importance is the
max over layers and heads, averaged over the queries. The prompt is cut into chunks of `chunk`
tokens, a chunk scores the mean of its tokens, and the best chunks (`keep_rate` of them, or
`keep_tokens` worth; the chunks holding the last `window` tokens always) go to the verifier, which
prefills only those at their original RoPE positions (`prefill_kept`). Its cache then holds just the
kept tokens (`FullKVCache.skipped` counts the rest) and decoding, AR or speculative, continues at
position P exactly as after a full prefill.

What stays exact: everything after the prefill. Speculative decoding from this cache is lossless
with respect to the verifier that saw the kept tokens (greedy speculative output equals greedy AR
output from the same pruned prefill). What does not: that verifier no longer sees the whole prompt,
so its outputs differ from a full prefill's by design (measured by `evaluation.specprefill`);
keep_rate = 1 reproduces the full prefill exactly.

The look-ahead probabilities summed over a KV group's heads and the queries are the `lookahead` KV
policy's scores (`kv_scores`): with that policy, one scoring pass also picks the drafter's kept
keys.
"""

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.prefill import prefill
from budgetdraft.models.transformer import Transformer
from budgetdraft.sparsity import policies
from budgetdraft.sparsity.selection import SparsityConfig


@dataclasses.dataclass(frozen=True)
class SpecPrefillConfig:
  """How much of the prompt the verifier prefills. keep_tokens > 0 overrides keep_rate."""

  keep_rate: float = 0.25  # fraction of the prompt's chunks kept, in (0, 1]
  keep_tokens: int = 0     # or a token budget (rounded up to whole chunks)
  chunk: int = 32          # tokens per selection unit
  window: int = 32         # last prompt tokens, always kept (the last one gives the first logits)
  lookahead: int = 8       # tokens the scorer generates; their queries vote
  pool: int = 13           # average-pooling width over positions, per head

  def __post_init__(self):
    if not (isinstance(self.keep_rate, (int, float)) and 0 < self.keep_rate <= 1):
      raise ValueError(f"keep_rate={self.keep_rate} must be in (0, 1] (1 = full prefill)")
    if self.keep_tokens < 0:
      raise ValueError(f"keep_tokens={self.keep_tokens} must be >= 0 (0 = use keep_rate)")
    for name in ("chunk", "window", "lookahead", "pool"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

  def wanted_chunks(self, num_chunks):
    """Chunks the keep rate or token budget asks of a prompt of `num_chunks` (an int or an array);
    the chunks of the always-kept window count among them."""
    if self.keep_tokens:
      return -(-self.keep_tokens // self.chunk)
    if isinstance(num_chunks, int):
      return math.ceil(num_chunks * self.keep_rate - 1e-6)
    return jnp.ceil(num_chunks * self.keep_rate - 1e-6).astype(jnp.int32)

  def max_kept_tokens(self, width: int) -> int:
    """Static bound on the tokens kept of a prompt `width` tokens wide."""
    num_chunks = -(-width // self.chunk)
    window_chunks = -(-self.window // self.chunk) + 1  # the window may straddle a boundary
    return min(num_chunks, max(self.wanted_chunks(num_chunks), window_chunks)) * self.chunk

  def shares_kv_scores(self, sparsity: SparsityConfig | None) -> bool:
    """Whether this scoring pass is also the drafter's KV policy (lookahead, same look-ahead)."""
    return (sparsity is not None and sparsity.policy == "lookahead"
            and sparsity.lookahead == self.lookahead)


def token_importance(probs, prompt_lengths, pool: int):
  """[B, P] importance of each prompt token from look-ahead attention probs [L, B, Hkv, G, T, S>=P].

  Renormalized over the prompt, pooled over `pool` positions, max over layers and heads, mean over
  the look-ahead queries (positions past a row's prompt score 0).
  """
  num_positions = probs.shape[-1]
  in_prompt = jnp.arange(num_positions)[None, :] < prompt_lengths[:, None]       # [B, S]
  context = jnp.where(in_prompt[None, :, None, None, None, :], probs, 0.0)
  context = context / jnp.maximum(context.sum(-1, keepdims=True), 1e-30)
  window = (1,) * (context.ndim - 1) + (pool,)
  pooled = jax.lax.reduce_window(context, 0.0, jax.lax.add, window, (1,) * context.ndim,
                                 "SAME") / pool
  per_query = pooled.max(axis=(0, 2, 3))                                         # [B, T, S]
  return jnp.where(in_prompt, per_query.mean(axis=1), 0.0)


@flax.struct.dataclass
class Scores:
  """The scorer's pass over the prompt."""

  importance: jax.Array  # [B, P] per prompt token
  kv_scores: jax.Array   # [L, B, Hkv, S] the lookahead KV policy's scores (scorer's layers)
  cache: FullKVCache     # the scorer's full cache of the prompt (+ look-ahead tokens)


@functools.partial(jax.jit, static_argnames=("config", "settings", "capacity", "prefill_chunk"))
def score(params, prompt, prompt_lengths, *, config: ModelConfig, settings: SpecPrefillConfig,
          capacity: int, prefill_chunk: int) -> Scores:
  """Prefills the scorer over the prompt [B, P] and scores every prompt token."""
  batch, width = prompt.shape
  _, cache = prefill(Transformer(config), params, prompt, prompt_lengths,
                     FullKVCache.init(config, batch, capacity), prefill_chunk)
  tokens, positions, looked = policies.lookahead(config, params, cache, prompt, prompt_lengths,
                                                 settings.lookahead)
  probs = policies.attention_probs(config, params, looked, tokens, positions)
  importance = token_importance(probs[..., :width], prompt_lengths, settings.pool)
  return Scores(importance=importance, kv_scores=probs.sum(axis=(3, 4)), cache=cache)


def kept_positions(importance, prompt_lengths, settings: SpecPrefillConfig):
  """The prompt positions the verifier prefills: ([B, K] ascending, num_kept [B]).

  importance: [B, P]. Row b keeps `settings.wanted_chunks` of its ceil(len / chunk) chunks (at least
  those holding its last `window` tokens, which go first), then the best by mean importance (ties
  to the earlier chunk), in position order. Entries past num_kept are padding.
  """
  batch, width = importance.shape
  chunk = settings.chunk
  num_chunks = -(-width // chunk)
  padded = jnp.pad(importance, ((0, 0), (0, num_chunks * chunk - width)))
  position = jnp.arange(num_chunks * chunk)
  valid = position[None, :] < prompt_lengths[:, None]                          # [B, C * chunk]
  per_chunk = lambda x: x.reshape(batch, num_chunks, chunk).sum(-1)
  chunk_valid = per_chunk(valid) > 0
  chunk_score = per_chunk(jnp.where(valid, padded, 0.0)) / jnp.maximum(per_chunk(valid), 1)
  in_window = valid & (position[None, :] >= prompt_lengths[:, None] - settings.window)
  forced = per_chunk(in_window) > 0
  ranked = jnp.where(forced, jnp.inf, jnp.where(chunk_valid, chunk_score, -jnp.inf))
  rank = jnp.argsort(jnp.argsort(-ranked, axis=-1, stable=True), axis=-1)
  count = jnp.maximum(settings.wanted_chunks(chunk_valid.sum(-1)), forced.sum(-1))
  keep = valid & jnp.repeat(chunk_valid & (rank < count[:, None]), chunk, axis=1)
  kept = jnp.argsort(~keep, axis=-1, stable=True)[:, :settings.max_kept_tokens(width)]
  return jnp.minimum(kept, width - 1).astype(jnp.int32), keep.sum(-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "settings", "capacity", "prefill_chunk"))
def prefill_kept(params, prompt, prompt_lengths, importance, *, config: ModelConfig,
                 settings: SpecPrefillConfig, capacity: int, prefill_chunk: int):
  """The verifier's prefill of the kept prompt tokens at their original positions.

  Returns (logits [B, V] after the prompt's last token, a `FullKVCache` of `capacity` slots at
  length = prompt_lengths holding the kept tokens, kept positions [B, K], num_kept [B]).
  """
  kept, num_kept = kept_positions(importance, prompt_lengths, settings)
  tokens = jnp.take_along_axis(prompt, kept, axis=1)
  logits, cache = prefill(Transformer(config), params, tokens, num_kept,
                          FullKVCache.init(config, prompt.shape[0], capacity), prefill_chunk,
                          positions=kept)
  cache = cache.replace(length=prompt_lengths, skipped=prompt_lengths - num_kept)
  return logits, cache, kept, num_kept


@functools.partial(jax.jit, static_argnames=("verifier_config", "scorer_config", "settings",
                                             "capacity", "prefill_chunk"))
def prefill_caches(verifier_params, scorer_params, prompt, prompt_lengths, *,
                   verifier_config: ModelConfig, scorer_config: ModelConfig,
                   settings: SpecPrefillConfig, capacity: int, prefill_chunk: int):
  """`score` then `prefill_kept`: (verifier logits [B, V], its cache of the kept tokens, the
  scorer's `Scores`, num_kept [B]). The scorer's cache and KV scores serve it as a drafter."""
  scores = score(scorer_params, prompt, prompt_lengths, config=scorer_config, settings=settings,
                 capacity=capacity, prefill_chunk=prefill_chunk)
  logits, cache, _, num_kept = prefill_kept(verifier_params, prompt, prompt_lengths,
                                            scores.importance, config=verifier_config,
                                            settings=settings, capacity=capacity,
                                            prefill_chunk=prefill_chunk)
  return logits, cache, scores, num_kept
