"""Which positions a sparse KV cache loses: a drafter's greedy matches, token by token.

  python experiments/lost_positions.py --config=configs/acceptance_vs_budget.py:copy

On a `long_retrieval` task config, for every context and policy at budget = context / --divisor
(and the full cache): each prompt's verifier greedy path is fed teacher-forced to the drafter
(--drafter, default the verifier itself: issue 15's family (a), which matches every token over its
full cache), and each position records whether a greedy draft there is accepted
(`evaluation.lost_positions`). The rows split the answer's tokens, which only the inserted text
holds, from the rest of the path, and give the share of the inserted text's keys the sparse cache
kept. Writes results/lost_positions_<task>.{md,json}, with one prompt's path marked token by token.
"""

from absl import app, flags
from ml_collections import config_flags

from budgetdraft import drafters, launch
from budgetdraft.data import retrieval
from budgetdraft.evaluation import lost_positions, results
from budgetdraft.sparsity.selection import SparsityConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/acceptance_vs_budget.py:copy")
_DRAFTER = flags.DEFINE_string("drafter", "self", "The drafter (`drafters.load` source), measured "
                               "teacher-forced: not an EAGLE drafter.")
_DIVISOR = flags.DEFINE_integer("divisor", 16, "Budget = context / divisor kept prompt keys.")
_EXAMPLE = flags.DEFINE_integer("example", -1, "The prompt whose path is marked token by token; "
                                "-1: the first whose verifier output holds the answer.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table goes.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  if not cfg.task:
    raise app.UsageError("lost_positions needs a long_retrieval task config, e.g. "
                         "configs/acceptance_vs_budget.py:copy")
  if not -1 <= _EXAMPLE.value < cfg.num_prompts:
    raise app.UsageError(f"--example={_EXAMPLE.value}: give -1 or a prompt below "
                         f"num_prompts={cfg.num_prompts}")
  # Every policy at budget = context / divisor, then the full cache; bad sizes fail here.
  sparsities = {context: [SparsityConfig(policy=policy, budget=context // _DIVISOR.value,
                                         **cfg.sparsity) for policy in cfg.policies] + [None]
                for context in cfg.contexts}
  drafters.check(_DRAFTER.value)
  launch.mesh(cfg.mesh)
  verifier = launch.checkpoint(cfg.checkpoint, cfg.contexts)
  config, params = drafters.load(_DRAFTER.value, verifier.config, verifier.params)
  if config.feature_dim:
    raise app.UsageError(f"--drafter={_DRAFTER.value} feeds its own hidden states within a "
                         "round: one teacher-forced pass does not give its positions")
  path_length = cfg.max_new_tokens + cfg.gamma
  prompts = {context: retrieval.task_prompts(cfg.data_dir, cfg.task, verifier.tokenizer,
                                             context - path_length, cfg.num_prompts)
             for context in cfg.contexts}
  rows, per_prompt, examples = lost_positions.lost_positions(
      verifier, config, params, prompts, sparsities, gamma=cfg.gamma,
      max_new_tokens=cfg.max_new_tokens, prefill_chunk=cfg.prefill_chunk,
      example=_EXAMPLE.value)

  # The flags that change what is measured name the run too, so that no run overwrites another.
  measured = {holder.name: holder.value for holder in (_DRAFTER, _DIVISOR, _EXAMPLE)
              if holder.present}
  path = results.output_path(_RESULTS_DIR.value, f"lost_positions_{cfg.task}",
                             {**config_flags.get_override_values(flags.FLAGS["config"]),
                              **measured})
  notes = (f"Verifier {verifier.name}; drafter `{_DRAFTER.value}`, teacher-forced along the "
           f"verifier's greedy path. {cfg.num_prompts} long_retrieval {cfg.task} prompts per "
           f"context (depths 0.1-0.9), {cfg.max_new_tokens} greedy tokens, gamma={cfg.gamma}, "
           f"budget = context/{_DIVISOR.value} kept prompt keys per layer and KV head (sinks "
           f"{cfg.sparsity.sinks}, window {cfg.sparsity.window}). A position matches when the "
           "drafter's argmax after the verifier's token i is its token i + 1 (a greedy draft "
           "there is accepted). Answer: the answer's drafted tokens (its first token is the "
           "verifier's own), which only the inserted text holds; rest: the path after it. "
           "Inserted text kept: the share of the inserted text's prompt positions the sparse "
           "cache keeps, mean over layers and KV heads (fewest-most: its least and most kept "
           "layer); s.e. over prompts.\n\n## Per prompt\n\n"
           + results.markdown_table(per_prompt)
           + "\n\n## One path, lost tokens as [verifier -> drafter]\n\n" + "\n\n".join(examples))
  print(results.write(path, f"Lost positions: {cfg.task}", rows, notes,
                      details={"per prompt": per_prompt}))


if __name__ == "__main__":
  app.run(main)
