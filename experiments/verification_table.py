"""Block efficiency of every verification rule on synthetic Markov draft/target pairs, with LP optima.

  python experiments/verification_table.py --config=configs/verification_table.py:default

Exact, not sampled (`budgetdraft.evaluation.verification_table`). Writes
results/verification_table.{md,json}.
"""

from absl import app, flags
from ml_collections import config_flags

from budgetdraft.evaluation import results, verification_table

_CONFIG = config_flags.DEFINE_config_file("config", "configs/verification_table.py:default")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table goes.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  rows = verification_table.verification_table(
      vocab_size=cfg.vocab_size, gamma=cfg.gamma, num_paths=list(cfg.num_paths),
      mixes=list(cfg.mixes), seeds=cfg.seeds)

  path = results.output_path(_RESULTS_DIR.value, "verification_table",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  notes = ("Exact block efficiency (tokens per verifier call; token-wise and BV use one path). "
           f"Markov rows: mean over {cfg.seeds} random pairs. LP optimum = the best any lossless "
           "K-path verifier can do; BV attains it for K = 1. GBV is the published greedy "
           "multi-path block verification (select the lexicographic best path by min(1, p/q), "
           "then BV against that path's law q_K; verification/gbv.py); residual BV is our "
           "sequential residual construction (verification/multipath.py).")
  print(results.write(path, "Verification rules: block efficiency", rows, notes,
                      verification_table.COLUMNS))


if __name__ == "__main__":
  app.run(main)
