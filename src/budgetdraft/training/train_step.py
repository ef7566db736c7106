"""The compiled BudgetDraft train step: all branches, the shared teacher, one optax update.

One compiled step serves every budget: budgets are a traced [M] array (`selection.keep_mask`)
and only M is static, so sampling new budgets each step never recompiles. The step's randomness
(the `random` policy's) is folded from (seed, step), so a resumed run repeats an uninterrupted one.
On a mesh (`state_shardings`), the batch is split over `data` and the parameters and optimizer
state are sharded by `parallel.FSDP_RULES`; GSPMD inserts the gathers and the gradient reduction,
so the step computes what it computes on one device.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax

from budgetdraft import parallel
from budgetdraft.models import prefill
from budgetdraft.models.config import ModelConfig
from budgetdraft.training import losses, teacher as teacher_lib, views
from budgetdraft.training.config import TrainConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array           # scalar int32: steps taken
  data_position: jax.Array  # scalar int32: sequences consumed
  params: dict              # the drafter's own params (shared embedding / head excluded)
  opt_state: optax.OptState


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay to `final_lr_fraction`, after global-norm
  clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1),
      end_value=config.final_lr_fraction * config.learning_rate)
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


def state_shardings(mesh, state: TrainState, optimizer: optax.GradientTransformation) -> TrainState:
  """NamedShardings of a train state: params and their optimizer moments by `FSDP_RULES`, the
  counters replicated."""
  params = parallel.param_shardings(mesh, state.params, parallel.FSDP_RULES)
  replicated = parallel.replicated(mesh)
  opt_state = optax.tree_map_params(optimizer, lambda _, sharding: sharding, state.opt_state,
                                    params, transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, data_position=replicated, params=params, opt_state=opt_state)


def make_train_step(model_config: ModelConfig, config: TrainConfig,
                    optimizer: optax.GradientTransformation, shardings: TrainState | None = None):
  """train_step(state, shared, tokens [B, S], teacher_ids/probs [B, C, k] (ids None: probs is the
  whole law [B, C, V]), budgets [M], verifier_hidden [B, S, dim] or None: an EAGLE-style
  drafter's inputs and regression target).

  shardings: the state's (`state_shardings`) on a mesh, kept by every step; None on one device.
  """
  sparse_weight = config.sparse_weight if config.num_views else 0.0

  def loss_fn(trainable, shared, tokens, teacher_ids, teacher_probs, budgets, rng,
              verifier_hidden):
    params = {**shared, **trainable}
    features = None if verifier_hidden is None else prefill.feature_inputs(verifier_hidden)
    cache, keeps = views.prompt_views(model_config, params, tokens, config.prompt_len, budgets,
                                      config.sparsity, rng, features,
                                      prefix_gradient=config.prefix_gradient)
    continuation = tokens[:, config.prompt_len:]
    continuation_features = None if features is None else features[:, config.prompt_len:]
    passes = lambda features: views.branch_outputs(model_config, params, cache, continuation,
                                                   keeps, config.ring_size, features)
    hidden, logits = passes(continuation_features)
    teacher = teacher_lib.dense_probs(teacher_ids, teacher_probs, model_config.vocab_size)
    mask = jnp.ones(teacher.shape[:-1])
    loss = functools.partial(losses.budgetdraft_loss, sparse_weight=sparse_weight,
                             kl_weight=config.kl_weight, hard_labels=config.targets == "argmax",
                             rejection_weight=config.rejection_weight)
    total, parts = loss(teacher, logits[0], logits[1:], mask)
    if config.self_fed_weight:
      # The first position is fed the verifier's state in both passes: only the others count.
      _, self_fed_logits = passes(views.self_fed_features(continuation_features, hidden))
      self_fed, self_fed_parts = loss(teacher, self_fed_logits[0], self_fed_logits[1:],
                                      mask.at[:, 0].set(0.0))
      total = total + config.self_fed_weight * self_fed
      parts = {**parts, "self_fed": self_fed,
               "acceptance_self_fed": self_fed_parts["acceptance_full"]}
    if config.feature_weight:
      target = verifier_hidden[:, config.prompt_len:]
      per_branch = jax.vmap(lambda h: losses.feature_regression(h, target, mask))(hidden)
      feature = per_branch[0] + sparse_weight * (
          jnp.mean(per_branch[1:]) if per_branch.shape[0] > 1 else 0.0)
      total = total + config.feature_weight * feature
      parts = {**parts, "feature": feature}
    return total, parts

  out_shardings = None
  if shardings is not None:
    out_shardings = (shardings, parallel.replicated(shardings.step.mesh))

  @functools.partial(jax.jit, donate_argnums=(0,), out_shardings=out_shardings)
  def train_step(state: TrainState, shared, tokens, teacher_ids, teacher_probs, budgets,
                 verifier_hidden=None):
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, shared, tokens, teacher_ids, teacher_probs, budgets, rng, verifier_hidden)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, data_position=state.data_position + tokens.shape[0],
                          params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts}

  return train_step
