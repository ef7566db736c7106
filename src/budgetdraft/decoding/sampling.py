"""Logits -> the float32 probabilities that both sampling and verification see."""

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy (a one-hot distribution on the argmax)."""

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
    if not 0 < self.top_p <= 1:  # also false for nan
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def probabilities(logits, sampling: SamplingConfig):
  """[..., V] logits -> [..., V] float32 probabilities after temperature and top-p."""
  logits = logits.astype(jnp.float32)
  if sampling.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
  probs = jax.nn.softmax(logits / sampling.temperature, axis=-1)
  if sampling.top_p < 1:
    sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # The smallest prefix of the sorted vocabulary whose mass reaches top_p (the top token always).
    num_kept = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_probs, num_kept - 1, axis=-1)
    probs = jnp.where(probs >= threshold, probs, 0.0)
    probs = probs / probs.sum(-1, keepdims=True)
  return probs


def sample(rng, probs, sampling: SamplingConfig | None = None):
  """One token per row from [..., V] probabilities (exactly the argmax for one-hot rows).

  probs from `probabilities` under a greedy `sampling` are one-hot: their argmax is then taken
  without drawing V random numbers per row (the same token, cheaper in a decode step)."""
  if sampling is not None and sampling.greedy:
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)
