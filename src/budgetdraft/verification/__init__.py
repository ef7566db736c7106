"""Lossless verification rules for speculative decoding.

Every rule in `RULES` is a pure function with one signature,
  (draft_tokens [K, gamma], q [K, gamma, V], p [K, gamma + 1, V], rng)
      -> (num_accepted, next_token, path),
over float32 probabilities (after temperature / top-p); the emitted tokens are
draft_tokens[path, :num_accepted] followed by next_token. Single-path rules (`SINGLE_PATH_RULES`)
verify a K = 1 draft. Each sampling rule draws from an exact outcome law (`*_law`), so its
losslessness is proven by exact enumeration on tiny vocabularies (tests/test_verification.py).
"""

import jax.numpy as jnp

from budgetdraft.verification import block, gbv, greedy, multipath, tokenwise


def _one_path(verify):
  """A single-path rule under the common signature: it verifies the only path of a K = 1 draft."""

  def verify_path(draft_tokens, q, p, rng):
    num_accepted, next_token = verify(draft_tokens[0], q[0], p[0], rng)
    return num_accepted, next_token, jnp.zeros((), jnp.int32)

  return verify_path


RULES = {
    "tokenwise": _one_path(tokenwise.verify_tokenwise),
    "block": _one_path(block.verify_block),
    "greedy": greedy.verify_greedy,
    "specinfer": multipath.verify_specinfer,
    "residual_bv": multipath.verify_residual_bv,
    "gbv": gbv.verify_gbv,
}
SINGLE_PATH_RULES = frozenset({"tokenwise", "block"})
