"""Entry points refuse bad settings before any model work, in the terms the user set."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _run(script: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join("experiments", script), *flags],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, flags, message", [
    ("speedup.py", ["--config.gamma=0"], "gamma=0 must be >= 1"),
    ("speedup.py", ["--config.contexts=(64,)"], "context 64 leaves no prompt"),
    ("speedup.py", ["--config.sparsity.window=600"], "below sinks \\+ window"),
    ("speedup.py", ["--config.max_new_tokens=0"], "max_new_tokens=0 must be >= 1"),
    ("speedup.py", ["--config.mesh=data=3"], "needs 3 devices"),
    ("bench_batch.py", ["--config.mesh=model=2"], "needs 2 devices"),
    ("acceptance_vs_budget.py", ["--config=configs/acceptance_vs_budget.py:passkey",
                                 "--distributed=127.0.0.1:1234"], "give host:port, >= 2 processes"),
    ("specprefill.py", ["--distributed=h:1", "--num_processes=2", "--process_id=2"],
     "an id in \\[0, processes\\)"),
    ("rule_efficiency.py", ["--config.rules=(('block', 2),)"], "verifies one path"),
    ("acceptance_vs_budget.py", ["--config.budgets=(16,)"], "below sinks \\+ window"),
    ("acceptance_vs_budget.py", ["--config=configs/acceptance_vs_budget.py:self",
                                 "--config.compare=(('self', 'nobody'),)"],
     "must name two of the drafters"),
    ("speedup.py", ["--config=configs/speedup.py:trained"], "holds no trained drafter"),
    ("rule_efficiency.py", ["--config.drafter=layer:8"], "expected 'self', 'layers:<k>'"),
    ("specprefill.py", ["--config.keep_rates=(0.0, 0.5)"], r"keep_rate=0.0 must be in \(0, 1\]"),
    ("specprefill.py", ["--config.keep_rates=(1.5,)"], r"keep_rate=1.5 must be in \(0, 1\]"),
    ("specprefill.py", ["--config.scorers=('layer:4',)"], "expected 'self', 'layers:<k>'"),
    ("specprefill.py", ["--config.continuation=100"], "must fit in max_new_tokens"),
    ("specprefill.py", ["--config.contexts=(128,)"], "context 128 leaves too short a prompt"),
    ("specprefill.py", ["--config.drafter_budget=16"], "below sinks \\+ window"),
    ("prune.py", ["--config.targets=(0.3, 0.5)"], "decreasing"),
    ("prune.py", ["--config.budgets=(16,)"], "below sinks \\+ window"),
    ("prune.py", ["--config.calibration_length=700"], "calibration_length=700"),
    ("bench_decode.py", ["--config.layouts=('stacked',)"], "expected a non-empty tuple of"),
    ("lost_positions.py", ["--config=configs/acceptance_vs_budget.py:self"],
     "needs a long_retrieval task config"),
    ("lost_positions.py", ["--example=8"], "below num_prompts=8"),
    ("lost_positions.py", ["--divisor=64"], "below sinks \\+ window"),
    ("lost_positions.py", ["--drafter=layer:8"], "expected 'self', 'layers:<k>'"),
])
def test_bad_settings_fail_before_the_checkpoint_is_opened(script, flags, message):
  """The checkpoint does not exist: a check that ran after loading would report that instead."""
  result = _run(script, *flags, "--config.checkpoint=/nonexistent/model.gguf",
                "--results_dir=/dev/null")
  assert result.returncode != 0
  assert "nonexistent" not in result.stderr.splitlines()[-1], result.stderr[-2000:]
  assert re.search(message, result.stderr), result.stderr[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--config.gamma=0"], "gamma=0"), (["--config.num_paths=(0,)"], "num_paths=\\[0\\]")])
def test_verification_table_rejects_empty_problems(flags, message):
  result = _run("verification_table.py", "--results_dir=/dev/null", *flags)
  assert result.returncode != 0 and re.search(message, result.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("script, flag", [
    ("speedup.py", "--config=configs/speedup.py:long16k"),
    ("acceptance_vs_budget.py", "--config=configs/acceptance_vs_budget.py:self")])
def test_a_16k_context_on_smollm2_is_refused_naming_the_fix(script, flag):
  result = _run(script, flag, "--config.contexts=(4096,16384)", "--results_dir=/dev/null")
  assert result.returncode != 0
  assert re.search("context 16384 exceeds the verifier's context of 8192 positions.*"
                   "--config.checkpoint", result.stderr), result.stderr[-2000:]
