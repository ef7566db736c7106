"""Acceptance and tokens per verifier call vs the drafter's KV budget, several drafters side by side.

  python experiments/acceptance_vs_budget.py --config=configs/acceptance_vs_budget.py:smollm2

Measured teacher-forced along the verifier's greedy path (`budgetdraft.evaluation.acceptance`,
which replays the greedy engine exactly). Writes results/acceptance_vs_budget.{md,json,png}
(the `paper` variant: results/acceptance_vs_budget_paper.*).
"""

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from budgetdraft import drafters, launch, parallel
from budgetdraft.data import packing, retrieval
from budgetdraft.evaluation import acceptance, results
from budgetdraft.sparsity.selection import SparsityConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/acceptance_vs_budget.py:smollm2")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table and the plot go.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  # Every policy at every budget, then the full cache (None); bad sizes fail here, before loading.
  sparsities = [SparsityConfig(policy=policy, budget=budget, **cfg.sparsity)
                for policy in cfg.policies for budget in cfg.budgets] + [None]
  names = [label for label, _ in cfg.drafters]
  for pair in cfg.compare:
    if len(pair) != 2 or not set(pair) <= set(names):
      raise ValueError(f"--config.compare pair {pair} must name two of the drafters {names}")
  for _, source in cfg.drafters:
    drafters.check(source)
  mesh = launch.mesh(cfg.mesh)
  verifier = parallel.place_checkpoint(mesh, launch.checkpoint(cfg.checkpoint, cfg.contexts))
  # "self" is the verifier's own params object, so that it shares the verifier's prefill.
  drafter_models = {label: (verifier.config, verifier.params) if source == "self" else
                    parallel.place_drafter(mesh, drafters.load(source, verifier.config,
                                                               verifier.params))
                    for label, source in cfg.drafters}
  after = acceptance.positions_after_prompt(drafter_models, gamma=cfg.gamma,
                                           max_new_tokens=cfg.max_new_tokens)
  lengths = {context: context - after for context in cfg.contexts}
  answers = None
  if cfg.task:
    tasks = {context: retrieval.task_prompts(cfg.data_dir, cfg.task, verifier.tokenizer, length,
                                             cfg.num_prompts) for context, length in lengths.items()}
    prompts = {context: np.array([p.tokens for p in items]) for context, items in tasks.items()}
    answers = {context: [p.answer for p in items] for context, items in tasks.items()}
  else:
    prompts = {context: packing.dataset_sequences(cfg.dataset, cfg.data_dir, cfg.split,
                                                  verifier.tokenizer, length, cfg.num_prompts)
               for context, length in lengths.items()}
  rows = acceptance.acceptance_vs_budget(
      verifier, drafter_models, prompts, sparsities, gamma=cfg.gamma,
      max_new_tokens=cfg.max_new_tokens, prefill_chunk=cfg.prefill_chunk, answers=answers)
  if not parallel.is_writer():
    return

  name = "acceptance_vs_budget" + ("" if cfg.variant == "smollm2" else f"_{cfg.variant}")
  path = results.output_path(_RESULTS_DIR.value, name,
                             config_flags.get_override_values(flags.FLAGS["config"]))
  labels = ", ".join(f"{label} = `{source}`" for label, source in cfg.drafters)
  source = (f"long_retrieval {cfg.task} (depths 0.1-0.9)" if cfg.task else
            f"{cfg.dataset}/{cfg.split}")
  notes = (f"Verifier {verifier.name}; drafters: {labels}. {cfg.num_prompts} held-out "
           f"{source} prompt(s) per context, {cfg.max_new_tokens} greedy tokens, "
           f"gamma={cfg.gamma}, policies {', '.join(cfg.policies)} (sinks "
           f"{sparsities[0].sinks}, window {sparsities[0].window}); budget = kept prompt keys "
           "per layer and KV head. Greedy acceptance and tokens/call replay the greedy engine "
           "exactly from one teacher-forced pass along the verifier's greedy path (tokens/call "
           "pools the rounds of all prompts); sum min(p,q) is the expected token-wise acceptance "
           "at temperature 1 on the same positions; s.e.: standard error over prompts.")
  if any(config.feature_dim for config, _ in drafter_models.values()):
    notes += (" An EAGLE drafter feeds its own hidden states within a round, so its rows are the "
              "greedy engine's own rounds (one prefill, then decoding, per budget) and its sum "
              "min(p,q) and answer match are not given (nan).")
  gaps = [gap for drafter, baseline in cfg.compare
          for gap in acceptance.paired_gaps(rows, drafter, baseline)]
  if gaps:
    notes += ("\n\nPaired by prompt (gap: the drafter's tokens/call minus the baseline's on the "
              "same prompts; share: its tokens/call over its own full cache's; T=1 gap: its sum "
              "min(p,q) minus the baseline's; means of the per-prompt values, with standard "
              "errors over prompts):\n\n"
              + results.markdown_table(gaps))
  per_prompt = (acceptance.PER_PROMPT, acceptance.PER_PROMPT_OVERLAP)
  columns = [key for key in rows[0] if key not in per_prompt]  # the json keeps them
  print(results.write(path, "Acceptance vs KV budget", rows, notes, columns=columns,
                      details={"paired": gaps}))
  acceptance.plot(rows, path + ".png")


if __name__ == "__main__":
  app.run(main)
