"""Pieces shared by the verification rules: safe normalization and outcome sampling."""

import jax
import jax.numpy as jnp


def normalize(mass):
  """mass / sum(mass) over the last axis; an all-zero row stays zero (a branch of probability 0)."""
  total = mass.sum(-1, keepdims=True)
  return jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)


def safe_ratio(numerator, denominator):
  return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def sample_outcome(rng, stop_probs, next_dists):
  """Draws (stop index, next token) from a law: stop_probs [..., S], next_dists [..., S, V].

  The leading axes (e.g. paths) are flattened into the stop index.
  """
  stop_rng, token_rng = jax.random.split(rng)
  flat_stop = stop_probs.reshape(-1)
  flat_dists = next_dists.reshape(flat_stop.shape[0], -1)
  # Clamp float round-off (-1e-7) so that log never sees a negative mass (NaN logits).
  index = jax.random.categorical(stop_rng, jnp.log(jnp.maximum(flat_stop, 0.0)))
  token = jax.random.categorical(token_rng, jnp.log(jnp.maximum(flat_dists[index], 0.0)))
  return index, token.astype(jnp.int32)
