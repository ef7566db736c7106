"""Token-wise speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

Accept X_i with probability a_i = min(1, p_i(X_i) / q_i(X_i)) until the first rejection; on a
rejection at i, emit a token from norm(max(0, p_i - q_i)); if all gamma are accepted, emit the bonus
token from p_{gamma+1}. Law: P(tau = k) = prod_{i<=k} a_i * (1 - a_{k+1}) (k < gamma).
"""

import jax.numpy as jnp

from budgetdraft.verification.common import normalize, safe_ratio, sample_outcome


def tokenwise_law(draft_tokens, q, p):
  """(stop_probs [gamma + 1], next_dists [gamma + 1, V]): P(tau = k) and the law of the next token."""
  gamma = draft_tokens.shape[0]
  q_drafted = jnp.take_along_axis(q, draft_tokens[:, None], axis=1)[:, 0]
  p_drafted = jnp.take_along_axis(p[:gamma], draft_tokens[:, None], axis=1)[:, 0]
  accept = jnp.minimum(1.0, safe_ratio(p_drafted, q_drafted))
  reach = jnp.concatenate([jnp.ones((1,)), jnp.cumprod(accept)])  # P(first k accepted)
  stop_probs = reach * jnp.concatenate([1.0 - accept, jnp.ones((1,))])
  residuals = normalize(jnp.maximum(p[:gamma] - q, 0.0))
  return stop_probs, jnp.concatenate([residuals, p[gamma:]], axis=0)


def verify_tokenwise(draft_tokens, q, p, rng):
  return sample_outcome(rng, *tokenwise_law(draft_tokens, q, p))
