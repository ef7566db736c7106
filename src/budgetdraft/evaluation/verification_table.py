"""Exact block efficiency of every verification rule on synthetic Markov draft/target pairs, with
the LP optima.

Exact, not sampled: every draft and every random branch is enumerated (`verification.exact`).
Block efficiency = expected tokens emitted per verifier call = E[accepted] + 1. The drafter mixes
the target with an unrelated model (`mix`), which sets the divergence, reported as the mean total
variation between the two next-token laws.
"""

from absl import logging
import numpy as np

from budgetdraft.verification import exact, lp


def verification_table(*, vocab_size: int, gamma: int, num_paths: int, mixes: list[float],
                       seeds: int) -> tuple[list[dict], list[str]]:
  """(rows, column order): one row per mix, each the mean over `seeds` random pairs."""
  multi = f"K={num_paths}"
  columns = {"token-wise": ("tokenwise", 1), "block (BV)": ("block", 1),
             f"SpecInfer {multi}": ("specinfer", num_paths), f"GBV {multi}": ("gbv", num_paths)}
  rows = []
  for mix in mixes:
    per_seed = []
    for seed in range(seeds):
      pair = exact.random_markov_pair(seed, vocab_size, mix)
      result = {name: 1 + exact.emitted_law(pair, method, gamma, paths)[1]
                for name, (method, paths) in columns.items()}
      result["LP optimum K=1"] = 1 + lp.optimal_expected_accepted(pair, gamma, 1)
      result[f"LP optimum {multi}"] = 1 + lp.optimal_expected_accepted(pair, gamma, num_paths)
      result["TV(q, p)"] = 0.5 * float(np.abs(pair.draft - pair.target).sum(-1).mean())
      per_seed.append(result)
      logging.info("mix %.2f seed %d: %s", mix, seed, result)
    row = {"mix": mix}
    row.update({key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]})
    rows.append(row)
  order = ["mix", "TV(q, p)"] + list(columns) + ["LP optimum K=1", f"LP optimum {multi}"]
  return rows, order
