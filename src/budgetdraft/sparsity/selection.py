"""The kept set of prompt keys, and the drafter's sparse cache built from it.

One rule decides what a budget keeps (`keep_mask`): per layer and KV head, the sinks and the last
`window` prompt positions, then the best-scoring prompt positions, up to the budget. Inference
gathers the kept keys into a `SparseKVCache` (`sparse_cache`); training masks a full cache with the
same rule at a traced budget (`training.views`), so what the drafter learns is what it sees.
"""

import dataclasses

import jax
import jax.numpy as jnp

from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache, SparseKVCache
from budgetdraft.sparsity import policies


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
  """Budget B = kept prompt keys per layer and KV head, sinks and window included.

  budget None: chosen per call (training views sample it per step).
  """

  policy: str = "snapkv"
  budget: int | None = 1024
  sinks: int = 4
  window: int = 64        # last prompt tokens, always kept
  recent: int = 128       # ring of tokens generated after the prompt (+ gamma draft slots)
  observation: int = 32   # SnapKV: last prompt queries that vote
  pool: int = 7           # SnapKV: average-pooling width over key positions
  lookahead: int = 8      # lookahead: tokens the drafter generates to vote (SpecPrefill-style)
  score_chunk: int = 512  # H2O: queries per scoring chunk
  chunk: int = 8          # chunk_retrieval: positions per retrieved chunk (budgets are multiples)

  def __post_init__(self):
    if self.policy not in policies.POLICIES:
      raise ValueError(f"unknown KV policy {self.policy!r}; valid: {sorted(policies.POLICIES)}")
    if min(self.sinks, self.window) < 0:
      raise ValueError(f"sinks={self.sinks} and window={self.window} must be >= 0")
    for name in ("recent", "observation", "pool", "lookahead", "score_chunk", "chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.budget is not None:
      self.check_budget(self.budget)

  def check_budget(self, budget: int) -> None:
    if budget < self.sinks + self.window:
      raise ValueError(f"budget={budget} is below sinks + window = {self.sinks} + "
                       f"{self.window}; raise the budget or shrink them")
    if self.policy == "chunk_retrieval" and (budget < self.chunk or budget % self.chunk):
      raise ValueError(f"budget={budget} is not a positive multiple of chunk={self.chunk}: "
                       "chunk_retrieval keeps whole chunks")

  def ring_size(self, gamma: int) -> int:
    """Ring slots for tokens after the prompt: `recent` committed ones + gamma drafts in flight."""
    return self.recent + gamma


def keep_mask(scores, prompt_lengths, budget, sparsity: SparsityConfig):
  """[L, B, Hkv, S] bool: the prompt keys a budget keeps, from scores [L, B, Hkv, S].

  The budget may be traced. Ties go to the earlier position; a budget >= the prompt keeps it all.
  """
  position = jnp.arange(scores.shape[-1])
  length = prompt_lengths[None, :, None, None]
  valid = position < length
  forced = valid & ((position < sparsity.sinks) | (position >= length - sparsity.window))
  ranked = jnp.where(forced, jnp.inf, jnp.where(valid, scores.astype(jnp.float32), -jnp.inf))
  rank = jnp.argsort(jnp.argsort(-ranked, axis=-1, stable=True), axis=-1)
  return valid & (rank < budget)


def select_kept(scores, prompt_lengths, sparsity: SparsityConfig):
  """Kept positions [L, B, Hkv, budget] (ascending, -1 = unused slot): `keep_mask` as a list."""
  budget = sparsity.budget
  if scores.shape[-1] < budget:
    scores = jnp.pad(scores, [(0, 0)] * 3 + [(0, budget - scores.shape[-1])])
  kept = keep_mask(scores, prompt_lengths, budget, sparsity)
  positions = jnp.argsort(~kept, axis=-1, stable=True)[..., :budget]  # kept first, in order
  return jnp.where(jnp.arange(budget) < kept.sum(-1, keepdims=True), positions,
                   -1).astype(jnp.int32)


def compress(config: ModelConfig, cache: FullKVCache, kept, prompt_lengths,
             ring_size: int) -> SparseKVCache:
  """The kept keys [L, B, Hkv, budget] of a prefilled full cache, and an empty ring after them."""
  budget = kept.shape[-1]
  sparse = SparseKVCache.init(config, cache.batch_size, budget, ring_size)
  gather = lambda x: jnp.take_along_axis(x, jnp.maximum(kept, 0)[..., None], axis=3)
  return sparse.replace(k=sparse.k.at[:, :, :, :budget].set(gather(cache.k)),
                        v=sparse.v.at[:, :, :, :budget].set(gather(cache.v)),
                        positions=sparse.positions.at[:, :, :, :budget].set(kept),
                        length=prompt_lengths.astype(jnp.int32),
                        ring_base=prompt_lengths.astype(jnp.int32))


def sparse_cache(config: ModelConfig, params, cache: FullKVCache, prompt, prompt_lengths,
                 sparsity: SparsityConfig, gamma: int, rng, scores=None,
                 features=None) -> SparseKVCache:
  """The drafter's sparse cache after its prefill: policy scores, kept set, compression.

  cache: the drafter's full cache holding the prompt [B, T] (rows valid up to prompt_lengths);
  scores: the policy's scores [L, B, Hkv, S] when a caller already has them (speculative prefill
  computes the lookahead policy's), else computed here; features: the drafter's feature inputs
  over the prompt [B, T, F], if it has a feature input.
  """
  if scores is None:
    scores = policies.policy_scores(config, params, cache, prompt, prompt_lengths, sparsity, rng,
                                    features)
  kept = select_kept(scores, prompt_lengths, sparsity)
  return compress(config, cache.truncate(prompt_lengths), kept, prompt_lengths,
                  sparsity.ring_size(gamma))
