"""Issue 15's answer table, from committed paired acceptance tables (no model work, seconds):
`--config=configs/robustness_table.py:<variant>`.

Variants:
  default  BudgetDraft against naive training with the same steps and teacher, per context and
           task: family (a) (the verifier drafting for itself, forward KL at learning rate 3e-6,
           100 steps each) and family (b) (EAGLE, 500 steps each), 4K and 8K, books and the
           long_retrieval tasks. Each run is (pair label, task, result json, drafter, baseline);
           a json comes from the acceptance_vs_budget command at the top of its .md.
Writes results/robustness_table.{md,json,png}.
"""

import ml_collections

_A = ("(a) self KL lr 3e-6", "self BudgetDraft KL lr 3e-6", "self naive KL lr 3e-6")
_B = ("(b) EAGLE 500 steps", "EAGLE BudgetDraft 500", "EAGLE naive 500")
_RESULTS = "results/acceptance_vs_budget_"


def _run(family, task, name):
  label, drafter, baseline = family
  return (label, task, f"{_RESULTS}{name}.json", drafter, baseline)


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  if variant != "default":
    raise ValueError(f"unknown variant {variant!r}; valid: default")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.runs = (
      _run(_A, "books", "self_trained-af127b9f"),   # 4K
      _run(_A, "books", "self_trained-1c3bf1cf"),   # 8K
      _run(_A, "copy", "self_trained-b14a949d"),
      _run(_A, "copy", "self_trained-9c02de02"),
      _run(_A, "passkey", "self_trained-829b09b8"),
      _run(_A, "passkey", "self_trained-015af200"),
      _run(_A, "kv_retrieval", "self_trained-a007ec83"),
      _run(_A, "kv_retrieval", "self_trained-cc2b92fc"),
      _run(_B, "books", "eagle-79847736"),
      _run(_B, "books", "eagle-9b301aa2"),
      _run(_B, "copy", "eagle-f86c5f9f"),
      _run(_B, "copy", "eagle-6546f3b9"),
  )
  config.divisor = 16    # the budget: context / 16 kept prompt keys
  config.target = 0.95   # the bar: share of the drafter's own full-cache tokens per call
  return config
