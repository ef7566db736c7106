"""Issue 15's answer table: shares at context / divisor, gap tallies and bold cells come from the
paired gaps as written, and the shipped config reads pairs the committed result files hold."""

import json
import os
import subprocess
import sys

import pytest

from budgetdraft.evaluation import robustness
from configs import robustness_table
from tests.conftest import REPO_ROOT


def _gap(budget, policy="snapkv", gap=0.0, error=0.01, share=0.9, t1=0.0, context=4096):
  return {"context": context, "policy": "full KV" if budget == "full" else policy,
          "budget": budget, "drafter": "bd", "baseline": "naive", "gap": gap, "gap s.e.": error,
          "share of own full": share, "share s.e.": 0.02, "T=1 gap": t1, "T=1 gap s.e.": 0.001}


def _gaps():
  return [_gap(128, gap=0.05, share=0.7, t1=0.003), _gap(256, gap=-0.05, share=0.96, t1=-0.01),
          _gap(256, "h2o", gap=0.01, share=0.8), _gap(512, gap=0.015, share=0.99),
          _gap("full", gap=-0.1, error=0.04, share=1.0)]


def test_the_summary_reads_the_share_at_context_over_divisor_and_tallies_the_sparse_gaps():
  [row] = robustness.summary_rows("pair", "books", _gaps(), divisor=16, target=0.95)
  assert row["budget"] == 256
  assert row["share snapkv"] == "96 ± 2%" and row["share h2o"] == "80 ± 2%"
  assert row[">= 95%"] == "snapkv"  # h2o's 80% misses the bar
  assert row["full-cache gap"] == "**-0.100 ± 0.040**"  # 2.5 s.e. below
  assert row["mean sparse gap"] == "+0.006"  # (0.05 - 0.05 + 0.01 + 0.015) / 4
  # above zero: 0.05, 0.01, 0.015; beyond +2 s.e.: 0.05; below -2 s.e.: -0.05
  assert row["gap > 0 / > +2 s.e. / < -2 s.e."] == "3 / 1 / 1 of 4"
  assert row["T=1 gap > 0 / > +2 s.e. / < -2 s.e."] == "1 / 1 / 1 of 4"


def test_a_missing_t1_gap_reads_not_available_and_a_missing_budget_is_refused():
  old = [{k: v for k, v in g.items() if not k.startswith("T=1")} for g in _gaps()]
  [row] = robustness.summary_rows("pair", "books", old, divisor=16, target=0.95)
  assert row["T=1 gap > 0 / > +2 s.e. / < -2 s.e."] == "n/a"
  with pytest.raises(ValueError, match="no budget 64 = context / 64"):
    robustness.summary_rows("pair", "books", _gaps(), divisor=64, target=0.95)


def test_budget_rows_put_each_budget_in_its_column_and_bold_only_beyond_two_errors():
  rows = robustness.budget_rows("pair", "books", _gaps() + [_gap(128, context=8192, gap=0.5)])
  assert [(r["context"], r["policy"]) for r in rows] == [
      (4096, "snapkv"), (4096, "h2o"), (8192, "snapkv")]
  assert rows[0]["128"] == "**+0.050 ± 0.010**" and rows[0]["512"] == "+0.015 ± 0.010"
  assert rows[0]["256"] == "**-0.050 ± 0.010**" and rows[1] == {
      "drafters": "pair", "task": "books", "context": 4096, "policy": "h2o",
      "256": "+0.010 ± 0.010"}


def test_load_gaps_names_the_pairs_a_file_holds(tmp_path):
  path = tmp_path / "run.json"
  path.write_text(json.dumps({"rows": [], "paired": _gaps()}))
  assert robustness.load_gaps(str(path), "bd", "naive") == _gaps()
  with pytest.raises(ValueError, match=r"no pair \('bd', 'self'\); it has \[\('bd', 'naive'\)\]"):
    robustness.load_gaps(str(path), "bd", "self")


def test_the_shipped_runs_are_committed_pairs_with_the_issue_budget(tmp_path):
  cfg = robustness_table.get_config()
  assert len({path for _, _, path, _, _ in cfg.runs}) == len(cfg.runs)
  runs = []
  for label, task, path, drafter, baseline in cfg.runs:
    gaps = robustness.load_gaps(os.path.join(REPO_ROOT, path), drafter, baseline)
    with open(os.path.join(REPO_ROOT, path.replace(".json", ".md"))) as f:
      command = f.read()
    assert (f"--config.task={task}" in command) == (task != "books"), path
    rows = robustness.summary_rows(label, task, gaps, divisor=cfg.divisor, target=cfg.target)
    assert [row["budget"] for row in rows] == [row["context"] // 16 for row in rows]
    runs.append((label, task, gaps))
  robustness.plot(runs, str(tmp_path / "f.png"), target=cfg.target)
  assert (tmp_path / "f.png").stat().st_size > 0


def test_the_entry_point_writes_the_table_and_refuses_missing_results_before_reading(tmp_path):
  script = os.path.join(REPO_ROOT, "experiments", "robustness_table.py")
  config = "--config=" + os.path.join(REPO_ROOT, "configs", "robustness_table.py")
  run = lambda cwd: subprocess.run([sys.executable, script, config, f"--results_dir={tmp_path}"],
                                   cwd=cwd, capture_output=True, text=True, timeout=300)
  assert run(REPO_ROOT).returncode == 0
  table = (tmp_path / "robustness_table.md").read_text()
  runs = robustness_table.get_config().runs  # one context each: a summary row, 3 policy rows
  pairs = {run[:2] for run in runs}  # (label, task)
  assert sum(table.count(f"| {label} | {task} |") for label, task in pairs) == 4 * len(runs)
  assert (tmp_path / "robustness_table.png").exists()
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  result = run(elsewhere)  # the runs' relative paths then name nothing
  assert result.returncode != 0 and "run the command at the top of its .md" in result.stderr
