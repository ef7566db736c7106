"""Block verification (Sun, Mendlovic, Leviathan, Aharoni, Ro, Beirami, Suresh; ICLR 2025).

Notation of the paper: draft X_1..X_gamma ~ M_s, target M_b; here q_i = M_s(. | c, X_<i) and
p_i = M_b(. | c, X_<i) for i = 1..gamma + 1. With weights
    w_0 = 1,    w_i = min(w_{i-1} p_i(X_i) / q_i(X_i), 1),
residual masses  m_i(x) = max(w_i p_{i+1}(x) - q_{i+1}(x), 0),  s_i = sum_x m_i(x),
and stop probabilities  h_i = s_i / (s_i + 1 - w_i)  (i < gamma),  h_gamma = w_gamma,
draw eta_i ~ U(0, 1) independently and keep tau = max{i : eta_i <= h_i} tokens (h_0 = 1 whenever
s_0 > 0); the next token is drawn from m_tau / s_tau, or from p_{gamma+1} when tau = gamma. So
P(tau = i) = h_i prod_{j > i} (1 - h_j). Unlike token-wise verification, an early rejection can be
overruled by a later token that the target likes more than the drafter, which makes the expected
accepted length maximal among all valid verifiers (our LP oracle checks this, verification/lp.py).

`block_law` also serves multi-path GBV: verification may start at position `start` (tokens before
it already accepted) against an arbitrary target `first_target` for position start + 1.
"""

import jax.numpy as jnp

from budgetdraft.verification.common import normalize, safe_ratio, sample_outcome


def block_law(draft_tokens, q, p, start=0, first_target=None):
  """(stop_probs [gamma + 1], next_dists [gamma + 1, V]) of block verification.

  Positions < start are taken as accepted (stop_probs is 0 there); with first_target [V], the
  target of position start + 1 is first_target instead of p[start].
  """
  gamma = draft_tokens.shape[0]
  index = jnp.arange(gamma + 1)
  if first_target is not None:
    p = jnp.where((index == start)[:, None], first_target[None, :], p)
  q_drafted = jnp.take_along_axis(q, draft_tokens[:, None], axis=1)[:, 0]
  p_drafted = jnp.take_along_axis(p[:gamma], draft_tokens[:, None], axis=1)[:, 0]
  ratio = safe_ratio(p_drafted, q_drafted)
  weights = [jnp.ones(())]
  for i in range(gamma):  # gamma is static and small: the recurrence stays readable
    restart = i < start  # weights before `start` are reset to 1 (those tokens are already ours)
    weights.append(jnp.where(restart, 1.0, jnp.minimum(weights[-1] * ratio[i], 1.0)))
  weights = jnp.stack(weights)  # [gamma + 1], weights[i] = w_i
  masses = jnp.maximum(weights[:gamma, None] * p[:gamma] - q, 0.0)  # m_i, from p_{i+1}, q_{i+1}
  sums = masses.sum(-1)
  stop_here = jnp.concatenate([safe_ratio(sums, sums + 1.0 - weights[:gamma]), weights[gamma:]])
  stop_here = jnp.where(index >= start, jnp.clip(stop_here, 0.0, 1.0), 0.0)  # h_i, float-safe
  # P(tau = i) = h_i prod_{j > i} (1 - h_j)
  survive_after = jnp.cumprod((1.0 - stop_here)[::-1])[::-1]
  survive_after = jnp.concatenate([survive_after[1:], jnp.ones((1,))])
  stop_probs = stop_here * survive_after
  return stop_probs, jnp.concatenate([normalize(masses), p[gamma:]], axis=0)


def verify_block(draft_tokens, q, p, rng):
  return sample_outcome(rng, *block_law(draft_tokens, q, p))
