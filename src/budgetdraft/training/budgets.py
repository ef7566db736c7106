"""Budget sampling for multi-view training, and budgets as keep masks.

Budgets are drawn per step on the host from a fixed candidate set (uniform over the set; a set of
powers of two makes that log-uniform over the range). Each view keeps, per layer and KV head, the
prompt keys ranked < budget by the inference selection scores, as a mask, so the budget is a traced
value and one compiled train step serves every budget.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from budgetdraft.sparsity.selection import SparsityConfig


@dataclasses.dataclass(frozen=True)
class BudgetSampler:
  budgets: tuple[int, ...]  # candidate budgets (kept prompt keys per layer and KV head)
  num_views: int            # M budgets sampled per step
  sinks: int = 4
  window: int = 64
  sparse_weight: float = 1.0  # lambda in L_full + lambda * mean_B L_sparse(B)

  def __post_init__(self):
    if not self.budgets:
      raise ValueError("the budget list is empty; give at least one budget")
    if min(self.budgets) < self.sinks + self.window:
      raise ValueError(f"budget {min(self.budgets)} is below sinks + window = "
                       f"{self.sinks} + {self.window}")
    if self.num_views < 1:
      raise ValueError(f"num_views={self.num_views} must be >= 1")
    if self.sparse_weight < 0:
      raise ValueError(f"sparse_weight (lambda)={self.sparse_weight} must be >= 0")

  def sample(self, rng: np.random.Generator) -> np.ndarray:
    """[num_views] budgets, with replacement."""
    return rng.choice(np.asarray(self.budgets, np.int32), size=self.num_views)


def keep_mask_from_scores(scores, prompt_lengths, budget, config: SparsityConfig):
  """[L, B, Hkv, S] bool: the prompt keys a view at `budget` (traced) keeps.

  The same rule as `selection.select_kept` (sinks and window forced, then the best scores), written
  as a rank threshold so that the budget need not be static.
  """
  position = jnp.arange(scores.shape[-1])
  length = prompt_lengths[None, :, None, None]
  valid = position < length
  forced = valid & ((position < config.sinks) | (position >= length - config.window))
  ranked = jnp.where(forced, jnp.inf, jnp.where(valid, scores.astype(jnp.float32), -jnp.inf))
  order = jnp.argsort(-ranked, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  return valid & (rank < budget)
