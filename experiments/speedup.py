"""Speculative decoding vs autoregressive, measured side by side on long-context prompts.

  python experiments/speedup.py --config=configs/speedup.py:default

Writes results/speedup_<variant>.{md,csv,json,png} (a run with overrides: speedup_<variant>-<hash>;
see `evaluation.results.output_path`). The measurement is `budgetdraft.evaluation.speedup`. With
several devices both models run on `--config.mesh` (default: every device on `data`), e.g.
`--config.mesh=data=1,model=2` for tensor parallelism at batch 1.
"""

from absl import app, flags
from ml_collections import config_flags

from budgetdraft import drafters, launch, parallel
from budgetdraft.data import packing
from budgetdraft.evaluation import results, speedup

_CONFIG = config_flags.DEFINE_config_file("config", "configs/speedup.py:default")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the tables and the plot go.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  variants = speedup.variants(cfg)
  for variant in variants:
    drafters.check(variant.drafter)
  prompt_lengths = {context: speedup.prompt_length(context, variants) for context in cfg.contexts}
  mesh = launch.mesh(cfg.mesh)
  verifier = launch.checkpoint(cfg.checkpoint, cfg.contexts)
  prompts = {context: packing.dataset_sequences(cfg.dataset, cfg.data_dir, cfg.split,
                                                verifier.tokenizer, length, cfg.num_prompts)
             for context, length in prompt_lengths.items()}
  rows = speedup.speedup(verifier, prompts, variants, mesh)
  if not parallel.is_writer():
    return

  path = results.output_path(_RESULTS_DIR.value, f"speedup_{cfg.variant}",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  notes = (f"Verifier {verifier.name}, batch 1, {cfg.max_new_tokens} new tokens, gamma "
           f"{cfg.gamma} unless a row says, {cfg.num_prompts} prompt(s) per context "
           f"from {cfg.dataset}/{cfg.split}. Speedups are AR time / speculative time measured in "
           "this run (AR at the row's temperature); `= AR`: the greedy speculative tokens equal "
           "AR's, token for token. e2e "
           "includes both prefills (and KV selection). ms/round is the measured "
           "decode loop time per verifier call; draft and verify ms/round are the draft phase "
           "(gamma draft steps) and the verify phase, each timed on its own in a compiled loop "
           "from the post-prefill state (the rest of a round is the rule and the commit). Cost "
           "decomposition: T_D/T_T = draft phase / gamma and T_V/T_T = verify phase, over the AR "
           "loop's time per step; predicted speedup = tokens/call / (gamma T_D/T_T + T_V/T_T) (MagicDec). s.e.: "
           "standard error over prompts. Repetition of the generated text: distinct-2/3 = "
           "distinct n-grams / n-grams; copy share = the share of new tokens completing a "
           "4-gram seen earlier in the prompt or the output.")
  print(results.write(path, f"Speculative decoding speedup ({cfg.variant})", rows, notes,
                      with_csv=True))
  if best := speedup.best_over_gamma(rows):
    print(results.write(path + "_best_gamma", f"Best over the gamma grid ({cfg.variant}; "
                        "secondary view)", best, "Per setting, the gamma of the best decode "
                        f"speedup among those measured in {path}.md. The maximum of noisy "
                        "measurements is optimistic: the fixed-gamma rows are the primary table."))
  speedup.plot(rows, path + ".png")
  if mismatched := speedup.greedy_mismatches(rows):
    raise RuntimeError(f"greedy speculative tokens differ from AR's in {mismatched}: a "
                       f"losslessness bug; the table is in {path}.md")


if __name__ == "__main__":
  app.run(main)
