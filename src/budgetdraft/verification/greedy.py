"""Greedy (temperature 0) verification: accept the longest drafted prefix matching the verifier's argmax.

The emitted sequence is then exactly greedy autoregressive decoding of the verifier. The signature
is the common one of `verification.RULES` (q and rng are unused), for any number of paths.
"""

import jax.numpy as jnp


def _matched_prefix(draft_tokens, p):
  """Length of the longest prefix of draft_tokens [..., gamma] equal to argmax p[..., :gamma]."""
  gamma = draft_tokens.shape[-1]
  matches = draft_tokens == jnp.argmax(p[..., :gamma, :], axis=-1)
  return jnp.sum(jnp.cumprod(matches, axis=-1), axis=-1).astype(jnp.int32)


def verify_greedy(draft_tokens, q, p, rng):
  """The path with the longest match (lowest index on ties)."""
  del q, rng
  matched = _matched_prefix(draft_tokens, p)  # [K]
  path = jnp.argmax(matched).astype(jnp.int32)
  return matched[path], jnp.argmax(p[path, matched[path]]).astype(jnp.int32), path
