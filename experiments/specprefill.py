"""Speculative prefill vs full prefill: time to first token, quality, end to end, side by side.

  python experiments/specprefill.py --config=configs/specprefill.py:default

Writes results/specprefill_<variant>.{md,json,png} (a run with overrides:
specprefill_<variant>-<hash>). The measurement is `budgetdraft.evaluation.specprefill`; the method
is `budgetdraft.specprefill`.
"""

import dataclasses

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from budgetdraft import drafters, launch, parallel, specprefill
from budgetdraft.data import packing, retrieval
from budgetdraft.evaluation import results
from budgetdraft.evaluation import specprefill as evaluation

_CONFIG = config_flags.DEFINE_config_file("config", "configs/specprefill.py:default")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table and the plot go.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  selection = specprefill.SpecPrefillConfig(**cfg.selection)
  for rate in cfg.keep_rates:  # every row is valid before any model work
    dataclasses.replace(selection, keep_rate=rate)
  for source in cfg.scorers:
    drafters.check(source)
  settings = evaluation.Settings(
      greedy_tokens=cfg.greedy_tokens, max_new_tokens=cfg.max_new_tokens,
      prefill_chunk=cfg.prefill_chunk, gamma=cfg.gamma, drafter_budget=cfg.drafter_budget)
  if cfg.continuation > cfg.max_new_tokens or cfg.greedy_tokens > cfg.max_new_tokens:
    raise ValueError(f"continuation ({cfg.continuation}) and greedy_tokens ({cfg.greedy_tokens}) "
                     f"must fit in max_new_tokens ({cfg.max_new_tokens})")
  prompt_lengths = {context: context - settings.room(selection.lookahead)
                    for context in cfg.contexts}
  for context, length in prompt_lengths.items():
    if length < 4 * selection.chunk:
      raise ValueError(f"context {context} leaves too short a prompt after max_new_tokens="
                       f"{cfg.max_new_tokens} (at least 4 chunks of {selection.chunk} are needed)")
  mesh = launch.mesh(cfg.mesh)
  verifier = parallel.place_checkpoint(mesh, launch.checkpoint(cfg.checkpoint))
  prompts = {}
  for context, length in prompt_lengths.items():
    windows = packing.dataset_sequences(
        cfg.dataset, cfg.data_dir, cfg.split, verifier.tokenizer, length + cfg.continuation,
        max(cfg.book_prompts, cfg.passkey_prompts))
    items = [evaluation.Prompt("books", w[:length], w[length:])
             for w in windows[:cfg.book_prompts]]
    for passkey in retrieval.passkey_prompts(verifier.tokenizer, windows, length,
                                             cfg.passkey_prompts):
      answer = np.asarray(verifier.tokenizer.encode(f" {passkey.answer}."), np.int32)
      items.append(evaluation.Prompt("passkey", np.asarray(passkey.tokens, np.int32), answer,
                                     passkey))
    prompts[context] = items
  rows = evaluation.specprefill_table(verifier, prompts, list(cfg.scorers), list(cfg.keep_rates),
                                      settings, selection, mesh)
  if not parallel.is_writer():
    return

  path = results.output_path(_RESULTS_DIR.value, f"specprefill_{cfg.variant}",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  notes = (
      f"Verifier {verifier.name}, batch 1, greedy. Per context: {cfg.book_prompts} held-out "
      f"{cfg.dataset}/{cfg.split} windows (task books) and {cfg.passkey_prompts} pass-key prompts "
      "(a 5-digit key hidden at depths spread over 10-90% of book filler), prompts of context - "
      f"{settings.room(selection.lookahead)} tokens; rows are means over a task's prompts. "
      f"Selection: chunks of {selection.chunk}, last {selection.window} tokens always kept, "
      f"{selection.lookahead} look-ahead queries, pooling {selection.pool}. TTFT = scorer prefill "
      "+ scoring + the verifier's prefill of the kept tokens (`scorer s` is the first two), "
      "against the verifier's full prefill in the same run. NLL: mean over the true next "
      f"{cfg.continuation} tokens (books) or the key's tokens (pass key). greedy agree: fraction "
      f"of the first {cfg.greedy_tokens} greedy tokens equal to the full prefill's; same prefix: "
      "tokens until the first difference; retrieved: the key is in them. e2e speedups: (full "
      f"prefill + AR decode of {cfg.max_new_tokens} tokens) / (speculative prefill + decode from "
      "its cache), AR decode or speculative decode with the scorer as drafter over a lookahead "
      f"KV cache of {cfg.drafter_budget} keys (scores shared with the prefill pass; greedy "
      "speculative tokens equal greedy AR tokens from the same pruned cache, checked per prompt); "
      "tokens/call is that drafter's.")
  print(results.write(path, f"Speculative prefill ({cfg.variant})", rows, notes))
  evaluation.plot(rows, path + ".png")


if __name__ == "__main__":
  app.run(main)
