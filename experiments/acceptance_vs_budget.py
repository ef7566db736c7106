"""Acceptance and block efficiency vs the drafter's KV budget, for several drafters side by side.

  python experiments/acceptance_vs_budget.py --config=configs/acceptance_vs_budget.py:smollm2

For held-out prompts at each context length the verifier's greedy continuation is generated once;
every (drafter, budget) is then measured teacher-forced along it (`budgetdraft.acceptance`, which
replays the greedy engine exactly): greedy acceptance rate and tokens per verifier call, and the
token-wise acceptance at temperature 1, sum_v min(p, q), on the same positions.
Writes results/acceptance_vs_budget.{md,json,png}.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from budgetdraft import acceptance, drafters, tables
from budgetdraft import tokenizer as tokenizer_lib
from budgetdraft.data import packing, readers
from budgetdraft.decoding import autoregressive
from budgetdraft.models import checkpoint_io
from budgetdraft.sparsity.selection import SparsityConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/acceptance_vs_budget.py:smollm2")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results", "Where the table and the plot go.")


def _plot(rows, contexts, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
  for ax, context in zip(axes[0], contexts):
    for label in dict.fromkeys(r["drafter"] for r in rows):
      points = [r for r in rows if r["context"] == context and r["drafter"] == label]
      x = np.arange(len(points))
      ax.plot(x, [r["tokens/call"] for r in points], marker="o", label=label)
      ax.set_xticks(x, [str(r["budget"]) for r in points])
    ax.set_title(f"{context // 1024}K context")
    ax.set_xlabel("drafter KV budget (kept prompt keys per layer and head)")
    ax.set_ylabel("tokens per verifier call (greedy)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  cfg = _CONFIG.value
  path = cfg.checkpoint or checkpoint_io.default_verifier_path()
  verifier_config, verifier_params = checkpoint_io.load_checkpoint(path)
  tokenizer = tokenizer_lib.load_tokenizer(path)
  drafter_models = {label: drafters.from_spec(spec, verifier_config, verifier_params)
                    for label, spec in cfg.drafters}
  budgets = list(cfg.budgets) + [None]
  rows = []
  for context in cfg.contexts:
    prompt_len = context - cfg.new_tokens - cfg.gamma  # the greedy path runs gamma past new_tokens
    windows = packing.first_windows(readers.documents(cfg.dataset, cfg.data_dir, cfg.split),
                                    tokenizer, prompt_len, cfg.num_prompts)
    totals = {}
    for prompt_index, window in enumerate(windows):
      started = time.time()
      prompt = jnp.asarray(window[None])
      greedy = np.array(autoregressive.generate(
          verifier_params, [window.tolist()], jax.random.key(0), config=verifier_config,
          max_new_tokens=cfg.new_tokens + cfg.gamma, chunk_size=cfg.prefill_chunk)[0])
      fed = jnp.asarray(greedy[None, :-1])
      capacity = prompt_len + fed.shape[1] + 8  # + headroom for the lookahead policy's tokens

      def logits(config, params, sparsity):
        cache = acceptance.prefill_prompt(params, prompt, config=config, capacity=capacity,
                                          chunk_size=cfg.prefill_chunk)
        return [acceptance.continuation_logits(
            params, cache, prompt, fed, jax.random.key(0), config=config, sparsity=s,
            gamma=cfg.gamma)[0] for s in sparsity]

      verifier_logits, = logits(verifier_config, verifier_params, [None])
      sparsities = [None if b is None else SparsityConfig(
          policy=cfg.policy, budget=b, sinks=cfg.sinks, window=cfg.window, recent=cfg.recent)
          for b in budgets]
      for label, (config, params) in drafter_models.items():
        for budget, drafter_logits in zip(budgets, logits(config, params, sparsities)):
          stats = acceptance.path_statistics(verifier_logits, drafter_logits, greedy, cfg.gamma,
                                             cfg.new_tokens)
          total = totals.setdefault((label, budget), {"overlap": 0.0, "rounds": 0, "accepted": 0})
          for key in total:
            total[key] += stats[key]
      logging.info("context %d prompt %d/%d measured in %.0f s", context, prompt_index + 1,
                   len(windows), time.time() - started)
    for (label, budget), total in totals.items():
      rows.append({
          "context": context, "drafter": label, "budget": budget or "full",
          "greedy acceptance": total["accepted"] / (total["rounds"] * cfg.gamma),
          "tokens/call": (total["accepted"] + total["rounds"]) / total["rounds"],
          "sum min(p,q) T=1": total["overlap"] / len(windows)})
  table = tables.markdown_table(rows)
  print(table)
  output = os.path.join(_OUTPUT_DIR.value, "acceptance_vs_budget")
  labels = ", ".join(f"{label} = `{spec}`" for label, spec in cfg.drafters)
  notes = (f"Verifier {os.path.basename(path)}; drafters: {labels}. {cfg.num_prompts} held-out "
           f"{cfg.dataset}/{cfg.split} prompt(s) per context, {cfg.new_tokens} greedy tokens, "
           f"gamma={cfg.gamma}, policy {cfg.policy} (sinks {cfg.sinks}, window {cfg.window}); "
           "budget = kept prompt keys per layer and KV head. Greedy acceptance and tokens/call "
           "replay the greedy engine exactly from one teacher-forced pass along the verifier's "
           "greedy path; sum min(p,q) is the expected token-wise acceptance at temperature 1 on "
           "the same positions.")
  tables.write_results(output, "Acceptance vs KV budget", table, rows, notes)
  _plot(rows, list(cfg.contexts), output + ".png")


if __name__ == "__main__":
  app.run(main)
