"""Training views reproduce the inference sparse cache exactly, and are differentiable."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft import drafters
from budgetdraft.models.prefill import prefill
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.transformer import Transformer
from budgetdraft.sparsity import policies, selection
from budgetdraft.training import views

PROMPT_LEN, NUM_NEW, GAMMA = 48, 20, 2


def _sparse_decode_logits(config, params, tokens, sparsity, features=None):
  """Inference path: chunked prefill, policy scores, compress, then one token at a time."""
  model = Transformer(config)
  batch = tokens.shape[0]
  lengths = jnp.full((batch,), PROMPT_LEN, jnp.int32)
  prompt_features = None if features is None else features[:, :PROMPT_LEN]
  _, cache = prefill(model, params, tokens[:, :PROMPT_LEN], lengths,
                     FullKVCache.init(config, batch, tokens.shape[1]), 16,
                     features=prompt_features)
  cache = selection.sparse_cache(config, params, cache, tokens[:, :PROMPT_LEN], lengths, sparsity,
                                 GAMMA, jax.random.key(0), features=prompt_features)

  @jax.jit
  def step(cache, token, position, step_features):
    hidden, cache = model.apply({"params": params}, token, position, cache,
                                features=step_features)
    return cache, model.apply({"params": params}, hidden, method=Transformer.logits)[:, 0]

  logits = []
  for t in range(PROMPT_LEN, tokens.shape[1]):
    step_features = None if features is None else features[:, t:t + 1]
    cache, step_logits = step(cache, tokens[:, t:t + 1], jnp.full((batch, 1), t), step_features)
    logits.append(step_logits)
  return jnp.stack(logits, axis=1)


def _full_decode_logits(config, params, tokens, features=None):
  model = Transformer(config)
  batch = tokens.shape[0]
  cache = FullKVCache.init(config, batch, tokens.shape[1])
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden, _ = model.apply({"params": params}, tokens, positions, cache, features=features)
  return model.apply({"params": params}, hidden[:, PROMPT_LEN:], method=Transformer.logits)


@pytest.mark.parametrize("policy,eagle", [("snapkv", False), ("h2o", False),
                                          ("streaming", False), ("chunk_retrieval", False),
                                          ("snapkv", True), ("h2o", True)])
def test_views_equal_inference_sparse_cache(tiny_model, policy, eagle):
  """Also for an EAGLE-style drafter, whose every pass takes feature inputs."""
  config, params = tiny_model
  features = None
  if eagle:
    config, trainable, shared = drafters.initialize("eagle", config, params, 2)
    params = {**shared, **trainable}
    features = jax.random.normal(jax.random.key(4), (2, PROMPT_LEN + NUM_NEW, config.dim))
  tokens = jax.random.randint(jax.random.key(1), (2, PROMPT_LEN + NUM_NEW), 0, config.vocab_size)
  budget_list = (12, 24)
  # recent + gamma = 8 < NUM_NEW: the ring wraps, so the view's window rule is exercised.
  sparsity = [selection.SparsityConfig(policy=policy, budget=b, sinks=2, window=4, recent=6,
                                       chunk=4) for b in budget_list]
  _, logits = views.all_branch_outputs(config, params, tokens, PROMPT_LEN, jnp.array(budget_list),
                                        sparsity[0], sparsity[0].ring_size(GAMMA),
                                        jax.random.key(0), features)
  assert logits.shape == (3, 2, NUM_NEW, config.vocab_size)
  np.testing.assert_allclose(logits[0], _full_decode_logits(config, params, tokens, features),
                             atol=2e-4)
  for view, config_b in zip(logits[1:], sparsity):
    np.testing.assert_allclose(
        view, _sparse_decode_logits(config, params, tokens, config_b, features), atol=2e-4)
  # The views really differ from the full branch (the test would be vacuous otherwise).
  assert float(jnp.abs(logits[1] - logits[0]).max()) > 1e-2


def test_view_gradients_match_finite_differences(tiny_model):
  """The gradient through the prompt pass, the kept keys and the continuation is the true one."""
  config, params = tiny_model
  tokens = jax.random.randint(jax.random.key(2), (1, PROMPT_LEN + NUM_NEW), 0, config.vocab_size)
  # Streaming: a kept set that cannot flip under the perturbation (selection is discrete).
  sparsity = selection.SparsityConfig(policy="streaming", budget=12, sinks=2, window=4, recent=6)

  def view_loss(params):
    _, logits = views.all_branch_outputs(config, params, tokens, PROMPT_LEN, jnp.array([12]),
                                          sparsity, 8, jax.random.key(0))
    return jnp.mean(jax.nn.log_softmax(logits[1])[..., 0])

  grads = jax.jit(jax.grad(view_loss))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  step = 1e-4
  shifted = lambda sign: jax.tree.map(lambda x, d: x + sign * step * d, params, direction)
  loss = jax.jit(view_loss)
  finite_difference = (loss(shifted(1)) - loss(shifted(-1))) / (2 * step)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert float(analytic) == pytest.approx(float(finite_difference), rel=2e-2)


def test_a_prefix_without_gradient_trains_only_through_the_continuation(tiny_model):
  """prefix_gradient=False (the published recipe): the same outputs, and the gradient of a loss
  whose prompt keys are constants (computed here by the differentiable pass, then frozen)."""
  config, params = tiny_model
  tokens = jax.random.randint(jax.random.key(5), (1, PROMPT_LEN + NUM_NEW), 0, config.vocab_size)
  sparsity = selection.SparsityConfig(policy="chunk_retrieval", budget=None, sinks=0, window=0,
                                      recent=6, chunk=4)
  budgets = jnp.array([16])

  def view_loss(params, prefix_gradient):
    _, logits = views.all_branch_outputs(config, params, tokens, PROMPT_LEN, budgets, sparsity,
                                         8, jax.random.key(0), prefix_gradient=prefix_gradient)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  prompt, continuation = tokens[:, :PROMPT_LEN], tokens[:, PROMPT_LEN:]
  frozen_cache = views.prompt_pass(config, params, prompt, tokens.shape[1])
  keeps = views.keep_masks(config, params, frozen_cache, prompt, budgets, sparsity,
                           jax.random.key(0))
  keeps = jnp.concatenate([jnp.ones_like(keeps[:1]), keeps])

  def frozen_prefix_loss(params):
    _, logits = views.branch_outputs(config, params, frozen_cache, continuation, keeps, 8)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  gradient = jax.jit(jax.grad(view_loss, has_aux=True), static_argnums=1)
  no_prefix, no_prefix_logits = gradient(params, False)
  full, full_logits = gradient(params, True)
  np.testing.assert_allclose(no_prefix_logits, full_logits, atol=2e-4)
  expected = jax.jit(jax.grad(frozen_prefix_loss))(params)
  for got, want in zip(jax.tree.leaves(no_prefix), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  differences = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(no_prefix),
                                                              jax.tree.leaves(full))]
  assert max(differences) > 1e-4  # the prefix's gradient was really left out


def test_views_on_the_pallas_kernel_equal_the_jnp_views_with_their_gradients(tiny_model):
  """attention_impl="pallas": the prompt pass and every branch (kept keys + the ring) run on the
  block-sparse kernel and its custom VJP."""
  config, params = tiny_model
  tokens = jax.random.randint(jax.random.key(6), (2, PROMPT_LEN + NUM_NEW), 0, config.vocab_size)
  sparsity = selection.SparsityConfig(policy="snapkv", budget=None, sinks=2, window=4, recent=6)
  weights = jax.random.normal(jax.random.key(7), (3, 2, NUM_NEW, config.vocab_size))

  def loss(params, config):
    _, logits = views.all_branch_outputs(config, params, tokens, PROMPT_LEN, jnp.array([12, 24]),
                                         sparsity, 8, jax.random.key(0))
    return jnp.sum(jax.nn.log_softmax(logits) * weights), logits

  pallas = dataclasses.replace(config, attention_impl="pallas")
  (_, expected), expected_grads = jax.value_and_grad(loss, has_aux=True)(params, config)
  (_, actual), actual_grads = jax.value_and_grad(loss, has_aux=True)(params, pallas)
  np.testing.assert_allclose(actual, expected, atol=2e-4)
  assert "pallas_call" in str(jax.make_jaxpr(lambda p: loss(p, pallas))(params))
  for a, e in zip(jax.tree.leaves(actual_grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, e, atol=2e-3, rtol=2e-3)


def test_a_self_fed_pass_is_what_the_second_draft_step_computes(tiny_model):
  """The EAGLE drafter's second draft step is fed its own hidden state from the step before; the
  self-fed pass feeds it the same, so at the continuation's second position (whose keys before it
  were all fed the verifier's states, as in decoding) its logits are that draft step's."""
  config, params = tiny_model
  config, trainable, shared = drafters.initialize("eagle", config, params, 2)
  params = {**shared, **trainable}
  model = Transformer(config)
  features = jax.random.normal(jax.random.key(4), (2, PROMPT_LEN + NUM_NEW, config.dim))
  tokens = jax.random.randint(jax.random.key(1), (2, PROMPT_LEN + NUM_NEW), 0, config.vocab_size)
  sparsity = selection.SparsityConfig(policy="snapkv", budget=None, sinks=2, window=4, recent=6)
  cache, keeps = views.prompt_views(config, params, tokens, PROMPT_LEN, jnp.array([12]), sparsity,
                                    jax.random.key(0), features)
  continuation, fed = tokens[:, PROMPT_LEN:], features[:, PROMPT_LEN:]
  hidden, logits = views.branch_outputs(config, params, cache, continuation, keeps, 8, fed)
  own = views.self_fed_features(fed, hidden)
  np.testing.assert_array_equal(own[:, :, 0], jnp.broadcast_to(fed[:, 0], own[:, :, 0].shape))
  np.testing.assert_array_equal(own[:, :, 1:], hidden[:, :, :-1])
  _, self_fed_logits = views.branch_outputs(config, params, cache, continuation, keeps, 8, own)

  # Decoding: the verifier's states up to the first continuation position, then the draft step.
  first = PROMPT_LEN + 1
  positions = jnp.broadcast_to(jnp.arange(first), (2, first))
  prefix_hidden, full_cache = model.apply(
      {"params": params}, tokens[:, :first], positions,
      FullKVCache.init(config, 2, tokens.shape[1]), features=features[:, :first])
  step_hidden, _ = model.apply({"params": params}, tokens[:, first:first + 1],
                               jnp.full((2, 1), first), full_cache,
                               features=prefix_hidden[:, -1:])
  step_logits = model.apply({"params": params}, step_hidden[:, 0], method=Transformer.logits)
  np.testing.assert_allclose(self_fed_logits[0, :, 1], step_logits, atol=2e-4)
  assert float(jnp.abs(self_fed_logits[0, :, 1] - logits[0, :, 1]).max()) > 1e-2  # not vacuous
  # The fed states are inputs, not a path for gradients.
  gradient = jax.grad(lambda h: views.self_fed_features(fed, h).sum())(hidden)
  assert not np.any(np.asarray(gradient))
  with pytest.raises(ValueError, match="one width"):
    views.self_fed_features(fed[..., :4], hidden)
