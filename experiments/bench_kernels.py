"""Pallas sparse-attention kernels vs their jnp references: time, bytes moved, share of bandwidth.

  python experiments/bench_kernels.py --config=configs/bench_kernels.py:default
  python experiments/bench_kernels.py --config.contexts="(4096,)" --config.shapes="('smollm2',)"

Writes results/bench_kernels.{md,json}. On CPU the kernels run in interpret mode: only the error
column means anything there. The measurement is `budgetdraft.evaluation.kernel_speed`.
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from budgetdraft.evaluation import kernel_speed, results, timing

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_kernels.py:default")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table goes.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  bandwidth = timing.read_bandwidth()
  rows = kernel_speed.kernel_speed(list(cfg.shapes), list(cfg.contexts), list(cfg.budgets),
                                   queries=cfg.queries, block=cfg.block, bandwidth=bandwidth)

  path = results.output_path(_RESULTS_DIR.value, "bench_kernels",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  interpret = jax.devices()[0].platform == "cpu"
  notes = (f"Device read bandwidth (max-reduction over 1 GiB): {bandwidth / 1e9:.1f} GB/s. "
           f"{cfg.queries} queries per row, batch 1, KV block {cfg.block}. "
           + ("CPU: kernels ran in Pallas INTERPRET mode, so their times are not kernel speed; "
              "only `max abs err` (kernel vs reference) is meaningful here." if interpret else ""))
  print(results.write(path, "Sparse-attention kernels", rows, notes))


if __name__ == "__main__":
  app.run(main)
