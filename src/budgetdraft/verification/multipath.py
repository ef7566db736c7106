"""Multi-path verification: K draft paths sampled i.i.d. from the drafter from a shared root.

Inputs: draft_tokens [K, gamma], q [K, gamma, V], p [K, gamma + 1, V] (row i of path k is conditioned
on that path's first i tokens, so paths sharing a prefix share those rows). Outputs
(num_accepted, next_token, path): the emitted tokens are draft_tokens[path, :num_accepted] + next.

- SpecInfer recursive rejection sampling (Miao et al. 2024): at each depth, the distinct paths that
  still agree with the accepted prefix offer their next tokens in path order; candidate c is accepted
  with probability min(1, r(c) / q(c)) against the running residual r (initially p), and every
  rejection updates r <- norm(max(r - q, 0)). Lossless because the candidates are i.i.d. from q.
- Residual BV, sequential residual block verification (our construction, not the published GBV,
  which is `verification/gbv.py`): run block verification on path 0; while the block stops at
  tau < gamma, take the next path whose first tau tokens equal the accepted prefix and run block
  verification on its suffix against the *residual* as the target of position tau + 1
  (`block_law(start=tau, first_target=residual)`). Each stage is block verification of an i.i.d.
  path against the exact conditional law of what remains, so the output follows the target. With
  K = 1 it is block verification; each extra path can only lengthen the accepted prefix (monotone
  in K, never below BV), but it reaches the multi-path LP optimum far less often than GBV.
"""

import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.verification.block import block_law
from budgetdraft.verification.common import normalize, safe_ratio, sample_outcome


def _shares_prefix(draft_tokens, depth):
  """[K, K] bool: paths agree on their first `depth` tokens."""
  prefix = draft_tokens[:, :depth]
  return jnp.all(prefix[:, None, :] == prefix[None, :, :], axis=-1)


def _first_member(group):
  """[K] index of the first path in each row's group (the canonical node of that row)."""
  return jnp.argmax(group, axis=1)


def specinfer_law(draft_tokens, q, p):
  """(stop_probs [K, gamma + 1], next_dists [K, gamma + 1, V]) of recursive rejection sampling.

  stop_probs[k, d] is the probability of stopping after the first d tokens of path k (assigned to
  the first path of each node), with next_dists[k, d] the law of the token emitted there.
  """
  num_paths, gamma = draft_tokens.shape
  reach = jnp.zeros((num_paths,)).at[0].set(1.0)  # node probabilities, on canonical paths
  stop_probs, next_dists = [], []
  for depth in range(gamma):
    group = _shares_prefix(draft_tokens, depth)          # [K, K]
    child = _first_member(_shares_prefix(draft_tokens, depth + 1))  # canonical child of each path
    residual = p[:, depth]                                # [K, V] target at each node
    survive = jnp.ones((num_paths,))
    next_reach = jnp.zeros((num_paths,))
    for candidate in range(num_paths):  # candidates in path order, within each node's group
      offered = group[:, candidate]                       # node j offers this path's token
      token = draft_tokens[candidate, depth]
      q_row = q[candidate, depth]
      accept = jnp.minimum(1.0, safe_ratio(residual[:, token], q_row[token]))
      accept = jnp.where(offered, accept, 0.0)
      next_reach = next_reach.at[child[candidate]].add(jnp.sum(reach * survive * accept))
      rejected_residual = normalize(jnp.maximum(residual - q_row[None, :], 0.0))
      residual = jnp.where(offered[:, None], rejected_residual, residual)
      survive = survive * (1.0 - accept)
    stop_probs.append(reach * survive)
    next_dists.append(residual)
    reach = next_reach
  stop_probs.append(reach)
  next_dists.append(p[:, gamma])
  return jnp.stack(stop_probs, axis=1), jnp.stack(next_dists, axis=1)


def verify_specinfer(draft_tokens, q, p, rng):
  stop_probs, next_dists = specinfer_law(draft_tokens, q, p)
  index, token = sample_outcome(rng, stop_probs, next_dists)
  path, num_accepted = jnp.divmod(index, draft_tokens.shape[1] + 1)
  return num_accepted.astype(jnp.int32), token, path.astype(jnp.int32)


def verify_residual_bv(draft_tokens, q, p, rng):
  """Sequential residual block verification (see the module docstring); jittable, K static."""
  num_paths, gamma = draft_tokens.shape
  rngs = jax.random.split(rng, num_paths + 1)

  def stage(path, accepted, target, rng):
    stop_probs, next_dists = block_law(draft_tokens[path], q[path], p[path], accepted, target)
    index, _ = sample_outcome(rng, stop_probs, next_dists)
    return index.astype(jnp.int32), next_dists[index]

  accepted, target = stage(0, 0, p[0, 0], rngs[0])
  current = jnp.zeros((), jnp.int32)
  for path in range(1, num_paths):
    same_prefix = jnp.all(jnp.where(jnp.arange(gamma) < accepted,
                                    draft_tokens[path] == draft_tokens[current], True))
    usable = same_prefix & (accepted < gamma)
    new_accepted, new_target = stage(path, accepted, target, rngs[path])
    accepted = jnp.where(usable, new_accepted, accepted)
    target = jnp.where(usable, new_target, target)
    current = jnp.where(usable, path, current)
  token = jax.random.categorical(rngs[-1], jnp.log(target)).astype(jnp.int32)
  return accepted, token, current


_jit_block_law = jax.jit(block_law)


def residual_bv_outcomes(draft_tokens, q, p):
  """Exact law of `verify_residual_bv`: {(path, num_accepted): (probability, next-token law [V])}.

  Enumerates every stage outcome (K stages, gamma + 1 stops each) with the same `block_law`; for
  tests and tables on tiny problems, not for decoding.
  """
  draft_tokens, num_paths = np.asarray(draft_tokens), draft_tokens.shape[0]
  gamma = draft_tokens.shape[1]
  laws = {}

  def expand(path, accepted, current, target, prob):
    if prob <= 0:
      return
    if path == num_paths or accepted == gamma:
      key = (current, accepted)
      mass, dist = laws.get(key, (0.0, 0.0))
      laws[key] = (mass + prob, dist + prob * np.asarray(target))
      return
    if np.array_equal(draft_tokens[path, :accepted], draft_tokens[current, :accepted]):
      stop_probs, next_dists = _jit_block_law(jnp.asarray(draft_tokens[path]), q[path], p[path],
                                              accepted, target)
      for stop in range(accepted, gamma + 1):
        expand(path + 1, stop, path, next_dists[stop], prob * float(stop_probs[stop]))
    else:
      expand(path + 1, accepted, current, target, prob)

  stop_probs, next_dists = _jit_block_law(jnp.asarray(draft_tokens[0]), q[0], p[0], 0, p[0][0])
  for stop in range(gamma + 1):
    expand(1, stop, 0, next_dists[stop], float(stop_probs[stop]))
  return {key: (mass, dist / mass) for key, (mass, dist) in laws.items()}
