"""Perplexity of a model on token sequences (model quality, e.g. of a drafter cut or a pruned model)."""

import jax.numpy as jnp

from budgetdraft.models.config import ModelConfig
from budgetdraft.models.prefill import negative_log_likelihood


def perplexity(params, tokens, *, config: ModelConfig, chunk_size: int = 512) -> float:
  return float(jnp.exp(negative_log_likelihood(params, tokens, config=config,
                                               chunk_size=chunk_size)))
