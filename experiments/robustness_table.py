"""Issue 15's answer, one command over committed result files (no model work):

  python experiments/robustness_table.py --config=configs/robustness_table.py:default

For each pair (BudgetDraft, naive) on one context and task: BudgetDraft's share of its own
full-cache tokens per call at budget = context / 16 and its paired gap to naive at every budget
(`budgetdraft.evaluation.robustness`). Writes results/robustness_table.{md,json,png}.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from budgetdraft.evaluation import results, robustness

_CONFIG = config_flags.DEFINE_config_file("config", "configs/robustness_table.py:default")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the tables and figure go.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  missing = [path for _, _, path, _, _ in cfg.runs if not os.path.exists(path)]
  if missing:
    raise FileNotFoundError(f"no result json {missing}: run the command at the top of its .md")
  runs = [(label, task, robustness.load_gaps(path, drafter, baseline))
          for label, task, path, drafter, baseline in cfg.runs]
  summary = [row for label, task, gaps in runs for row in robustness.summary_rows(
      label, task, gaps, divisor=cfg.divisor, target=cfg.target)]
  budgets = [row for label, task, gaps in runs
             for row in robustness.budget_rows(label, task, gaps)]

  path = results.output_path(_RESULTS_DIR.value, "robustness_table",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  sources = "; ".join(f"{label} {task}: `{p}`" for label, task, p, _, _ in cfg.runs)
  notes = ("BudgetDraft against naive training of the same drafter (same steps, teacher and "
           "data), paired by prompt (value ± standard error over prompts; each source's table "
           f"gives its prompts). share: BudgetDraft's tokens per call at budget = context / "
           f"{cfg.divisor} over its own full cache's, per policy; >= {100 * cfg.target:.0f}%: "
           "the policies whose share reaches the issue's bar. Gaps: BudgetDraft's tokens per "
           "call minus naive's (T=1: sum min(p,q) at temperature 1; n/a for EAGLE, whose rows "
           "the greedy engine gives, and for tables older than the paired T=1 gap); counts: "
           "above zero / beyond +2 s.e. / below -2 s.e. of the sparse cells; bold: beyond two "
           "s.e. Sources: " + sources + ".\n\n"
           "Tokens per call gap to naive at each budget (kept prompt keys per layer and KV "
           "head):\n\n" + results.markdown_table(budgets))
  title = f"BudgetDraft vs naive: share at context / {cfg.divisor} and gap per budget"
  print(results.write(path, title, summary, notes, details={"budgets": budgets}))
  robustness.plot(runs, path + ".png", target=cfg.target)


if __name__ == "__main__":
  app.run(main)
