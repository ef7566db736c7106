"""Every shipped experiment config builds and carries the fields its entry point reads."""

import pytest

from budgetdraft import drafters, verification
from budgetdraft.evaluation import speedup as speedup_lib
from budgetdraft.sparsity.selection import SparsityConfig
from budgetdraft import specprefill as specprefill_lib
from budgetdraft.pruning.bonsai import BonsaiConfig
from configs import (acceptance_vs_budget, bench_batch, bench_decode, bench_kernels,
                     budgetdraft_smollm2, generate, prune, rule_efficiency, specprefill, speedup,
                     verification_table)

SPEEDUP_FIELDS = {"contexts", "rows", "max_new_tokens", "gamma", "num_prompts", "prefill_chunk",
                  "sparsity"}


@pytest.mark.parametrize("variant", ["default", "full", "trained", "pruned", "paper", "paper_quick",
                                     "long16k"])
def test_speedup_variants(variant):
  cfg = speedup.get_config(variant)
  assert SPEEDUP_FIELDS <= set(cfg.keys())
  assert all(context > cfg.max_new_tokens for context in cfg.contexts) and cfg.rows
  assert len(speedup_lib.variants(cfg)) == len(cfg.rows)  # every row a valid configuration


@pytest.mark.parametrize("variant, prompts", [("paper", [3800, 7870]), ("paper_quick", [3800, 7930])])
def test_the_paper_protocol_builds_valid_rows_at_the_published_prompt_length(variant, prompts):
  cfg = speedup.get_config(variant)
  variants = speedup_lib.variants(cfg)  # builds every SparsityConfig: budgets are whole chunks
  assert [speedup_lib.prompt_length(c, variants) for c in cfg.contexts] == prompts
  assert {v.spec.gamma for v in variants} <= set(speedup.PAPER_GAMMAS)
  assert all(v.spec.sparsity.recent >= cfg.max_new_tokens for v in variants if v.spec.sparsity)


@pytest.mark.parametrize("module", [acceptance_vs_budget, bench_batch, bench_decode,
                                    budgetdraft_smollm2, generate, prune, rule_efficiency,
                                    specprefill, speedup])
def test_every_experiment_that_runs_a_model_takes_a_mesh(module):
  assert module.get_config().mesh == ""  # every device on data when there are several


def test_the_batch_table_builds_valid_rows():
  cfg = bench_batch.get_config()
  variants = speedup_lib.variants(cfg)
  assert [v.spec.gamma for v in variants] == [4, 3]
  assert speedup_lib.prompt_length(cfg.context, variants) == 4096 - 32 - 5  # 4K, a 4-token draft
  assert sorted(cfg.batch_sizes) == list(cfg.batch_sizes)
  assert max(cfg.batch_sizes) % cfg.distinct_prompts == 0


@pytest.mark.parametrize("variant", ["smollm2", "paper"])
def test_acceptance_vs_budget_config(variant):
  cfg = acceptance_vs_budget.get_config(variant)
  assert sorted(cfg.budgets) == list(cfg.budgets) and len(cfg.drafters) >= 2
  assert cfg.max_new_tokens <= cfg.sparsity.recent  # the greedy path must fit the drafter's ring
  sparsity = SparsityConfig(budget=None, **cfg.sparsity)
  for budget in cfg.budgets:
    sparsity.check_budget(budget)


@pytest.mark.parametrize("variant, families", [
    ("self", ["self"]), ("eagle", ["EAGLE"]), ("passkey", ["self", "EAGLE"]),
    ("copy", ["self", "EAGLE"])])
def test_issue_15_variants_name_their_families_and_loadable_drafters(variant, families):
  cfg = acceptance_vs_budget.get_config(variant)
  assert [label for label, _ in cfg.drafters] == families
  for _, source in cfg.drafters:
    drafters.check(source)  # the shipped EAGLE drafter is in the checkout
  assert cfg.task == ("" if variant in ("self", "eagle") else variant)
  assert tuple(cfg.contexts) == (4096, 8192) and cfg.num_prompts >= 8


def test_the_trained_family_a_table_reads_the_workdirs_its_training_configs_write():
  cfg = acceptance_vs_budget.get_config("self_trained")
  assert [label for label, _ in cfg.drafters] == [
      "self", "self naive", "self BudgetDraft", "self naive KL", "self BudgetDraft KL"]
  workdirs = [budgetdraft_smollm2.get_config(v).workdir
              for v in ("self_naive", "self_multiview", "self_naive_kl", "self_multiview_kl")]
  assert [source for _, source in cfg.drafters[1:]] == [f"trained:{w}" for w in workdirs]
  assert cfg.task == "" and cfg.policies == ("streaming", "snapkv", "h2o")
  labels = {label for label, _ in cfg.drafters}
  assert all(drafter in labels and baseline in labels for drafter, baseline in cfg.compare)
  for kl in ("", " KL"):  # the issue's gap, paired by prompt, for each teacher
    assert (f"self BudgetDraft{kl}", f"self naive{kl}") in cfg.compare


def test_rule_efficiency_config_names_registered_rules():
  cfg = rule_efficiency.get_config()
  assert {rule for rule, _ in cfg.rules} <= set(verification.RULES)
  assert {"gbv", "residual_bv"} <= {rule for rule, _ in cfg.rules}


@pytest.mark.parametrize("variant", ["default", "quick"])
def test_specprefill_variants_build_valid_selections(variant):
  cfg = specprefill.get_config(variant)
  for rate in cfg.keep_rates:
    specprefill_lib.SpecPrefillConfig(keep_rate=rate, **cfg.selection)
  assert all(0 < rate < 1 for rate in cfg.keep_rates) and cfg.scorers


@pytest.mark.parametrize("variant", prune.VARIANTS)
def test_prune_variants_build_valid_bonsai_runs(variant):
  cfg = prune.get_config(variant)
  BonsaiConfig(targets=tuple(cfg.targets), **cfg.bonsai)
  sparsity = SparsityConfig(budget=None, **cfg.sparsity)
  for budget in cfg.budgets:
    sparsity.check_budget(budget)
  assert cfg.max_new_tokens <= cfg.sparsity.recent
  assert (cfg.held_out_length - 1) % min(cfg.held_out_length - 1, 512) == 0


@pytest.mark.parametrize("module", [speedup, acceptance_vs_budget, bench_decode, bench_kernels,
                                    budgetdraft_smollm2, prune, rule_efficiency, specprefill,
                                    verification_table])
def test_unknown_variants_fail_clearly(module):
  with pytest.raises(ValueError, match="unknown"):
    module.get_config("nope")
