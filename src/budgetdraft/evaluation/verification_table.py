"""Exact block efficiency of every verification rule, K = 1..4 paths, with the LP optimum.

Exact, not sampled: every draft and every random branch is enumerated (`verification.exact`).
Block efficiency = expected tokens emitted per verifier call = E[accepted] + 1. Instances: the BV
paper's toy example (i.i.d. positions, p = (1/3, 2/3), q = (2/3, 1/3), gamma = 2), then random
Markov pairs whose drafter mixes the target with an unrelated model (`mix` sets the divergence,
reported as the mean total variation over the nodes a draft can reach).
"""

from absl import logging
import numpy as np

from budgetdraft.verification import exact, lp

SINGLE_PATH = {"token-wise": "tokenwise", "BV": "block"}
MULTI_PATH = {"SpecInfer": "specinfer", "residual BV": "residual_bv", "GBV": "gbv"}
COLUMNS = (["instance", "K", "TV(q, p)"] + list(SINGLE_PATH) + list(MULTI_PATH) +
           ["LP optimum"])


def _rows(name: str, pairs: list, gamma: int, num_paths: list[int]) -> list[dict]:
  """One row per K: each column the mean over `pairs` (one pair = the exact instance)."""
  rows = []
  for paths in num_paths:
    per_pair = []
    for pair in pairs:
      result = {column: 1 + exact.emitted_law(pair, method, gamma)[1]
                for column, method in SINGLE_PATH.items()}
      result.update({column: 1 + exact.emitted_law(pair, method, gamma, paths)[1]
                     for column, method in MULTI_PATH.items()})
      result["LP optimum"] = 1 + lp.optimal_expected_accepted(pair, gamma, paths)
      result["TV(q, p)"] = exact.mean_total_variation(pair, gamma)
      per_pair.append(result)
      logging.info("%s K=%d: %s", name, paths, result)
    rows.append({"instance": name, "K": paths,
                 **{key: float(np.mean([r[key] for r in per_pair])) for key in per_pair[0]}})
  return rows


def verification_table(*, vocab_size: int, gamma: int, num_paths: list[int], mixes: list[float],
                       seeds: int) -> list[dict]:
  """Rows for the toy example, then for each mix the mean over `seeds` random Markov pairs."""
  if gamma < 1 or not num_paths or min(num_paths) < 1 or vocab_size < 2 or seeds < 1:
    raise ValueError(f"gamma={gamma} and num_paths={num_paths} must be >= 1, vocab_size="
                     f"{vocab_size} >= 2 and seeds={seeds} >= 1")
  toy = exact.iid_pair(np.array([1 / 3, 2 / 3]), np.array([2 / 3, 1 / 3]))
  rows = _rows("BV toy example (V=2, gamma=2)", [toy], 2, num_paths)
  for mix in mixes:
    pairs = [exact.random_markov_pair(seed, vocab_size, mix) for seed in range(seeds)]
    rows += _rows(f"Markov V={vocab_size}, gamma={gamma}, mix {mix}", pairs, gamma, num_paths)
  return rows
