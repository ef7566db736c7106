"""Prune the verifier into drafters (Bonsai, issue 16) and measure them against the baselines.

  python experiments/prune.py --config=configs/prune.py:smollm2

Bonsai prunes to every target size in one iterative run (forward passes only); the one-shot
activation-magnitude baseline prunes each size directly; a layer cut of each size is the third.
Each pruned model is saved to <workdir>/<method>-<percent> and reused by a rerun. Then one table
(results/bonsai_<variant>.{md,json}): held-out perplexity, tokens per verifier call, step cost.
"""

import dataclasses
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from budgetdraft import drafters, launch, parallel
from budgetdraft.data import packing
from budgetdraft.evaluation import pruning as pruning_eval
from budgetdraft.evaluation import results, timing
from budgetdraft.models import checkpoint_io
from budgetdraft.pruning import bonsai, units
from budgetdraft.pruning import checkpoint as pruned_checkpoint
from budgetdraft.sparsity.selection import SparsityConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/prune.py:smollm2")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table goes.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  bonsai_config = bonsai.BonsaiConfig(targets=tuple(cfg.targets), **cfg.bonsai)
  sparsity = SparsityConfig(budget=None, **cfg.sparsity)
  for budget in cfg.budgets:
    sparsity.check_budget(budget)
  extra_sources = [source for source in cfg.drafters.split(",") if source]
  if (cfg.calibration_length - 1) > 512 and (cfg.calibration_length - 1) % 512:
    raise ValueError(f"calibration_length={cfg.calibration_length}: length - 1 must be <= 512 "
                     "or a multiple of 512")

  mesh = launch.mesh(cfg.mesh)
  if jax.process_count() > 1:
    raise ValueError("prune.py runs as one process (it writes the pruned models); give its "
                     "devices with --config.mesh")
  verifier = launch.checkpoint(cfg.checkpoint)
  layout = units.Layout(verifier.config, cfg.channel_group)
  extra = {}  # the extra rows, loaded before any work so that a wrong one fails early
  for source in extra_sources:
    config, params = drafters.load(source, verifier.config, verifier.params)
    if config.feature_dim:
      raise ValueError(f"drafter {source!r} reads the verifier's hidden states (EAGLE); this "
                       "table measures drafters that run on tokens alone")
    kind, value = drafters.check(source)
    steps = drafters.read_metadata(os.path.join(value, "drafter"))["steps"] if kind == "trained" \
        else None
    extra[source if steps is None else f"{source} ({steps} steps)"] = (config, params)
  identity = {"name": verifier.name,
              "fingerprint": checkpoint_io.fingerprint(verifier.config, verifier.params)}
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  command = " ".join(["python experiments/prune.py"] +
                     [f"--config.{k}={v}" for k, v in overrides.items()])
  calibration = jnp.asarray(packing.dataset_sequences(
      cfg.dataset, cfg.data_dir, "train", verifier.tokenizer, cfg.calibration_length,
      cfg.calibration_sequences))

  where = lambda method, target: pruned_checkpoint.directory_for(cfg.workdir, method, target)

  def save(method: str, target: float, keep, seconds: float):
    directory = where(method, target)
    if os.path.exists(directory):
      return
    config, params = units.prune(layout, verifier.params, keep)
    pruned_checkpoint.save(directory, config, params, keep=keep, verifier=identity, method=method,
                           target=target, kept_fraction=layout.kept_fraction(keep),
                           channel_group=cfg.channel_group, seconds=seconds,
                           command=command)
    logging.info("saved %s (%.3f of the decoder parameters, %d layers)", directory,
                 layout.kept_fraction(keep), config.num_layers)

  if not all(os.path.exists(where("bonsai", t)) for t in cfg.targets):
    started = time.time()
    bonsai.bonsai(layout, verifier.params, calibration, bonsai_config,
                  on_target=lambda t, keep: save("bonsai", t, keep, time.time() - started))
  for target in cfg.targets:
    if not os.path.exists(where("magnitude", target)):
      started = time.time()
      keep = bonsai.magnitude_one_shot(layout, verifier.params, calibration, target)
      save("magnitude", target, keep, time.time() - started)
  pruning_peak_gb = timing.peak_memory_gb()

  models = {}
  for target in cfg.targets:
    percent = round(100 * target)
    for method in ("bonsai", "magnitude"):
      models[f"{method} {percent}%"] = drafters.load(f"pruned:{where(method, target)}",
                                                     verifier.config, verifier.params)
    cut = max(1, round(target * verifier.config.num_layers))
    models[f"layer cut {percent}% ({cut} layers)"] = drafters.load(
        f"layers:{cut}", verifier.config, verifier.params)
  models.update(extra)
  models = {name: parallel.place_drafter(mesh, model) for name, model in models.items()}
  prompts = {context: packing.dataset_sequences(
      cfg.dataset, cfg.data_dir, "validation", verifier.tokenizer,
      context - cfg.max_new_tokens - cfg.gamma, cfg.num_prompts) for context in cfg.contexts}
  held_out = packing.dataset_sequences(cfg.dataset, cfg.data_dir, "validation",
                                       verifier.tokenizer, cfg.held_out_length,
                                       cfg.held_out_sequences)
  rows = pruning_eval.pruning_table(
      parallel.place_checkpoint(mesh, verifier), models, prompts, held_out, list(cfg.budgets) + [None], sparsity, gamma=cfg.gamma,
      max_new_tokens=cfg.max_new_tokens, prefill_chunk=cfg.prefill_chunk,
      perplexity_chunk=min(cfg.held_out_length - 1, 512))

  path = results.output_path(_RESULTS_DIR.value, f"bonsai_{cfg.variant}", overrides)
  spent = {method: pruned_checkpoint.read_metadata(where(method, min(cfg.targets)))["seconds"]
           for method in ("bonsai", "magnitude")}
  notes = (
      f"Verifier {verifier.name}. Kept = share of the decoder-block parameters (the embedding and "
      f"head, {(verifier.params['embed']['embedding'].size) / 1e6:.1f} M, are shared and kept). "
      f"Bonsai: {dataclasses.asdict(bonsai_config)}, units = KV heads with their query group, "
      f"{cfg.channel_group}-channel MLP groups and whole layers; calibration "
      f"{cfg.calibration_sequences} x {cfg.calibration_length} train tokens. Pruning took "
      f"{spent['bonsai']:.0f} s (Bonsai, all sizes; as saved) and {spent['magnitude']:.0f} s "
      f"(magnitude, smallest size); peak resident memory of this process after pruning "
      f"{pruning_peak_gb:.2f} GB (the verifier alone in float32 is "
      f"{sum(x.size for x in jax.tree.leaves(verifier.params)) * 4 / 2**30:.2f} GB). "
      f"Perplexity: {cfg.held_out_sequences} held-out {cfg.dataset}/validation sequences of "
      f"{cfg.held_out_length} tokens. Tokens/call and sum min(p,q) (expected acceptance at T=1): "
      f"{cfg.num_prompts} prompt(s) at context {max(cfg.contexts)}, {cfg.max_new_tokens} greedy "
      f"tokens, gamma {cfg.gamma}, full cache or {sparsity.policy} budget(s) {tuple(cfg.budgets)}"
      f", replayed from one teacher-forced pass along the verifier's greedy path. Step ms: one "
      f"decode step, logits included, over the drafter's {sparsity.policy}-{cfg.budgets[0]} "
      "cache (the verifier: over its full cache), in a compiled loop that writes the cache in "
      "place as decoding does; median of 7 runs of 16 steps.")
  print(results.write(path, "Bonsai-pruned drafters against a one-shot baseline and layer cuts",
                      rows, notes))


if __name__ == "__main__":
  app.run(main)
