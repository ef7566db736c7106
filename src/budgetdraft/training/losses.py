"""BudgetDraft losses: every branch is scored against one shared full-cache teacher target p_t.

- acceptance-aware loss (full-cache branch): the expected rejection of token-wise speculative
  sampling, 1 - sum_v min(p_t(v), q_t(v)) = TV(p_t, q_t), optionally mixed with forward KL(p || q),
  whose gradient does not vanish where the supports are disjoint (useful early in training) and
  does vanish where q = p (TV's kink there turns float noise into a full-size step: a drafter
  that starts at its teacher, the verifier drafting for itself, trains on KL alone);
- multi-view loss (sparse-cache branch): the same divergence for each sampled budget's view,
  averaged over views;
- total = L_full + lambda * mean_B L_sparse(B);
- the published recipe's hard labels instead (`hard_labels`): cross-entropy to the teacher's argmax
  token in place of the divergence, on every branch;
- an EAGLE-style drafter adds a smooth-L1 regression of its hidden states on the verifier's
  (`feature_regression`), weighted the same way across branches.
A drafter with a reduced vocabulary has log q = -inf outside its ids: the teacher's mass there is a
rejection it cannot avoid, and forward KL counts only the ids it can score (p renormalized there
would give the same gradient).
Probabilities are float32 [..., V]; `mask` [...] marks the positions that count (the continuation
after the compression point, not padding).
"""

import jax
import jax.numpy as jnp


def expected_rejection(teacher_probs, draft_log_probs):
  """[...]: 1 - sum_v min(p, q), the rejection probability of token-wise speculative sampling."""
  return 1.0 - jnp.sum(jnp.minimum(teacher_probs, jnp.exp(draft_log_probs)), axis=-1)


def forward_kl(teacher_probs, draft_log_probs):
  """[...]: KL(p || q) = sum_v p (log p - log q), with 0 log 0 = 0, over the ids q can score."""
  counted = (teacher_probs > 0) & jnp.isfinite(draft_log_probs)
  teacher_log = jnp.log(jnp.where(counted, teacher_probs, 1.0))
  finite_log_q = jnp.where(counted, draft_log_probs, 0.0)
  return jnp.sum(jnp.where(counted, teacher_probs * (teacher_log - finite_log_q), 0.0), axis=-1)


def feature_regression(hidden, target, mask):
  """Masked mean over positions of the smooth-L1 distance (mean over features) of hidden states
  [..., T, dim] to the verifier's [..., T, dim] (EAGLE's regression loss)."""
  error = jnp.abs(hidden.astype(jnp.float32) - target.astype(jnp.float32))
  per_position = jnp.mean(jnp.where(error < 1.0, 0.5 * error ** 2, error - 0.5), axis=-1)
  mask = jnp.broadcast_to(mask, per_position.shape).astype(jnp.float32)
  return jnp.sum(per_position * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def argmax_log_prob(teacher_probs, draft_log_probs):
  """[...]: log q(argmax p), the hard-label target's log-likelihood (-inf where q cannot score
  it)."""
  target = jnp.argmax(teacher_probs, axis=-1)[..., None]
  return jnp.take_along_axis(draft_log_probs, target, axis=-1)[..., 0]


def divergence(teacher_probs, draft_logits, mask, kl_weight: float, hard_labels: bool = False,
               rejection_weight: float = 1.0):
  """(loss, acceptance = 1 - masked mean rejection). loss: the masked mean of rejection_weight *
  expected rejection + kl_weight * forward KL, or with hard_labels the cross-entropy to the
  teacher's argmax over the positions whose argmax the drafter can score (a reduced head cannot
  learn the others)."""
  draft_log_probs = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
  rejection = expected_rejection(teacher_probs, draft_log_probs)
  mask = mask.astype(jnp.float32)
  mean = lambda x, m=mask: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  if hard_labels:
    log_q = argmax_log_prob(teacher_probs, draft_log_probs)
    scorable = jnp.isfinite(log_q)
    loss = mean(jnp.where(scorable, -log_q, 0.0), mask * scorable)
  else:
    per_position = rejection_weight * rejection
    if kl_weight:
      per_position = per_position + kl_weight * forward_kl(teacher_probs, draft_log_probs)
    loss = mean(per_position)
  return loss, 1.0 - mean(rejection)


def budgetdraft_loss(teacher_probs, full_logits, view_logits, mask, *, sparse_weight: float,
                     kl_weight: float = 0.0, hard_labels: bool = False,
                     rejection_weight: float = 1.0):
  """(total, parts) with parts = {"full": L_full, "sparse": mean_B L_sparse(B), "per_view": [M],
  "acceptance_full": scalar, "acceptance_views": [M]}; acceptance = expected token-wise acceptance.

  teacher_probs: [B, T, V]; full_logits: [B, T, V]; view_logits: [M, B, T, V] (M budgets, M = 0
  trains the full branch alone: naive distillation).
  """
  score = lambda logits: divergence(teacher_probs, logits, mask, kl_weight, hard_labels,
                                    rejection_weight)
  full, acceptance_full = score(full_logits)
  per_view, acceptance_views = jax.vmap(score)(view_logits)
  sparse = jnp.mean(per_view) if view_logits.shape[0] else jnp.zeros(())
  return full + sparse_weight * sparse, {
      "full": full, "sparse": sparse, "per_view": per_view, "acceptance_full": acceptance_full,
      "acceptance_views": acceptance_views}
