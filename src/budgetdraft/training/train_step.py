"""The compiled BudgetDraft train step: all branches, the shared teacher, one optax update.

One compiled step serves every budget: budgets are a traced [M] array (`keep_mask_from_scores`)
and only M is static, so sampling new budgets each step never recompiles. The step's randomness
(the `random` policy's) is folded from (seed, step), so a resumed run repeats an uninterrupted one.
"""

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from budgetdraft.models.config import ModelConfig
from budgetdraft.sparsity.selection import SparsityConfig
from budgetdraft.training import losses, teacher as teacher_lib, views


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static settings of the compiled train step."""

  prompt_len: int
  sparsity: SparsityConfig  # policy, sinks, window, recent (its budget field is unused)
  ring_size: int            # recent + gamma: tokens since the compression point a view sees
  sparse_weight: float
  kl_weight: float
  seed: int


@flax.struct.dataclass
class TrainState:
  step: jax.Array           # scalar int32: steps taken
  data_position: jax.Array  # scalar int32: sequences consumed
  params: dict              # the drafter's own params (shared embedding / head excluded)
  opt_state: optax.OptState


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay to 10%, after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
      end_value=0.1 * cfg.learning_rate)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))


def make_train_step(model_config: ModelConfig, settings: StepSettings,
                    optimizer: optax.GradientTransformation):
  """train_step(state, shared, tokens [B, S], teacher_ids/probs [B, C, k], budgets [M])."""

  def loss_fn(trainable, shared, tokens, teacher_ids, teacher_probs, budgets, rng):
    logits = views.all_branch_logits(model_config, {**shared, **trainable}, tokens,
                                     settings.prompt_len, budgets, settings.sparsity,
                                     settings.ring_size, rng)
    teacher = teacher_lib.dense_probs(teacher_ids, teacher_probs, model_config.vocab_size)
    mask = jnp.ones(teacher.shape[:-1])
    return losses.budgetdraft_loss(teacher, logits[0], logits[1:], mask,
                                   sparse_weight=settings.sparse_weight,
                                   kl_weight=settings.kl_weight)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_step(state: TrainState, shared, tokens, teacher_ids, teacher_probs, budgets):
    rng = jax.random.fold_in(jax.random.key(settings.seed), state.step)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, shared, tokens, teacher_ids, teacher_probs, budgets, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, data_position=state.data_position + tokens.shape[0],
                          params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **parts}

  return train_step
