"""Budget sampling for multi-view training.

Each step draws `num_views` budgets, with replacement, uniformly from the configured set (a set of
powers of two makes that log-uniform over the range). The draw is a function of (seed, step), so a
resumed run draws what an uninterrupted one would. Budgets reach the compiled step as a traced
array (`selection.keep_mask` takes a traced budget), so new budgets never recompile it.
"""

import numpy as np

from budgetdraft.training.config import TrainConfig


def sample_budgets(config: TrainConfig, step: int) -> np.ndarray:
  """[num_views] int32 budgets of training step `step` ([0] for naive distillation)."""
  rng = np.random.default_rng([config.seed, step])
  return rng.choice(np.asarray(config.budgets, np.int32), size=config.num_views)
