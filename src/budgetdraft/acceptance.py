"""A drafter's acceptance along the verifier's greedy path, measured teacher-forced.

In greedy speculative decoding every committed token is the verifier's greedy token, so the
drafter's state in every round is fixed by the verifier's greedy continuation y: kept prompt keys
(or the full prompt) plus y's keys in the ring. Feeding y once, teacher-forced, therefore gives the
drafter's exact law at every position (as long as y fits the ring: no eviction), a drafted token
is accepted iff the drafter's argmax after y_i is y_{i+1}, and the engine's rounds are a replay of
those matches (`greedy_rounds`). One drafter forward per (drafter, budget) yields the engine's
acceptance and block efficiency, and also sum_v min(p, q): the expected acceptance of token-wise
speculative sampling at temperature 1 on the same path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.decoding.prefill import prefill
from budgetdraft.kv_cache import FullKVCache
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.transformer import Transformer
from budgetdraft.sparsity import policies, selection


@functools.partial(jax.jit, static_argnames=("config", "capacity", "chunk_size"))
def prefill_prompt(params, prompt, *, config: ModelConfig, capacity: int, chunk_size: int):
  """A full cache holding the prompt [B, P] (capacity >= P + continuation + lookahead)."""
  lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
  _, cache = prefill(Transformer(config), params, prompt, lengths,
                     FullKVCache.init(config, prompt.shape[0], capacity), chunk_size)
  return cache


@functools.partial(jax.jit, static_argnames=("config", "sparsity", "gamma"))
def continuation_logits(params, cache: FullKVCache, prompt, continuation, rng, *,
                        config: ModelConfig, sparsity: selection.SparsityConfig | None,
                        gamma: int):
  """Logits [B, C, V] of continuation [B, C] fed after the prompt held by `cache`.

  sparsity None: over the full cache; otherwise over its compression by the policy, exactly as
  `speculative.start` builds the drafter's cache (ring of recent + gamma slots).
  """
  lengths = cache.length
  if sparsity is not None:
    if continuation.shape[1] > sparsity.recent + gamma:
      raise ValueError(f"continuation of {continuation.shape[1]} tokens overflows the ring of "
                       f"{sparsity.recent + gamma}: teacher forcing would differ from decoding")
    scores = policies.policy_scores(config, params, cache, prompt, lengths, sparsity, rng)
    kept = selection.select_kept(scores, lengths, sparsity)
    cache = selection.compress(cache.truncate(lengths), kept, lengths, sparsity, gamma)
  model = Transformer(config)
  positions = lengths[:, None] + jnp.arange(continuation.shape[1])[None, :]
  hidden, _ = model.apply({"params": params}, continuation, positions, cache)
  return model.apply({"params": params}, hidden, method=Transformer.logits)


def greedy_rounds(matches: np.ndarray, gamma: int, num_tokens: int) -> tuple[int, int]:
  """(verifier calls, accepted drafts) of greedy speculative decoding emitting num_tokens tokens.

  matches[i]: the drafter's argmax after greedy token i is greedy token i + 1 (token 0 comes from
  the prefill). Each round drafts gamma tokens from the last emitted one, accepts the matching
  prefix and emits one more token; like the engine, the last round may run past num_tokens.
  """
  emitted, rounds, accepted = 1, 0, 0
  while emitted < num_tokens:
    run = 0
    while run < gamma and emitted - 1 + run < len(matches) and matches[emitted - 1 + run]:
      run += 1
    rounds, accepted, emitted = rounds + 1, accepted + run, emitted + run + 1
  return rounds, accepted


def path_statistics(verifier_logits, drafter_logits, greedy_tokens, gamma: int,
                    num_tokens: int) -> dict:
  """Acceptance statistics of one prompt.

  verifier_logits, drafter_logits: [N, V] after greedy tokens 0..N-1; greedy_tokens: [N + 1].
  """
  p = jax.nn.softmax(verifier_logits.astype(jnp.float32), axis=-1)
  q = jax.nn.softmax(drafter_logits.astype(jnp.float32), axis=-1)
  overlap = np.asarray(jnp.minimum(p, q).sum(-1))
  matches = np.asarray(jnp.argmax(drafter_logits, -1)) == np.asarray(greedy_tokens[1:])
  rounds, accepted = greedy_rounds(matches, gamma, num_tokens)
  return {"overlap": float(overlap[:num_tokens - 1].mean()), "rounds": rounds,
          "accepted": accepted}
