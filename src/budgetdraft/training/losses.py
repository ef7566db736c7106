"""BudgetDraft losses: every branch is scored against one shared full-cache teacher target p_t.

- acceptance-aware loss (full-cache branch): the expected rejection of token-wise speculative
  sampling, 1 - sum_v min(p_t(v), q_t(v)) = TV(p_t, q_t), optionally mixed with forward KL(p || q),
  whose gradient does not vanish where the supports are disjoint (useful early in training);
- multi-view loss (sparse-cache branch): the same divergence for each sampled budget's view,
  averaged over views;
- total = L_full + lambda * mean_B L_sparse(B).
Probabilities are float32 [..., V]; `mask` [...] marks the positions that count (the continuation
after the compression point, not padding).
"""

import jax
import jax.numpy as jnp


def expected_rejection(teacher_probs, draft_log_probs):
  """[...]: 1 - sum_v min(p, q), the rejection probability of token-wise speculative sampling."""
  return 1.0 - jnp.sum(jnp.minimum(teacher_probs, jnp.exp(draft_log_probs)), axis=-1)


def forward_kl(teacher_probs, draft_log_probs):
  """[...]: KL(p || q) = sum_v p (log p - log q), with 0 log 0 = 0."""
  teacher_log = jnp.log(jnp.where(teacher_probs > 0, teacher_probs, 1.0))
  return jnp.sum(jnp.where(teacher_probs > 0, teacher_probs * (teacher_log - draft_log_probs),
                           0.0), axis=-1)


def divergence(teacher_probs, draft_logits, mask, kl_weight: float):
  """(masked mean of expected rejection + kl_weight * forward KL, acceptance = 1 - mean rejection)."""
  draft_log_probs = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
  rejection = expected_rejection(teacher_probs, draft_log_probs)
  per_position = rejection
  if kl_weight:
    per_position = per_position + kl_weight * forward_kl(teacher_probs, draft_log_probs)
  mask = mask.astype(jnp.float32)
  mean = lambda x: jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return mean(per_position), 1.0 - mean(rejection)


def budgetdraft_loss(teacher_probs, full_logits, view_logits, mask, *, sparse_weight: float,
                     kl_weight: float = 0.0):
  """(total, parts) with parts = {"full": L_full, "sparse": mean_B L_sparse(B), "per_view": [M],
  "acceptance_full": scalar, "acceptance_views": [M]}; acceptance = expected token-wise acceptance.

  teacher_probs: [B, T, V]; full_logits: [B, T, V]; view_logits: [M, B, T, V] (M budgets, M = 0
  trains the full branch alone: naive distillation).
  """
  full, acceptance_full = divergence(teacher_probs, full_logits, mask, kl_weight)
  per_view, acceptance_views = jax.vmap(
      lambda logits: divergence(teacher_probs, logits, mask, kl_weight))(view_logits)
  sparse = jnp.mean(per_view) if view_logits.shape[0] else jnp.zeros(())
  return full + sparse_weight * sparse, {
      "full": full, "sparse": sparse, "per_view": per_view, "acceptance_full": acceptance_full,
      "acceptance_views": acceptance_views}
