"""The BudgetDraft training loop: data, teacher targets, orbax resume, metrics and progress.

The three methods of the paper are one trainer with different configs:
  naive distillation   num_views = 0 (full-cache branch only);
  single-budget        budgets = (B,), num_views = 1;
  BudgetDraft          budgets = a range, num_views = M (multi-view) + the full branch.
Everything random is a function of (seed, step) -- the sequence order is fixed by the data and
the budgets and selection rng are drawn from the step -- so a run resumed from a checkpoint (step,
params, optimizer state, data position) continues exactly as an uninterrupted one.

A workdir belongs to one run: `train_config.json` records its recipe (`TrainConfig.recipe()` and
the verifier's fingerprint), and resuming under another recipe is refused, naming the fields that
differ, before anything is written. An unreadable latest checkpoint falls back to the newest
readable one; the drafter is exported atomically and an earlier export is kept beside it.
"""

import functools
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from budgetdraft import drafters, parallel
from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import ModelConfig
from budgetdraft.training import teacher as teacher_lib
from budgetdraft.training.budgets import sample_budgets
from budgetdraft.training.config import TrainConfig
from budgetdraft.training.train_step import (TrainState, make_optimizer, make_train_step,
                                             state_shardings)


class _Teacher:
  """Teacher targets (+ the verifier's hidden states for an EAGLE-style drafter) for sequence
  indices, on the fly or from the array_record cache."""

  def __init__(self, config: TrainConfig, verifier_config, verifier_params, sequences,
               verifier_name):
    self.top_k, self.continuation = config.teacher.top_k, config.continuation
    self.sequences = sequences
    with_features = config.drafter == "eagle"
    self.features = (sequences.shape[1], verifier_config.dim) if with_features else None
    self.compute = functools.partial(
        teacher_lib.teacher_targets, verifier_params, config=verifier_config,
        prompt_len=config.prompt_len, top_k=config.teacher.top_k, with_features=with_features)
    self.cache = None
    if config.teacher.cache_dir:
      manifest = {"verifier": verifier_name, "prompt_len": config.prompt_len,
                  "continuation": config.continuation, "top_k": config.teacher.top_k}
      if with_features:
        manifest["features"] = verifier_config.dim
      self.cache = teacher_lib.TeacherCache(config.teacher.cache_dir, manifest)
      if parallel.is_writer():  # one process computes the cache, the others then read it
        self.cache.build(self.compute, sequences)
      parallel.barrier("teacher cache")

  def __call__(self, indices):
    """(ids, probs, hidden states or None)."""
    if self.cache is not None:
      targets = self.cache.read(indices, self.continuation, self.top_k, self.features)
    else:
      targets = self.compute(jnp.asarray(self.sequences[indices]))
    return tuple(targets) + (None,) * (3 - len(targets))


class _Progress:
  """Per-step metrics to metrics.jsonl and TensorBoard; an aggregated progress line in the log.
  Process 0 writes them; the other processes of a run record nothing."""

  def __init__(self, workdir: str, start_step: int, total_steps: int, tokens_per_step: int):
    self.writes = parallel.is_writer()
    if not self.writes:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._keep_lines_before(start_step)
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.total, self.tokens_per_step = total_steps, tokens_per_step
    self.start_step, self.start_time = start_step, time.time()
    self.pending = []

  def _keep_lines_before(self, step: int):
    """A resumed run recomputes the steps after its checkpoint: their old lines go (atomically)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] < step]
    if len(kept) < len(lines):
      with open(self.path + ".partial", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".partial", self.path)

  def record(self, step: int, metrics: dict, budgets: np.ndarray, log: bool):
    if not self.writes:
      return
    record = {"step": step, "loss": float(metrics["loss"]), "full": float(metrics["full"]),
              "sparse": float(metrics["sparse"]), "grad_norm": float(metrics["grad_norm"]),
              "acceptance_full": float(metrics["acceptance_full"]),
              "budgets": budgets.tolist(),
              "acceptance_views": np.asarray(metrics["acceptance_views"]).tolist()}
    for key in ("feature", "self_fed", "acceptance_self_fed"):
      if key in metrics:
        record[key] = float(metrics[key])
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key in ("loss", "full", "sparse", "grad_norm", "acceptance_full", "feature", "self_fed",
                "acceptance_self_fed"):
      if key in record:
        self.writer.add_scalar(f"train/{key}", record[key], step)
    for budget, acceptance in zip(record["budgets"], record["acceptance_views"]):
      self.writer.add_scalar(f"acceptance/budget_{budget}", acceptance, step)
    self.pending.append(record)
    if log:
      self._log(step)

  def _log(self, step: int):
    done = step + 1 - self.start_step
    elapsed = time.time() - self.start_time
    per_step = elapsed / done
    mean = lambda key: np.mean([r[key] for r in self.pending])
    by_budget = {}
    for r in self.pending:
      for budget, acceptance in zip(r["budgets"], r["acceptance_views"]):
        by_budget.setdefault(budget, []).append(acceptance)
    views_text = "".join(f" B{b}={np.mean(a):.3f}" for b, a in sorted(by_budget.items()))
    if "acceptance_self_fed" in self.pending[0]:
      views_text += f" self-fed={mean('acceptance_self_fed'):.3f}"
    tokens_per_s = self.tokens_per_step / per_step
    self.writer.add_scalar("perf/tokens_per_s", tokens_per_s, step)
    logging.info("step %d/%d loss %.4f (full %.4f, sparse %.4f) acceptance full %.3f%s | "
                 "%.0f tok/s, %.1f s/step, ETA %.1f min", step + 1, self.total, mean("loss"),
                 mean("full"), mean("sparse"), mean("acceptance_full"), views_text, tokens_per_s,
                 per_step, per_step * (self.total - step - 1) / 60)
    self.pending = []

  def close(self):
    if self.writes:
      self.writer.close()


_RECORD = "train_config.json"


def _claim_workdir(config: TrainConfig, verifier: dict) -> None:
  """Refuses a workdir that holds another run, before anything is written; records this run
  (every process checks, process 0 writes)."""
  workdir, record_path = config.workdir, os.path.join(config.workdir, _RECORD)
  recipe = {**config.recipe(), "verifier_fingerprint": verifier["fingerprint"]}
  recipe = json.loads(json.dumps(recipe))  # as it reads back from the record
  if os.path.exists(record_path):
    try:
      with open(record_path) as f:
        stored = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{record_path} is unreadable ({e}); restore it or use a new workdir") from e
    # A record written before a field existed holds that field's default.
    defaults = json.loads(json.dumps(TrainConfig(workdir=workdir).recipe()))
    stored_recipe = {**defaults, **stored["recipe"]}
    changed = sorted(key for key in recipe.keys() | stored_recipe.keys()
                     if recipe.get(key) != stored_recipe.get(key))
    if changed:
      listing = ", ".join(f"{key} {stored_recipe.get(key)!r} -> {recipe.get(key)!r}"
                          for key in changed)
      if not config.allow_config_change:
        raise ValueError(f"{workdir} holds a run with another config ({listing}); rerun with its "
                         "config, use a new workdir, or pass --config.allow_config_change=True")
      logging.warning("resuming %s under a changed config: %s", workdir, listing)
    if stored["steps"] != config.steps:
      logging.warning("steps %d -> %d: the learning-rate schedule is recomputed for %d steps",
                      stored["steps"], config.steps, config.steps)
  else:
    leftovers = [name for name in ("checkpoints", "metrics.jsonl", "drafter")
                 if os.path.exists(os.path.join(workdir, name))]
    if leftovers:
      raise ValueError(f"{workdir} holds {leftovers} of a run without {_RECORD}; use a new "
                       "workdir or move those away")
  parallel.barrier("workdir checked")  # before process 0 writes what the others check
  if not parallel.is_writer():
    return
  os.makedirs(workdir, exist_ok=True)
  with open(record_path + ".partial", "w") as f:
    json.dump({"recipe": recipe, "steps": config.steps, "verifier": verifier["name"]}, f, indent=1)
  os.replace(record_path + ".partial", record_path)


def _restore(manager: ocp.CheckpointManager, state: TrainState, workdir: str) -> TrainState:
  """The newest readable checkpoint (the initial state if there is none); unreadable newer ones
  are moved to <workdir>/unreadable_checkpoints."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # tensorstore / orbax errors on truncated or missing files
      aside = os.path.join(workdir, "unreadable_checkpoints", str(step))
      logging.warning("checkpoint %d of %s is unreadable (%s); moved to %s, trying an older one",
                      step, workdir, type(e).__name__, aside)
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.rename(os.path.join(manager.directory, str(step)), aside)
      manager.reload()
      continue
    logging.info("resumed from %s at step %d", workdir, int(restored.step))
    return restored
  return state


def _exported(directory: str, steps: int, verifier: dict) -> bool:
  """Whether `directory` holds this run's drafter after `steps` steps."""
  try:
    meta = drafters.read_metadata(directory)
  except (FileNotFoundError, ValueError):
    return False
  return meta.get("steps") == steps and meta.get("verifier_fingerprint") == verifier["fingerprint"]


def train(config: TrainConfig, verifier_config: ModelConfig, verifier_params: dict,
          sequences: np.ndarray, *, verifier_name: str = "", stop_after: int | None = None,
          mesh: jax.sharding.Mesh | None = None) -> list[dict]:
  """Trains a drafter cut from the verifier on sequences [N, P + C]; resumes from config.workdir.

  mesh: a `parallel.make_mesh` mesh to train on (batch over `data`, FSDP parameters and optimizer
  state); a checkpoint written on any mesh, or on one device, restores onto it.

  stop_after: stop (with a checkpoint) after this many steps in total, as if the job were killed
  there; a later call resumes. Returns the per-step metrics of this call. The trained drafter is
  saved under <workdir>/drafter (`drafters.load("trained:<workdir>", ...)`).
  """
  config.check_against(verifier_config, sequences.shape[1])
  verifier = {"name": verifier_name,
              "fingerprint": checkpoint_io.fingerprint(verifier_config, verifier_params)}
  _claim_workdir(config, verifier)
  workdir = config.workdir
  num_used = config.sequences_used(len(sequences))
  # From every training sequence, not the steps' share: a run extended later keeps its ids.
  draft_ids = (drafters.frequent_ids(sequences, config.draft_vocab,
                                     verifier_config.vocab_size) if config.draft_vocab else None)
  model_config, trainable, shared = drafters.initialize(
      config.drafter, verifier_config, verifier_params, config.drafter_layers, draft_ids,
      config.seed, config.pruned_from)
  optimizer = make_optimizer(config)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its state, not the verifier's
  state = TrainState(step=jnp.zeros((), jnp.int32), data_position=jnp.zeros((), jnp.int32),
                     params=trainable, opt_state=optimizer.init(trainable))
  shardings = None
  if mesh is not None:  # restoring below then reads a checkpoint of any mesh onto this one
    shardings = state_shardings(mesh, state, optimizer)
    state = jax.device_put(state, shardings)
    shared = parallel.place_params(mesh, shared, parallel.FSDP_RULES)
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2))
  state = _restore(manager, state, workdir)
  if int(state.step) > config.steps:
    raise ValueError(f"{workdir} is at step {int(state.step)}, past steps={config.steps}")

  teacher = _Teacher(config, verifier_config, verifier_params, sequences[:num_used],
                     verifier_name)
  train_step = make_train_step(model_config, config, optimizer, shardings)
  # On a mesh each process reads only the rows its devices hold (the teacher's included).
  rows = (np.arange(config.batch_size) if mesh is None else
          parallel.process_rows(mesh, config.batch_size))
  on_batch = lambda x: x if mesh is None or x is None else parallel.from_process_rows(
      mesh, x, config.batch_size)
  last_step = min(config.steps, stop_after or config.steps)
  progress = _Progress(workdir, int(state.step), config.steps,
                       config.batch_size * sequences.shape[1])
  history = []
  for step in range(int(state.step), last_step):
    step_budgets = sample_budgets(config, step)
    indices = (int(state.data_position) + rows) % num_used
    batch = (jnp.asarray(sequences[indices]),) + tuple(teacher(indices))
    tokens, teacher_ids, teacher_probs, verifier_hidden = map(on_batch, batch)
    with parallel.running_on(mesh):  # Pallas views then run on each device's shard
      state, metrics = train_step(state, shared, tokens, teacher_ids, teacher_probs,
                                  jnp.asarray(step_budgets), verifier_hidden)
    metrics = jax.device_get(metrics)
    is_last = step + 1 == last_step
    progress.record(step, metrics, step_budgets,
                    log=(step + 1) % config.log_every == 0 or is_last)
    history.append({"step": step, **metrics})
    if (step + 1) % config.checkpoint_every == 0 or is_last:
      manager.save(step + 1, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  progress.close()
  drafter_dir = os.path.join(workdir, "drafter")
  if int(state.step) == config.steps and not _exported(drafter_dir, config.steps, verifier):
    trained = jax.tree.map(parallel.to_host, state.params)  # every process gathers; 0 writes
    if parallel.is_writer():
      drafters.save(drafter_dir, trained, kind=config.drafter,
                    num_layers=model_config.num_layers, verifier=verifier, steps=config.steps,
                    draft_ids=draft_ids, pruned_from=config.pruned_from)
    parallel.barrier("drafter exported")
  return history
