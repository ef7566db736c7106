"""Autoregressive prefill time and decode speed of the verifier, against the memory-bandwidth floor.

  python experiments/bench_decode.py --config=configs/bench_decode.py:smollm2

Writes results/bench_decode.{md,json} and, for forwards of 1 and gamma + 1 tokens against
max(bytes / bandwidth, FLOPs / matmul peak), results/bench_decode_forwards.{md,json}. The
measurement is `budgetdraft.evaluation.decode_speed`;
with HF transformers installed (`pip install -e .[peers]`), its AR decoding of the same model and
prompt is measured in the same run (`budgetdraft.evaluation.peers`).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from budgetdraft import launch, parallel
from budgetdraft.data import packing
from budgetdraft.evaluation import decode_speed, peers, results, timing
from budgetdraft.models import checkpoint_io

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_decode.py:smollm2")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table goes.")
# Our layer layouts (`transformer.unroll`), each made from the loaded (scanned) model on demand:
# the decoding layout on the CPU kernels where they run, the same on XLA's ops, the stack.
_LAYOUTS = {"packed": checkpoint_io.Checkpoint.unrolled,
            "unrolled": lambda model: model.with_attention_impl("jnp").unrolled(),
            "scanned": lambda model: model}


def main(argv):
  del argv
  cfg = _CONFIG.value
  if not cfg.layouts or set(cfg.layouts) - set(_LAYOUTS):
    raise ValueError(f"--config.layouts={cfg.layouts!r}: expected a non-empty tuple of "
                     f"{tuple(_LAYOUTS)}")
  mesh = launch.mesh(cfg.mesh)
  model = parallel.place_checkpoint(mesh, launch.checkpoint(cfg.checkpoint))
  prompt = packing.dataset_sequences(cfg.dataset, cfg.data_dir, cfg.split, model.tokenizer,
                                     max(cfg.contexts) - cfg.max_new_tokens, 1)
  bandwidth, peak = timing.read_bandwidth(), timing.matmul_peak()
  logging.info("read bandwidth %.1f GB/s, matmul peak %.0f GFLOP/s", bandwidth / 1e9, peak / 1e9)
  rows = []
  for layout in cfg.layouts:  # the decoding layout, then the stacked one it replaces
    rows += decode_speed.decode_speed(_LAYOUTS[layout](model), prompt, list(cfg.contexts),
                                      max_new_tokens=cfg.max_new_tokens,
                                      prefill_chunk=cfg.prefill_chunk, bandwidth=bandwidth,
                                      peak=peak, gamma=cfg.gamma)
  forwards = [forward for row in rows for forward in row.pop("forwards")]
  if cfg.hf_peer and peers.hf_installed():
    rows += peers.hf_decode_speed(model, prompt, list(cfg.contexts),
                                  max_new_tokens=cfg.max_new_tokens, bandwidth=bandwidth,
                                  weight_bytes=timing.tree_bytes(model.params),
                                  reference_rows=rows[:len(cfg.contexts)])
  elif cfg.hf_peer:
    logging.warning("HF transformers is not installed (pip install -e .[peers]): no peer rows")
  if not parallel.is_writer():
    return

  path = results.output_path(_RESULTS_DIR.value, "bench_decode",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  config = model.config
  notes = (f"Model: {model.name} ({timing.tree_bytes(model.params) / 1e6:.0f} MB of "
           f"{config.param_dtype} weights, {config.compute_dtype} compute). Batch 1, greedy, "
           f"{cfg.max_new_tokens} new tokens; ms/step is the median of 5 decode runs (spread "
           f"beside it).\nMeasured read bandwidth (best of 5 max-reductions over 1 GiB): "
           f"{bandwidth / 1e9:.1f} GB/s. Floor = (weights + KV at the full context) / bandwidth "
           "per decode step; `x floor` = median step time / floor.")
  notes += ("\nLayers: `packed` is the decoding layout that generate, speedup and the batch "
            "table use on a CPU: each layer on weights and cache arrays of its own, the weights "
            "packed in 64-column panels, and the C++ kernels (`budgetdraft.cpu_kernels`) for "
            "the matmuls and for attention over the cache; `unrolled` is the same layout on "
            "XLA's own ops (`--attention_impl=jnp`); `scanned` runs the stacked layers in a "
            "scan, which copies each layer's weights and keys out of the stack on every step.")
  if len(rows) > len(cfg.layouts) * len(cfg.contexts):
    notes += (f"\nThe rows of all systems come from this one run on the same prompt; `same greedy "
              f"tokens`: the peer's leading greedy tokens equal to ours (of {cfg.max_new_tokens}).")
  columns = [key for key in {**rows[0], **rows[-1]} if key != "tokens"]
  rows = [{key: row.get(key, "") for key in columns} for row in rows]
  print(results.write(path, "AR decode benchmark", rows, notes))
  print(results.write(
      path + "_forwards", f"A forward of T tokens against its floor (T = 1: an AR step; "
      f"T = {cfg.gamma + 1}: a verify step at gamma {cfg.gamma})", forwards,
      f"Same run, model and prompt as {os.path.basename(path)}.md. Each forward (logits "
      "included) is timed in a compiled loop that rolls the cache back: median of 5 runs of 16 "
      "forwards. Floor = max(bytes floor, FLOPs floor): bytes floor = (weights + KV at the "
      f"context) / read bandwidth ({bandwidth / 1e9:.1f} GB/s, best of 5 max-reductions over 1 "
      f"GiB); FLOPs floor = FLOPs / matmul peak ({peak / 1e9:.0f} GFLOP/s, best of 5 float32 "
      "1024 x 1024 x 1024 products). GFLOP/s = the forward's FLOPs over its time."))

if __name__ == "__main__":
  app.run(main)
