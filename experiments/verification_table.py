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
  if cfg.gamma < 1 or cfg.num_paths < 1 or cfg.vocab_size < 2 or cfg.seeds < 1:
    raise ValueError(f"gamma={cfg.gamma} and num_paths={cfg.num_paths} must be >= 1, "
                     f"vocab_size={cfg.vocab_size} >= 2 and seeds={cfg.seeds} >= 1")
  rows, columns = verification_table.verification_table(
      vocab_size=cfg.vocab_size, gamma=cfg.gamma, num_paths=cfg.num_paths,
      mixes=list(cfg.mixes), seeds=cfg.seeds)

  path = results.output_path(_RESULTS_DIR.value, "verification_table",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  notes = (f"Exact block efficiency (tokens per verifier call), vocabulary {cfg.vocab_size}, "
           f"gamma={cfg.gamma}, mean over {cfg.seeds} random Markov pairs per row. "
           "BV equals the K=1 LP optimum (no lossless single-path verifier does better); GBV is "
           "our greedy multi-path generalization of BV (see verification/multipath.py).")
  print(results.write(path, "Verification rules: block efficiency", rows, notes, columns))


if __name__ == "__main__":
  app.run(main)
