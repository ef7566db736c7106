"""Pieces shared by the verification rules: safe normalization, outcome sampling, draft validation."""

import jax
import jax.numpy as jnp
import numpy as np


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


def validate_draft(draft_tokens, q) -> None:
  """Raises if a drafted token had draft probability 0 (it cannot have been sampled from q).

  A boundary check for concrete arrays: draft_tokens [..., gamma], q [..., gamma, V].
  """
  draft_tokens, q = np.asarray(draft_tokens), np.asarray(q)
  drafted = np.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
  if np.any(drafted <= 0):
    bad = np.argwhere(drafted <= 0)[0].tolist()
    raise ValueError(f"drafted token {int(draft_tokens[tuple(bad)])} at index {bad} has draft "
                     "probability 0: drafts must be sampled from q")
