"""The online-softmax step both TPU (mosaic) layouts carry across their KV-block grid axis.

The running max, denominator and weighted sum of values live in VMEM scratch refs ([R, 1], [R, 1],
[R, D] float32) so that they persist from one grid step to the next.
"""

import jax.numpy as jnp

MASKED = -1e30


def reset(max_ref, denom_ref, acc_ref):
  max_ref[...] = jnp.full(max_ref.shape, MASKED, jnp.float32)
  denom_ref[...] = jnp.zeros(denom_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def update(max_ref, denom_ref, acc_ref, scores, visible, values):
  """Folds one KV block in: scores [R, BK] (before masking), visible [R, BK], values [BK, D]."""
  scores = jnp.where(visible, scores, MASKED)
  running_max = max_ref[...]
  new_max = jnp.maximum(running_max, scores.max(axis=1, keepdims=True))
  weights = jnp.where(visible, jnp.exp(scores - new_max), 0.0)
  rescale = jnp.exp(running_max - new_max)
  max_ref[...] = new_max
  denom_ref[...] = denom_ref[...] * rescale + weights.sum(axis=1, keepdims=True)
  acc_ref[...] = acc_ref[...] * rescale + jnp.dot(weights, values)


def safe_denominator(denom_ref):
  """The denominator, floored so that a query that saw no key returns zeros."""
  return jnp.maximum(denom_ref[...], 1e-30)
