"""The BudgetDraft trainer on a tiny teacher: it learns, it resumes exactly, it rejects bad configs."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import get_config
from budgetdraft.pruning import units
from budgetdraft.pruning import checkpoint as pruned_checkpoint
from budgetdraft.sparsity.selection import SparsityConfig
from budgetdraft.models.transformer import init_params
from budgetdraft import drafters
from budgetdraft.training import teacher as teacher_lib
from budgetdraft.training import trainer
from budgetdraft.training.config import TeacherConfig, TrainConfig
from configs import budgetdraft_paper, budgetdraft_smollm2

PROMPT_LEN, CONTINUATION = 48, 16


def make_tiny_teacher():
  """A 3-layer random teacher with peaked next-token laws (scaled embeddings)."""
  config = dataclasses.replace(get_config("tiny"), num_layers=3)
  params = init_params(config, jax.random.key(7))
  params["embed"]["embedding"] = params["embed"]["embedding"] * 20
  return config, params


@pytest.fixture(scope="module")
def tiny_teacher():
  return make_tiny_teacher()


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
    cfg.budgets = (16,) if variant == "single" else (8, 16, 24)
  if variant == "eagle":
    cfg.draft_vocab = 64
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
  # A shorter run caches 2 sequences; the 4-step run extends that cache to 4.
  trainer.train(dataclasses.replace(cached_cfg, steps=2, workdir=str(tmp_path / "short")),
                config, params, sequences)
  cached = trainer.train(cached_cfg, config, params, sequences)
  assert (tmp_path / "teacher" / "targets.array_record").exists()
  for a, b in zip(on_the_fly, cached):
    np.testing.assert_array_equal(a["loss"], b["loss"])
  cached_cfg = dataclasses.replace(cached_cfg, workdir=str(tmp_path / "c"),
                                   teacher=dataclasses.replace(cached_cfg.teacher, top_k=16))
  with pytest.raises(ValueError, match="was built for"):
    trainer.train(cached_cfg, config, params, sequences)
  cached_cfg = _config(steps=4, workdir=str(tmp_path / "d"))
  cached_cfg = dataclasses.replace(cached_cfg, teacher=dataclasses.replace(
      cached_cfg.teacher, cache_dir=str(tmp_path / "teacher")))
  with pytest.raises(ValueError, match="holds other training sequences"):
    trainer.train(cached_cfg, config, params, sequences[::-1].copy())


def test_the_whole_law_teacher_equals_top_k_over_the_whole_vocabulary(tiny_teacher, tmp_path):
  """top_k = 0 hands the verifier's law to the loss as it is (no top-k, no scatter): the same
  targets and the same training as a top-k that keeps every token; a cache of it is refused."""
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size, count=2)
  tokens = jnp.asarray(sequences)
  ids, probs = teacher_lib.teacher_targets(params, tokens, config=config, prompt_len=PROMPT_LEN,
                                           top_k=config.vocab_size, prefill_chunk=16)
  none, law = teacher_lib.teacher_targets(params, tokens, config=config, prompt_len=PROMPT_LEN,
                                          top_k=0, prefill_chunk=16)
  assert none is None and law.shape == (2, CONTINUATION, config.vocab_size)
  np.testing.assert_allclose(law, teacher_lib.dense_probs(ids, probs, config.vocab_size),
                             atol=1e-6)
  runs = [trainer.train(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher,
                                                                             top_k=top_k)),
                        config, params, sequences)
          for top_k in (config.vocab_size, 0)
          for cfg in [_config(steps=3, workdir=str(tmp_path / str(top_k)))]]
  np.testing.assert_allclose([h["loss"] for h in runs[0]], [h["loss"] for h in runs[1]],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="on the fly"):
    TeacherConfig(top_k=0, cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match="or 0 for the whole law"):
    TeacherConfig(top_k=-1)


def _assert_speculates_like_ar(config, params, drafter_config, drafter_params, sequences):
  """Greedy speculative decoding with the drafter over a sparse cache equals greedy AR."""
  prompts = [sequences[0, :40].tolist(), sequences[1, :30].tolist()]
  expected = autoregressive.generate(params, prompts, jax.random.key(0), config=config,
                                     max_new_tokens=16, prefill_chunk=16)
  spec = speculative.SpeculativeConfig(gamma=3, max_new_tokens=16, prefill_chunk=16,
                                       sparsity=SparsityConfig(budget=16, sinks=2, window=4,
                                                               recent=4, observation=4))
  out, _ = speculative.generate(params, drafter_params, prompts, jax.random.key(1),
                                verifier_config=config, drafter_config=drafter_config, spec=spec)
  assert out == expected


def test_eagle_training_learns_and_its_drafter_decodes_losslessly(tiny_teacher, tmp_path):
  """The EAGLE recipe: a fresh block fed the teacher's hidden states (read back from the cached
  teacher), a 64-id head, and a self-fed pass (its own states); every loss falls, and the exported
  drafter speculates losslessly."""
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size)
  cfg = _config("eagle", steps=150, log_every=50, checkpoint_every=150, self_fed_weight=1.0,
                workdir=str(tmp_path / "w"))
  cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(
      cfg.teacher, cache_dir=str(tmp_path / "teacher")))
  history = trainer.train(cfg, config, params, sequences)
  for key in ("full", "feature", "self_fed"):
    first, last = _mean(history, key, slice(0, 10)), _mean(history, key, slice(-10, None))
    assert last < 0.8 * first, (key, first, last)
  drafter_config, drafter_params = drafters.load(f"trained:{tmp_path / 'w'}", config, params)
  assert (drafter_config.feature_dim, drafter_config.draft_vocab) == (config.dim, 64)
  np.testing.assert_array_equal(drafter_params["draft_head"]["ids"],
                                drafters.frequent_ids(sequences, 64, config.vocab_size))
  _assert_speculates_like_ar(config, params, drafter_config, drafter_params, sequences)
  # The cache holds the hidden states: a second run from it repeats the first exactly.
  again = trainer.train(dataclasses.replace(cfg, workdir=str(tmp_path / "again"), steps=3),
                        config, params, sequences)
  np.testing.assert_array_equal(again[2]["loss"], history[2]["loss"])


def test_a_pruned_verifier_trains_as_a_drafter_and_decodes_losslessly(tiny_teacher, tmp_path):
  """drafter="pruned": the trainer takes the pruned (unrolled) model unchanged; the full-branch
  loss falls and the exported drafter, loaded back with its pruned shapes, speculates losslessly."""
  config, params = tiny_teacher
  layout = units.Layout(config, 16)
  keep = np.ones(layout.size, bool)
  keep[[0, 3]] = False  # KV head 0 of layers 0 and 1
  keep[layout.slices()["channels"]][::3] = False
  pruned_config, pruned_params = units.prune(layout, params, keep)
  pruned_dir = str(tmp_path / "pruned")
  pruned_checkpoint.save(pruned_dir, pruned_config, pruned_params, keep=keep, verifier={
      "name": "tiny", "fingerprint": checkpoint_io.fingerprint(config, params)})
  sequences = _sequences(config.vocab_size)
  cfg = _config("pruned", pruned_from=pruned_dir, steps=40, log_every=20, checkpoint_every=40,
                workdir=str(tmp_path / "w"))
  history = trainer.train(cfg, config, params, sequences)
  first, last = _mean(history, "full", slice(0, 10)), _mean(history, "full", slice(-10, None))
  assert last < 0.9 * first, (first, last)
  drafter_config, drafter_params = drafters.load(f"trained:{tmp_path / 'w'}", config, params)
  assert drafter_config == pruned_config
  assert pruned_config.num_layers != cfg.drafter_layers  # the metadata records the model's own
  assert drafters.read_metadata(str(tmp_path / "w" / "drafter"))["num_layers"] == (
      pruned_config.num_layers)
  _assert_speculates_like_ar(config, params, drafter_config, drafter_params, sequences)


@pytest.mark.parametrize("overrides, message", [
    (dict(drafter="mlp"), "drafter='mlp'"),
    (dict(drafter="pruned"), "pruned_from=''"),
    (dict(num_sequences=-1), "num_sequences=-1"),
    (dict(feature_weight=1.0), "drafter='eagle' only"),
    (dict(self_fed_weight=1.0), "drafter='eagle' only"),
    (dict(drafter="eagle", self_fed_weight=-1.0), "self_fed_weight=-1.0"),
    (dict(budgets=()), "budget list is empty"),
    (dict(budgets=(4, 16)), "below sinks \\+ window"),
    (dict(sparse_weight=-0.5), "lambda"),
    (dict(kl_weight=0.0, rejection_weight=0.0), "not both 0"),
    (dict(rejection_weight=-1.0), "must be >= 0"),
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
  raw = budgetdraft_smollm2.get_config(variant)
  # The flag the refusal message suggests must exist: --config.allow_config_change=True.
  assert raw.allow_config_change is False
  cfg = TrainConfig.from_dict(raw)
  cfg.check_against(get_config("smollm2-135m"), cfg.prompt_len + cfg.continuation)
  assert (cfg.num_views == 0) == (variant in ("naive", "self_naive", "self_naive_kl"))
  if variant.startswith("self_"):  # family (a): the drafter is the verifier, every block of it
    assert cfg.drafter == "layers" and cfg.drafter_layers == get_config("smollm2-135m").num_layers
  if variant.endswith("_kl"):  # ... starting at the teacher: its whole law, KL alone
    assert cfg.teacher.top_k == 0 and not cfg.teacher.cache_dir
    assert cfg.rejection_weight == 0 and cfg.kl_weight > 0


def test_training_on_the_pallas_kernels_equals_the_jnp_path(tiny_teacher, tmp_path):
  """attention_impl="pallas" (interpret mode here): teacher, prompt pass and views on the kernels."""
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size)
  runs = [trainer.train(_config(steps=3, workdir=str(tmp_path / impl)),
                        dataclasses.replace(config, attention_impl=impl), params, sequences)
          for impl in ("jnp", "pallas")]
  for jnp_step, pallas_step in zip(*runs):
    assert float(pallas_step["loss"]) == pytest.approx(float(jnp_step["loss"]), rel=1e-4)


@pytest.mark.parametrize("variant", budgetdraft_paper.VARIANTS)
def test_the_published_recipe_configs_are_valid_for_smollm2(variant):
  cfg = TrainConfig.from_dict(budgetdraft_paper.get_config(variant))
  cfg.check_against(get_config("smollm2-135m"), cfg.prompt_len + cfg.continuation)
  assert cfg.targets == "argmax" and not cfg.prefix_gradient
  assert cfg.sparsity.policy == "chunk_retrieval" and cfg.sparsity.recent >= cfg.continuation
  assert cfg.num_views == (0 if variant == "la_only" else 1)


def test_the_published_recipe_learns_on_the_same_trainer(tiny_teacher, tmp_path):
  """Hard labels, a prefix without gradient, one weighted budget per step, chunk retrieval."""
  config, params = tiny_teacher
  raw = budgetdraft_paper.get_config("cpu")
  raw.update(dict(drafter_layers=1, prompt_len=PROMPT_LEN, continuation=CONTINUATION, steps=100,
                  learning_rate=3e-3, warmup_steps=5, gamma=2, log_every=50,
                  checkpoint_every=100, workdir=str(tmp_path), budgets=(8, 16, 24),
                  budget_weights=(0.5, 0.5, 0.0)))
  raw.sparsity.update(dict(chunk=4, recent=CONTINUATION))
  raw.teacher.update(dict(top_k=32, cache_dir=""))
  history = trainer.train(TrainConfig.from_dict(raw), config, params,
                          _sequences(config.vocab_size))
  for branch in ("full", "sparse"):
    first, last = _mean(history, branch, slice(0, 10)), _mean(history, branch, slice(-10, None))
    assert last < 0.8 * first, (branch, first, last)
  drawn = {b for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           for b in json.loads(line)["budgets"]}
  assert drawn == {8, 16}  # weight 0: never drawn
  drafter_config, drafter_params = drafters.load(f"trained:{tmp_path}", config, params)
  assert drafter_config.num_layers == 1


# ------------------------------------------------------------------ workdirs, resume, corruption


def _metrics_steps(workdir):
  return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_resuming_under_another_config_is_refused_naming_the_fields(tiny_teacher, tmp_path):
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size)
  workdir = str(tmp_path / "run")
  trainer.train(_config(steps=6, workdir=workdir), config, params, sequences, stop_after=3)
  changed = _config("naive", steps=6, workdir=workdir, learning_rate=1e-3, seed=1)
  with pytest.raises(ValueError, match="num_views 2 -> 0.*seed 0 -> 1|learning_rate.*num_views"):
    trainer.train(changed, config, params, sequences)
  assert _metrics_steps(workdir) == [0, 1, 2]  # nothing was written by the refused run
  with pytest.raises(ValueError, match="learning_rate 0.003 -> 0.001"):
    trainer.train(changed, config, params, sequences)
  allowed = dataclasses.replace(changed, allow_config_change=True)
  assert [h["step"] for h in trainer.train(allowed, config, params, sequences)] == [3, 4, 5]


def test_a_record_written_before_a_field_existed_reads_as_its_default(tiny_teacher, tmp_path):
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size)
  cfg = _config(steps=5, workdir=str(tmp_path))
  trainer.train(cfg, config, params, sequences, stop_after=2)
  record_path = tmp_path / "train_config.json"
  record = json.loads(record_path.read_text())
  for newer in ("targets", "prefix_gradient", "budget_weights", "sparsity.chunk"):
    del record["recipe"][newer]
  record_path.write_text(json.dumps(record))
  assert [h["step"] for h in trainer.train(cfg, config, params, sequences)] == [2, 3, 4]
  with pytest.raises(ValueError, match="targets 'soft' -> 'argmax'"):
    trainer.train(dataclasses.replace(cfg, targets="argmax"), config, params, sequences)


def test_a_workdir_holding_another_runs_drafter_is_refused_before_training(tiny_teacher, tmp_path):
  config, params = tiny_teacher
  (tmp_path / "drafter").mkdir()
  (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
  with pytest.raises(ValueError, match="holds \\['metrics.jsonl', 'drafter'\\] of a run"):
    trainer.train(_config(steps=4, workdir=str(tmp_path)), config, params,
                  _sequences(config.vocab_size))
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'
  assert sorted(os.listdir(tmp_path)) == ["drafter", "metrics.jsonl"]


def test_extending_a_finished_run_keeps_the_earlier_drafter(tiny_teacher, tmp_path):
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size)
  workdir = str(tmp_path)
  trainer.train(_config(steps=4, checkpoint_every=2, workdir=workdir), config, params, sequences)
  assert drafters.read_metadata(os.path.join(workdir, "drafter"))["steps"] == 4
  # Rerunning the finished run trains nothing and leaves its drafter as it is.
  assert trainer.train(_config(steps=4, checkpoint_every=2, workdir=workdir), config, params,
                       sequences) == []
  extended = trainer.train(_config(steps=6, checkpoint_every=2, workdir=workdir), config, params,
                           sequences)
  assert [h["step"] for h in extended] == [4, 5]
  assert drafters.read_metadata(os.path.join(workdir, "drafter"))["steps"] == 6
  assert drafters.read_metadata(os.path.join(workdir, "drafter-step4"))["steps"] == 4
  assert _metrics_steps(workdir) == list(range(6))
  # A deleted export comes back by rerunning the command.
  shutil.rmtree(os.path.join(workdir, "drafter"))
  trainer.train(_config(steps=6, checkpoint_every=2, workdir=workdir), config, params, sequences)
  assert drafters.load(f"trained:{workdir}", config, params)[0].num_layers == 1


@pytest.fixture(scope="module")
def straight_run(tiny_teacher, tmp_path_factory):
  """(per-step metrics, workdir) of an uninterrupted 8-step run, checkpointed every 2 steps."""
  config, params = tiny_teacher
  workdir = str(tmp_path_factory.mktemp("straight"))
  history = trainer.train(_config(steps=8, checkpoint_every=2, workdir=workdir), config, params,
                          _sequences(config.vocab_size, count=5))
  return history, workdir


def test_an_unreadable_latest_checkpoint_falls_back_to_the_older_one(tiny_teacher, straight_run,
                                                                     tmp_path):
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size, count=5)
  straight, _ = straight_run
  workdir = str(tmp_path / "b")
  cfg = _config(steps=8, checkpoint_every=2, workdir=workdir)
  trainer.train(cfg, config, params, sequences, stop_after=6)  # checkpoints at steps 4 and 6
  latest = os.path.join(workdir, "checkpoints", "6")
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, name)) // 2)
  resumed = trainer.train(cfg, config, params, sequences)
  assert [h["step"] for h in resumed] == [4, 5, 6, 7]
  assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", "6"))
  for a, b in zip(straight[4:], resumed):
    np.testing.assert_array_equal(a["loss"], b["loss"])


def test_a_drafter_refuses_another_verifier_and_corruption_is_named(tiny_teacher, tmp_path):
  config, params = tiny_teacher
  workdir = str(tmp_path)
  trainer.train(_config(steps=2, workdir=workdir), config, params, _sequences(config.vocab_size))
  other = jax.tree.map(lambda x: x * 1.01, params)  # same shapes, other weights
  with pytest.raises(ValueError, match="was trained for verifier .* not for the given one"):
    drafters.load(f"trained:{workdir}", config, other)
  params_dir = os.path.join(workdir, "drafter", "params")
  for root, _, files in os.walk(params_dir):
    for name in files:
      open(os.path.join(root, name), "wb").close()
  with pytest.raises(ValueError, match="drafter params in .* are unreadable"):
    drafters.load(f"trained:{workdir}", config, params)
  with open(os.path.join(workdir, "drafter", "drafter.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="drafter.json is unreadable"):
    drafters.load(f"trained:{workdir}", config, params)


def test_a_corrupted_teacher_cache_is_named(tiny_teacher, tmp_path):
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size, count=4)
  cfg = _config(steps=2, workdir=str(tmp_path / "a"))
  cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher,
                                                             cache_dir=str(tmp_path / "t")))
  trainer.train(cfg, config, params, sequences)
  records = tmp_path / "t" / "targets.array_record"
  records.write_bytes(records.read_bytes()[:100])
  with pytest.raises(ValueError, match="teacher cache .* is unreadable.*delete"):
    trainer.train(dataclasses.replace(cfg, workdir=str(tmp_path / "b")), config, params,
                  sequences)


_KILLED_DURING_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
from tests import test_training as t

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize_or_die(self):  # the rename that commits a checkpoint: die just before it
  if os.path.basename(str(self._final_path)) == sys.argv[2]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
config, params = t.make_tiny_teacher()
t.trainer.train(t._config(steps=8, checkpoint_every=2, workdir=sys.argv[1]), config, params,
                t._sequences(config.vocab_size, count=5))
"""


def test_a_run_killed_during_a_checkpoint_save_resumes_identically(tiny_teacher, straight_run,
                                                                  tmp_path):
  config, params = tiny_teacher
  sequences = _sequences(config.vocab_size, count=5)
  straight, straight_workdir = straight_run
  workdir = str(tmp_path / "b")
  killed = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, workdir, "6"],
                          cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True,
                          text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "6"))  # never committed
  resumed = trainer.train(_config(steps=8, checkpoint_every=2, workdir=workdir), config, params,
                          sequences)
  assert [h["step"] for h in resumed] == [4, 5, 6, 7]
  for a, b in zip(straight[4:], resumed):
    np.testing.assert_array_equal(a["loss"], b["loss"])
  assert _metrics_steps(workdir) == list(range(8))
  ours = drafters.load(f"trained:{workdir}", config, params)[1]
  theirs = drafters.load(f"trained:{straight_workdir}", config, params)[1]
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
