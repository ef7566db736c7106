"""The BudgetDraft trainer on a tiny teacher: it learns, it resumes exactly, it rejects bad configs."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import init_params
from budgetdraft import drafters
from budgetdraft.training import trainer
from budgetdraft.training.config import TrainConfig
from configs import budgetdraft_smollm2

PROMPT_LEN, CONTINUATION = 48, 16


@pytest.fixture(scope="module")
def tiny_teacher():
  """A 3-layer random teacher with peaked next-token laws (scaled embeddings)."""
  config = dataclasses.replace(get_config("tiny"), num_layers=3)
  params = init_params(config, jax.random.key(7))
  params["embed"]["embedding"] = params["embed"]["embedding"] * 20
  return config, params


def _sequences(vocab_size, count=8):
  return np.random.default_rng(0).integers(
      0, vocab_size, (count, PROMPT_LEN + CONTINUATION)).astype(np.int32)


def _config(variant="multiview", **overrides) -> TrainConfig:
  cfg = budgetdraft_smollm2.get_config(variant)
  cfg.update(dict(drafter_layers=1, prompt_len=PROMPT_LEN, continuation=CONTINUATION, steps=40,
                  learning_rate=3e-3, warmup_steps=5, gamma=2, log_every=20,
                  checkpoint_every=10))
  cfg.sparsity.update(dict(sinks=2, window=4, recent=4))
  if cfg.num_views:
    cfg.budgets = (8, 16, 24) if variant == "multiview" else (16,)
  cfg.teacher.top_k = 32
  cfg.teacher.cache_dir = ""
  cfg.update(overrides)
  return TrainConfig.from_dict(cfg)


def _mean(history, key, steps):
  return float(np.mean([np.mean(h[key]) for h in history[steps]]))


def test_training_lowers_both_branch_losses(tiny_teacher, tmp_path):
  config, params = tiny_teacher
  cfg = _config(steps=150, log_every=50, checkpoint_every=150, workdir=str(tmp_path))
  history = trainer.train(cfg, config, params, _sequences(config.vocab_size))
  for branch in ("full", "per_view"):
    first, last = _mean(history, branch, slice(0, 10)), _mean(history, branch, slice(-10, None))
    assert last < 0.8 * first, (branch, first, last)
  assert _mean(history, "acceptance_views", slice(-10, None)) > _mean(
      history, "acceptance_views", slice(0, 10))
  # The saved drafter reloads onto the teacher's shared embedding / head and keeps its own layers.
  drafter_config, drafter_params = drafters.load(f"trained:{tmp_path}", config, params)
  assert drafter_config.num_layers == 1
  assert drafter_params["embed"]["embedding"] is params["embed"]["embedding"]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(150))


@pytest.mark.parametrize("variant", ["naive", "multiview"])
def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_teacher, tmp_path, variant):
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size, count=5)  # fewer than steps: the data wraps around
  straight = trainer.train(_config(variant, steps=16, checkpoint_every=5,
                                   workdir=str(tmp_path / "straight")), config, params, sequences)
  interrupted = str(tmp_path / "interrupted")
  cfg = _config(variant, steps=16, checkpoint_every=5, workdir=interrupted)
  first = trainer.train(cfg, config, params, sequences, stop_after=7)
  resumed = trainer.train(cfg, config, params, sequences)
  assert [h["step"] for h in first] == list(range(7))
  assert [h["step"] for h in resumed] == list(range(7, 16))  # stop_after checkpoints at step 7
  for a, b in zip(straight, first + resumed):
    np.testing.assert_array_equal(a["loss"], b["loss"])
    np.testing.assert_array_equal(a["acceptance_views"], b["acceptance_views"])
  lines = open(os.path.join(interrupted, "metrics.jsonl")).read().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(16))


def test_cached_teacher_targets_equal_on_the_fly_and_refuse_other_settings(tiny_teacher, tmp_path):
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size, count=4)
  on_the_fly = trainer.train(_config(steps=4, workdir=str(tmp_path / "a")), config, params,
                             sequences)
  cached_cfg = _config(steps=4, workdir=str(tmp_path / "b"))
  cached_cfg = dataclasses.replace(cached_cfg, teacher=dataclasses.replace(
      cached_cfg.teacher, cache_dir=str(tmp_path / "teacher")))
  cached = trainer.train(cached_cfg, config, params, sequences)
  assert (tmp_path / "teacher" / "targets.array_record").exists()
  for a, b in zip(on_the_fly, cached):
    np.testing.assert_array_equal(a["loss"], b["loss"])
  cached_cfg = dataclasses.replace(cached_cfg, workdir=str(tmp_path / "c"),
                                   teacher=dataclasses.replace(cached_cfg.teacher, top_k=16))
  with pytest.raises(ValueError, match="was built for"):
    trainer.train(cached_cfg, config, params, sequences)


@pytest.mark.parametrize("overrides, message", [
    (dict(budgets=()), "budget list is empty"),
    (dict(budgets=(4, 16)), "below sinks \\+ window"),
    (dict(sparse_weight=-0.5), "lambda"),
    (dict(budgets=(16, 48)), "keeps the whole 48-token prompt"),
    (dict(continuation=8), "prompt_len \\+ continuation"),
])
def test_bad_training_configs_fail_clearly(tiny_teacher, tmp_path, overrides, message):
  config, params = tiny_teacher
  with pytest.raises(ValueError, match=message):
    trainer.train(_config(workdir=str(tmp_path), **overrides), config, params,
                  _sequences(config.vocab_size))
  assert not os.listdir(tmp_path)  # nothing written before the config is validated


@pytest.mark.parametrize("variant", budgetdraft_smollm2.VARIANTS)
def test_shipped_configs_are_valid_for_smollm2(variant):
  cfg = TrainConfig.from_dict(budgetdraft_smollm2.get_config(variant))
  cfg.check_against(get_config("smollm2-135m"), cfg.prompt_len + cfg.continuation)
  assert (cfg.num_views == 0) == (variant == "naive")
