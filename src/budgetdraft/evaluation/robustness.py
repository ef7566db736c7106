"""Is one BudgetDraft drafter robust to every budget? Read off paired acceptance tables.

Issue 15 asks two things of each pair (BudgetDraft, naive) on one context and task: does
BudgetDraft keep `target` of its own full cache's tokens per call at budget = context / divisor,
and how far above naive is it at each budget. Both are in the `paired` gaps that
`acceptance.paired_gaps` writes to a result's json; this module gathers them over many runs, so
the answer is one command over committed files, not a reading of twenty tables.
"""

import json

import numpy as np

from budgetdraft.evaluation import acceptance, results


def load_gaps(path: str, drafter: str, baseline: str) -> list[dict]:
  """The paired gaps of `drafter` against `baseline` in a result json, every context."""
  with open(path) as f:
    paired = json.load(f).get("paired", [])
  gaps = [g for g in paired if g["drafter"] == drafter and g["baseline"] == baseline]
  if not gaps:
    found = sorted({(g["drafter"], g["baseline"]) for g in paired})
    raise ValueError(f"{path} has no pair ({drafter!r}, {baseline!r}); it has {found}")
  return gaps


def _sparse(gaps: list[dict]) -> list[dict]:
  return [g for g in gaps if g["budget"] != acceptance.FULL_BUDGET]


def _beyond(value: float, error: float) -> int:
  """+1 / -1 when a gap is above / below zero by more than two standard errors, else 0."""
  if not np.isfinite(error) or abs(value) <= 2 * error:
    return 0
  return 1 if value > 0 else -1


def _cell(value: float, error: float, percent: bool = False) -> str:
  """`+0.130 ± 0.040`, bold when beyond two standard errors (`73 ± 5%` for a share)."""
  if not np.isfinite(value):
    return "n/a"
  if percent:
    return f"{100 * value:.0f} ± {100 * error:.0f}%"
  text = f"{value:+.3f} ± {error:.3f}"
  return f"**{text}**" if _beyond(value, error) else text


def _counts(values, errors) -> str:
  """`above zero / beyond +2 s.e. / below -2 s.e. of n` over the cells with a value."""
  finite = [(v, e) for v, e in zip(values, errors) if np.isfinite(v)]
  if not finite:
    return "n/a"
  signs = [_beyond(v, e) for v, e in finite]
  return (f"{sum(v > 0 for v, _ in finite)} / {signs.count(1)} / {signs.count(-1)} "
          f"of {len(finite)}")


def summary_rows(label: str, task: str, gaps: list[dict], *, divisor: int,
                 target: float) -> list[dict]:
  """One row per context: the shares at budget = context / divisor (per policy), whether each
  reaches `target`, the full-cache gap and the sparse gaps' tally against the baseline."""
  rows = []
  for context in sorted({g["context"] for g in gaps}):
    mine = [g for g in gaps if g["context"] == context]
    sparse = _sparse(mine)
    full = [g for g in mine if g["budget"] == acceptance.FULL_BUDGET]
    budget = context // divisor
    at_budget = {g["policy"]: g for g in sparse if g["budget"] == budget}
    if not at_budget:
      raise ValueError(f"{label} {task} at {context}: no budget {budget} = context / {divisor}")
    row = {"drafters": label, "task": task, "context": context, "budget": budget}
    for policy, g in at_budget.items():
      row[f"share {policy}"] = _cell(g["share of own full"], g["share s.e."], percent=True)
    reached = [p for p, g in at_budget.items() if g["share of own full"] >= target]
    row[f">= {100 * target:.0f}%"] = ", ".join(reached) or "none"
    row["full-cache gap"] = _cell(full[0]["gap"], full[0]["gap s.e."]) if full else "n/a"
    row["mean sparse gap"] = f"{np.mean([g['gap'] for g in sparse]):+.3f}"
    for key in ("gap", "T=1 gap"):  # T=1: absent from tables older than it, nan for EAGLE
      row[f"{key} > 0 / > +2 s.e. / < -2 s.e."] = _counts(
          [g.get(key, np.nan) for g in sparse], [g.get(f"{key} s.e.", np.nan) for g in sparse])
    rows.append(row)
  return rows


def budget_rows(label: str, task: str, gaps: list[dict]) -> list[dict]:
  """One row per context and policy: the tokens/call gap to the baseline at each budget."""
  rows = {}
  for g in _sparse(gaps):
    key = (g["context"], g["policy"])
    row = rows.setdefault(key, {"drafters": label, "task": task, "context": g["context"],
                                "policy": g["policy"]})
    row[str(g["budget"])] = _cell(g["gap"], g["gap s.e."])
  return sorted(rows.values(), key=lambda row: row["context"])  # stable: policies keep order


def plot(runs: list[tuple[str, str, list[dict]]], path: str, *, target: float) -> None:
  """Share of own full cache vs budget, one panel per task: colour = policy, marker = pair,
  line style = context; a dotted line marks the issue's `target`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  tasks = list(dict.fromkeys(task for _, task, _ in runs))
  labels = list(dict.fromkeys(label for label, _, _ in runs))
  budgets = sorted({g["budget"] for _, _, gaps in runs for g in _sparse(gaps)})
  policies = list(dict.fromkeys(g["policy"] for _, _, gaps in runs for g in _sparse(gaps)))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for label, run_task, gaps in runs:
      if run_task != task:
        continue
      lines = {}
      for g in _sparse(gaps):
        lines.setdefault((g["context"], g["policy"]), []).append(
            (budgets.index(g["budget"]), g["share of own full"]))
      for (context, policy), points in lines.items():
        points = sorted(points)
        ax.plot([x for x, _ in points], [y for _, y in points],
                color=f"C{policies.index(policy)}", marker="os^D"[labels.index(label) % 4],
                linestyle="-" if context <= 4096 else "--",
                label=f"{label}, {context // 1024}K, {policy}")
    ax.axhline(target, color="black", linestyle=":", label=f"{100 * target:.0f}%")
    ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
    ax.set_title(task)
    ax.set_xlabel("drafter KV budget (kept prompt keys per layer and head)")
    ax.set_ylabel("share of own full cache's tokens per call")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
