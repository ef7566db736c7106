"""BudgetDraft losses and budget sampling on hand-made inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.sparsity import selection
from budgetdraft.sparsity.selection import SparsityConfig
from budgetdraft.training import budgets, losses
from budgetdraft.training.config import TrainConfig


def _logits(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))


def test_identical_distributions_cost_nothing():
  p = jnp.array([[[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]])
  mask = jnp.ones((1, 2))
  loss, acceptance = losses.divergence(p, _logits(p), mask, kl_weight=1.0)
  assert float(loss) == pytest.approx(0, abs=1e-6)
  assert float(acceptance) == pytest.approx(1, abs=1e-6)


def test_disjoint_supports_are_always_rejected():
  p = jnp.array([[[0.5, 0.5, 0.0, 0.0]]])
  q = jnp.array([[[0.0, 0.0, 0.3, 0.7]]])
  draft_logits = jnp.log(jnp.maximum(q, 1e-30))
  assert float(losses.divergence(p, draft_logits, jnp.ones((1, 1)), 0.0)[0]) == pytest.approx(1.0)


def test_expected_rejection_is_total_variation():
  rng = np.random.default_rng(0)
  p, q = rng.dirichlet(np.ones(7), size=5), rng.dirichlet(np.ones(7), size=5)
  rejection = losses.expected_rejection(jnp.asarray(p), jnp.log(jnp.asarray(q)))
  np.testing.assert_allclose(rejection, 0.5 * np.abs(p - q).sum(-1), atol=1e-6)


def test_kl_alone_is_stationary_where_the_drafter_is_its_teacher():
  """Family (a)'s drafter starts at its teacher up to float noise: TV's kink turns that noise into
  a full-size gradient, forward KL's gradient vanishes with it (rejection_weight=0)."""
  keys = jax.random.split(jax.random.key(1), 2)
  teacher = jax.nn.softmax(jax.random.normal(keys[0], (2, 6, 50)) * 2)
  logits = jnp.log(teacher) + 1e-6 * jax.random.normal(keys[1], teacher.shape)
  mask = jnp.ones((2, 6))
  grad_norm = lambda kl, rejection: float(jnp.linalg.norm(jax.grad(lambda z: losses.divergence(
      teacher, z, mask, kl, rejection_weight=rejection)[0])(logits)))
  assert grad_norm(1.0, 0.0) < 1e-5
  assert grad_norm(0.0, 1.0) > 1e-2
  other = jax.random.normal(keys[1], teacher.shape)
  rejection = float(losses.divergence(teacher, other, mask, 0.0)[0])
  assert 0.1 < rejection < 1
  assert float(losses.divergence(teacher, other, mask, 0.0, rejection_weight=2.0)[0]) == (
      pytest.approx(2 * rejection, rel=1e-6))


def test_mask_selects_positions():
  p = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
  q = _logits([[[1.0, 1e-9], [1e-9, 1.0]]])
  assert float(losses.divergence(p, q, jnp.array([[1, 0]]), 0.0)[0]) == pytest.approx(0, abs=1e-6)
  assert float(losses.divergence(p, q, jnp.array([[0, 1]]), 0.0)[0]) == pytest.approx(1, abs=1e-6)


def test_budgetdraft_loss_combines_branches_and_has_finite_gradients():
  keys = jax.random.split(jax.random.key(0), 3)
  teacher = jax.nn.softmax(jax.random.normal(keys[0], (2, 4, 11)) * 3)
  full = jax.random.normal(keys[1], (2, 4, 11))
  views = jax.random.normal(keys[2], (3, 2, 4, 11))
  mask = jnp.ones((2, 4))
  total, parts = losses.budgetdraft_loss(teacher, full, views, mask, sparse_weight=0.5,
                                         kl_weight=0.1)
  assert float(total) == pytest.approx(float(parts["full"] + 0.5 * parts["sparse"]), rel=1e-6)
  assert parts["per_view"].shape == parts["acceptance_views"].shape == (3,)
  grads = jax.grad(lambda f, v: losses.budgetdraft_loss(
      teacher, f, v, mask, sparse_weight=0.5, kl_weight=0.1)[0], argnums=(0, 1))(full, views)
  assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0 for g in grads)


def test_hard_labels_are_cross_entropy_to_the_teacher_argmax():
  teacher = jnp.array([[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]]])
  q = jnp.array([[[0.2, 0.5, 0.3], [0.25, 0.25, 0.5], [0.5, 0.5, 0.0]]])
  mask = jnp.ones((1, 3))
  loss, acceptance = losses.divergence(teacher, jnp.log(q), mask, 0.0, hard_labels=True)
  # Position 2's argmax (id 2) has q = 0: a reduced head cannot learn it, so it does not count.
  assert float(loss) == pytest.approx(-(np.log(0.5) + np.log(0.25)) / 2, rel=1e-6)
  soft_loss, soft_acceptance = losses.divergence(teacher, jnp.log(q), mask, 0.0)
  assert float(acceptance) == pytest.approx(float(soft_acceptance))  # reported the same way
  assert float(soft_loss) != pytest.approx(float(loss))
  grads = jax.grad(lambda logits: losses.divergence(teacher, logits, mask, 0.0, True)[0])(
      jnp.log(q))
  assert bool(jnp.all(jnp.isfinite(grads)))


def test_budget_weights_set_how_often_each_budget_is_drawn():
  config = TrainConfig(workdir="unused", budgets=(128, 256, 512), num_views=1,
                       budget_weights=(0.6, 0.4, 0.0))
  drawn = np.concatenate([budgets.sample_budgets(config, step) for step in range(2000)])
  assert 512 not in drawn
  assert np.mean(drawn == 128) == pytest.approx(0.6, abs=0.04)
  for weights in [(1.0, 1.0), (0.5, -0.1, 0.6), (0.0, 0.0, 0.0)]:
    with pytest.raises(ValueError, match="one weight >= 0 per budget"):
      TrainConfig(workdir="unused", budgets=(128, 256, 512), budget_weights=weights)


def test_bad_budget_configs_fail_clearly():
  config = lambda **fields: TrainConfig(workdir="unused", **fields)
  with pytest.raises(ValueError, match="budget list is empty"):
    config(budgets=(), num_views=2)
  with pytest.raises(ValueError, match="below sinks \\+ window"):
    config(budgets=(32, 256), num_views=2, sparsity=SparsityConfig(budget=None, sinks=4,
                                                                   window=64))
  with pytest.raises(ValueError, match="lambda"):
    config(budgets=(256,), num_views=1, sparse_weight=-1.0)
  drawn = budgets.sample_budgets(config(budgets=(128, 256, 512), num_views=4), step=0)
  assert drawn.shape == (4,) and set(drawn.tolist()) <= {128, 256, 512}


@pytest.mark.parametrize("budget", [70, 100, 300])
def test_keep_mask_equals_the_inference_kept_set(budget):
  """Training views keep exactly what `select_kept` keeps at inference, for a traced budget."""
  config = selection.SparsityConfig(policy="snapkv", budget=budget, sinks=4, window=32)
  scores = jax.random.uniform(jax.random.key(budget), (2, 2, 3, 256))
  lengths = jnp.array([256, 180])
  kept = np.asarray(selection.select_kept(scores, lengths, config))
  mask = np.asarray(jax.jit(selection.keep_mask, static_argnums=3)(
      scores, lengths, jnp.int32(budget), config))
  for index in np.ndindex(*kept.shape[:3]):
    assert set(np.flatnonzero(mask[index]).tolist()) == set(kept[index][kept[index] >= 0].tolist())
