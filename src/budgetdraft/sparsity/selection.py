"""The kept set of prompt keys, and the compression of a full cache into a `SparseKVCache`."""

import dataclasses

import jax
import jax.numpy as jnp

from budgetdraft.kv_cache import FullKVCache, SparseKVCache

POLICIES = ("streaming", "snapkv", "h2o", "lookahead", "random")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
  """Budget B = kept prompt keys per layer and KV head, sinks and window included."""

  policy: str = "snapkv"
  budget: int = 1024
  sinks: int = 4
  window: int = 64        # last prompt tokens, always kept
  recent: int = 128       # ring of tokens generated after the prompt
  observation: int = 32   # SnapKV: last prompt queries that vote
  pool: int = 7           # SnapKV: average-pooling width over key positions
  lookahead: int = 8      # lookahead: tokens the drafter generates to vote (SpecPrefill-style)
  score_chunk: int = 512  # H2O: queries per scoring chunk

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"unknown KV policy {self.policy!r}; valid: {POLICIES}")
    if self.budget < self.sinks + self.window:
      raise ValueError(f"budget={self.budget} is below sinks + window = "
                       f"{self.sinks} + {self.window}; raise the budget or shrink them")
    if min(self.sinks, self.window, self.observation, self.lookahead) < 0 or self.recent < 1:
      raise ValueError(f"sizes must be non-negative (recent >= 1): {self}")


def select_kept(scores, prompt_lengths, config: SparsityConfig):
  """Kept positions [L, B, Hkv, budget] (ascending, -1 = unused slot) from scores [L, B, Hkv, S].

  Positions < sinks and the last `window` prompt positions are always kept; the rest of the budget
  goes to the highest-scoring valid prompt positions. A budget >= the prompt keeps everything.
  """
  num_slots = scores.shape[-1]
  if num_slots < config.budget:
    scores = jnp.pad(scores, [(0, 0)] * 3 + [(0, config.budget - num_slots)])
  position = jnp.arange(scores.shape[-1])
  length = prompt_lengths[None, :, None, None]
  valid = position < length
  forced = valid & ((position < config.sinks) | (position >= length - config.window))
  ranked = jnp.where(forced, jnp.inf, jnp.where(valid, scores.astype(jnp.float32), -jnp.inf))
  top_scores, top_positions = jax.lax.top_k(ranked, config.budget)
  kept = jnp.where(top_scores > -jnp.inf, top_positions, jnp.iinfo(jnp.int32).max)
  kept = jnp.sort(kept, axis=-1)
  return jnp.where(kept == jnp.iinfo(jnp.int32).max, -1, kept).astype(jnp.int32)


def compress(cache: FullKVCache, kept, prompt_lengths, config: SparsityConfig,
             gamma: int) -> SparseKVCache:
  """Gathers the kept keys of a prefilled full cache; the ring holds recent + gamma tokens."""
  index = jnp.maximum(kept, 0)[..., None]
  gather = lambda x: jnp.take_along_axis(x, index, axis=3)
  ring_size = config.recent + gamma
  ring = lambda x: jnp.zeros(x.shape[:3] + (ring_size,) + x.shape[4:], x.dtype)
  k_kept, v_kept = gather(cache.k), gather(cache.v)
  positions = jnp.concatenate([kept, jnp.full(kept.shape[:3] + (ring_size,), -1, jnp.int32)], -1)
  return SparseKVCache(k=jnp.concatenate([k_kept, ring(k_kept)], axis=3),
                       v=jnp.concatenate([v_kept, ring(v_kept)], axis=3),
                       positions=positions, length=prompt_lengths.astype(jnp.int32),
                       ring_base=prompt_lengths.astype(jnp.int32), budget=config.budget,
                       attention_impl=cache.attention_impl)
