"""Autoregressive prefill time and decode speed of the verifier, against the memory-bandwidth floor.

  python experiments/bench_decode.py --config=configs/bench_decode.py:smollm2

Writes results/bench_decode.{md,json}. The measurement is `budgetdraft.evaluation.decode_speed`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from budgetdraft.data import packing
from budgetdraft.evaluation import decode_speed, results, timing
from budgetdraft.models import checkpoint_io

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_decode.py:smollm2")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table goes.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  model = checkpoint_io.load(cfg.checkpoint)
  prompt = packing.dataset_sequences(cfg.dataset, cfg.data_dir, cfg.split, model.tokenizer,
                                     max(cfg.contexts) - cfg.max_new_tokens, 1)
  bandwidth = timing.read_bandwidth()
  logging.info("read bandwidth %.1f GB/s", bandwidth / 1e9)
  rows = decode_speed.decode_speed(model, prompt, list(cfg.contexts),
                                   max_new_tokens=cfg.max_new_tokens,
                                   prefill_chunk=cfg.prefill_chunk, bandwidth=bandwidth)

  path = results.output_path(_RESULTS_DIR.value, "bench_decode",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  config = model.config
  notes = (f"Model: {model.name} ({timing.tree_bytes(model.params) / 1e6:.0f} MB of "
           f"{config.param_dtype} weights, {config.compute_dtype} compute). Batch 1, greedy, "
           f"{cfg.max_new_tokens} new tokens; ms/step is the median of 5 decode runs (spread "
           f"beside it).\nMeasured read bandwidth (best of 5 max-reductions over 1 GiB): "
           f"{bandwidth / 1e9:.1f} GB/s. Floor = (weights + KV at the full context) / bandwidth "
           "per decode step; `x floor` = median step time / floor.")
  print(results.write(path, "AR decode benchmark", rows, notes))


if __name__ == "__main__":
  app.run(main)
