"""Block efficiency of every verification rule on synthetic Markov draft/target pairs, with LP optima.

  python experiments/verification_table.py --vocab_size=3 --gamma=3 --num_paths=2

Exact, not sampled: every draft and every random branch is enumerated (budgetdraft.verification.exact).
Block efficiency = expected tokens emitted per verifier call = E[accepted] + 1. The drafter mixes the
target with an unrelated model (`mix`), which sets the divergence, reported as the mean total
variation between the two next-token laws.
"""

import numpy as np
from absl import app, flags, logging

from budgetdraft import tables
from budgetdraft.verification import exact, lp

_VOCAB = flags.DEFINE_integer("vocab_size", 3, "Tiny vocabulary (the enumeration is V^(gamma K)).")
_GAMMA = flags.DEFINE_integer("gamma", 3, "Drafted tokens per path.")
_PATHS = flags.DEFINE_integer("num_paths", 2, "Paths for the multi-path rules.")
_MIXES = flags.DEFINE_list("mixes", ["0.1", "0.3", "0.6", "0.9"], "Drafter = (1-mix) target + mix other.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Random pairs averaged per mix.")
_OUTPUT = flags.DEFINE_string("output", "results/verification_table", "Results path (no extension).")


def main(argv):
  del argv
  gamma, num_paths = _GAMMA.value, _PATHS.value
  multi = f"K={num_paths}"
  columns = {"token-wise": ("tokenwise", 1), "block (BV)": ("block", 1),
             f"SpecInfer {multi}": ("specinfer", num_paths), f"GBV {multi}": ("gbv", num_paths)}
  rows = []
  for mix in map(float, _MIXES.value):
    per_seed = []
    for seed in range(_SEEDS.value):
      pair = exact.random_markov_pair(seed, _VOCAB.value, mix)
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
  table = tables.markdown_table(rows, order)
  print(table)
  notes = (f"Exact block efficiency (tokens per verifier call), vocabulary {_VOCAB.value}, "
           f"gamma={gamma}, mean over {_SEEDS.value} random Markov pairs per row. "
           "BV equals the K=1 LP optimum (no lossless single-path verifier does better); GBV is our "
           "greedy multi-path generalization of BV (see verification/multipath.py).")
  tables.write_results(_OUTPUT.value, "Verification rules: block efficiency", table, rows, notes)


if __name__ == "__main__":
  app.run(main)
