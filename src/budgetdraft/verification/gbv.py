"""Greedy multi-path block verification, GBV (Thomas & Pal, 2026): select a path, then BV on its law.

K draft paths are sampled i.i.d. from the drafter; they form a prefix tree. At every node x the
tokens are ranked by r(t) = min(1, p(t | x) / q(t | x)), ties going to the higher token id, and the
selected path is the lexicographic best of the K: from the root, always the best-ranked drafted
child. That path is the maximum of K i.i.d. draws under a total order on paths, so its law is known
exactly. At a node x with J = Q(x) (draft mass of the prefix), A = draft mass of the paths ranked
below x, and F the CDF of q(. | x) in ranking order,

    q_K(v | x) = [(A + J F(v))^K - (A + J (F(v) - q(v | x)))^K] / [(A + J)^K - A^K].

Single-path block verification of the selected path against the target, with q_K in place of q,
is then lossless for any K, and with K = 1 it is block verification itself. Evaluated stably:
a^K - b^K = (a - b) sum_{i<K} a^i b^(K-1-i) with a - b = J q(v), so J cancels, and A, J are
renormalized to A + J = 1 at each depth (no underflow along long paths).
"""

import jax.numpy as jnp

from budgetdraft.verification.block import block_law
from budgetdraft.verification.common import normalize, safe_ratio, sample_outcome


def _rank_scores(p_rows, q_rows):
  """r = min(1, p / q) per token [..., V] (0 where q = 0: never drafted, no draft mass)."""
  return jnp.minimum(1.0, safe_ratio(p_rows, q_rows))


def select_path(draft_tokens, q, p):
  """Index of the selected path: at each depth, among the paths still on the selected prefix
  (they share that node's rows), the drafted child with the best (r, token id)."""
  num_paths, gamma = draft_tokens.shape
  on_prefix = jnp.ones((num_paths,), bool)
  for depth in range(gamma):
    tokens = draft_tokens[:, depth]
    scores = jnp.take_along_axis(_rank_scores(p[:, depth], q[:, depth]), tokens[:, None], 1)[:, 0]
    best_score = jnp.max(jnp.where(on_prefix, scores, -1.0))
    best_token = jnp.max(jnp.where(on_prefix & (scores == best_score), tokens, -1))
    on_prefix = on_prefix & (tokens == best_token)
  return jnp.argmax(on_prefix).astype(jnp.int32)


def _rank_cdf(p_row, q_row):
  """F(v) [V]: the draft mass of the tokens ranked at or below v at this node."""
  order = jnp.argsort(_rank_scores(p_row, q_row), stable=True)  # ascending r, ties by token id
  return jnp.zeros_like(q_row).at[order].set(jnp.cumsum(q_row[order]))


def _power_sum(a, b, exponent: int):
  """sum_{i < exponent} a^i b^(exponent - 1 - i) = (a^exponent - b^exponent) / (a - b)."""
  return sum(a ** i * b ** (exponent - 1 - i) for i in range(exponent))


def selected_path_law(path_tokens, q, p, num_paths: int):
  """q_K [gamma, V]: the law of the selected path among num_paths i.i.d. drafts, at each node of
  `path_tokens` [gamma] (q [gamma, V], p [gamma + 1, V] are that path's rows)."""
  below = jnp.zeros(())  # A / (A + J) at the current node
  rows = []
  for depth in range(path_tokens.shape[0]):
    own = 1.0 - below    # J / (A + J)
    upper = below + own * _rank_cdf(p[depth], q[depth])
    lower = upper - own * q[depth]
    rows.append(normalize(q[depth] * _power_sum(upper, lower, num_paths)))
    token = path_tokens[depth]
    below = safe_ratio(lower[token], upper[token])  # mass below the child, over the child's node
  return jnp.stack(rows)


def gbv_law(draft_tokens, q, p):
  """(stop_probs [K, gamma + 1], next_dists [K, gamma + 1, V]), nonzero on the selected path only.

  The same form as `multipath.specinfer_law`, for exact enumeration.
  """
  path = select_path(draft_tokens, q, p)
  q_selected = selected_path_law(draft_tokens[path], q[path], p[path], draft_tokens.shape[0])
  stop_probs, next_dists = block_law(draft_tokens[path], q_selected, p[path])
  selected = (jnp.arange(draft_tokens.shape[0]) == path)
  return (jnp.where(selected[:, None], stop_probs, 0.0),
          jnp.where(selected[:, None, None], next_dists, 0.0))


def verify_gbv(draft_tokens, q, p, rng):
  """(num_accepted, next_token, path): the common rule signature of `verification.RULES`."""
  path = select_path(draft_tokens, q, p)
  q_selected = selected_path_law(draft_tokens[path], q[path], p[path], draft_tokens.shape[0])
  num_accepted, token = sample_outcome(rng, *block_law(draft_tokens[path], q_selected, p[path]))
  return num_accepted.astype(jnp.int32), token, path
