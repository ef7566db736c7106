"""Budget sampling for multi-view training.

Each step draws `num_views` budgets, with replacement, from the configured set: uniformly (a set
of powers of two makes that log-uniform over the range) or with `budget_weights` (the published
recipe draws one budget per step from {256, 512, 1024, 2048} with weights {0.4, 0.3, 0.2, 0.1}).
The draw is a function of (seed, step), so a resumed run draws what an uninterrupted one would.
Budgets reach the compiled step as a traced array (`selection.keep_mask` takes a traced budget),
so new budgets never recompile it.
"""

import numpy as np

from budgetdraft.training.config import TrainConfig


def sample_budgets(config: TrainConfig, step: int) -> np.ndarray:
  """[num_views] int32 budgets of training step `step` ([0] for naive distillation)."""
  rng = np.random.default_rng([config.seed, step])
  weights = None
  if config.budget_weights:
    weights = np.asarray(config.budget_weights, np.float64) / sum(config.budget_weights)
  return rng.choice(np.asarray(config.budgets, np.int32), size=config.num_views, p=weights)
