"""Decode throughput against batch size at one context: AR, self-drafting over a sparse cache and
the shipped drafter, side by side in one run.

  python experiments/bench_batch.py --config=configs/bench_batch.py:smollm2

Writes results/bench_batch.{md,json}. The measurement is `budgetdraft.evaluation.batch_throughput`;
with several devices it runs on `--config.mesh` (params tensor-parallel, rows over `data`).
"""

from absl import app, flags
from ml_collections import config_flags

from budgetdraft import drafters, launch, parallel
from budgetdraft.data import packing
from budgetdraft.evaluation import batch_throughput, results, speedup

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_batch.py:smollm2")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table goes.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  variants = speedup.variants(cfg)
  for variant in variants:
    drafters.check(variant.drafter)
  prompt_len = speedup.prompt_length(cfg.context, variants)
  mesh = launch.mesh(cfg.mesh)
  verifier = parallel.place_checkpoint(mesh, launch.checkpoint(cfg.checkpoint))
  loaded = {variant.drafter: parallel.place_drafter(mesh, drafters.load(
      variant.drafter, verifier.config, verifier.params)) for variant in variants}
  prompts = packing.dataset_sequences(cfg.dataset, cfg.data_dir, cfg.split, verifier.tokenizer,
                                      prompt_len, cfg.distinct_prompts)
  rows = batch_throughput.batch_throughput(verifier, loaded, variants, prompts,
                                           list(cfg.batch_sizes), repeats=cfg.repeats, mesh=mesh)
  if not parallel.is_writer():
    return

  path = results.output_path(_RESULTS_DIR.value, "bench_batch",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  notes = (f"Verifier {verifier.name}; context {cfg.context} ({prompt_len}-token prompts + "
           f"{cfg.max_new_tokens} new tokens), temperature {cfg.temperature}. Each system "
           f"prefills {cfg.distinct_prompts} distinct held-out {cfg.dataset}/{cfg.split} prompts "
           "once; at batch B, row i continues prompt i mod "
           f"{cfg.distinct_prompts} (prefill is not timed). decode tok/s = B x "
           f"{cfg.max_new_tokens} / the decode loop's wall time, median of {cfg.repeats} runs "
           "(min and max beside it); speedup vs AR = AR's median time at the same batch over the "
           "system's. `= AR`: every row's greedy tokens equal AR's. KV share = the verifier's KV "
           "bytes at the full context over (weights + KV): what a verifier step reads.")
  print(results.write(path, "Decode throughput against batch size", rows, notes))
  if mismatched := [f"{r['system']} at batch {r['batch']}" for r in rows if r["= AR"] == "NO"]:
    raise RuntimeError(f"greedy speculative tokens differ from AR's in {mismatched}: a "
                       f"losslessness bug; the table is in {path}.md")


if __name__ == "__main__":
  app.run(main)
