"""Sharded decoding equals unsharded decoding, token for token (a tiny model on 8 fake CPU devices,
SmolLM2 on 6 with model=3, two CPU processes), sharded training equals unsharded training (one
process on 8 devices, two processes), and every array is laid out as `parallel.RULES` says.
Meshes run in subprocesses: the device count is fixed when jax starts."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from budgetdraft import parallel
from tests.conftest import REPO_ROOT


def _decoders(attention_impl: str = "jnp"):
  """(AR, speculative) greedy decoding of 4 ragged prompts with a tiny model, each a function of
  the mesh (None = unsharded), and the model's params and config."""
  import numpy as np
  from budgetdraft.decoding import autoregressive, speculative
  from budgetdraft.models.config import get_config
  from budgetdraft.models.transformer import init_params
  from budgetdraft.sparsity.selection import SparsityConfig

  # 4 heads, 2 KV heads, mlp 128, vocab 256
  config = get_config("tiny", attention_bias=True, attention_impl=attention_impl)
  params = init_params(config, jax.random.key(0))
  drafter = init_params(config, jax.random.key(1))
  prompts = [np.random.default_rng(i).integers(0, 256, 50 + 9 * i).tolist() for i in range(4)]
  spec = speculative.SpeculativeConfig(
      gamma=3, rule="greedy", max_new_tokens=12, prefill_chunk=32,
      sparsity=SparsityConfig(policy="snapkv", budget=40, window=8, recent=16))
  ar = lambda mesh: autoregressive.generate(params, prompts, jax.random.key(0), config=config,
                                            max_new_tokens=12, prefill_chunk=32, mesh=mesh)
  sd = lambda mesh: speculative.generate(params, drafter, prompts, jax.random.key(0),
                                         verifier_config=config, drafter_config=config, spec=spec,
                                         mesh=mesh)[0]
  return ar, sd, params, config, prompts


def _process_run(port: int, process_id: int) -> dict:
  """One of two CPU processes of a multi-process run: greedy decoding on a data=2 mesh spanning
  both processes' devices."""
  parallel.initialize(f"127.0.0.1:{port}", 2, process_id)
  ar, sd, *_ = _decoders()
  mesh = parallel.make_mesh("data=2")
  return {"devices": len(jax.devices()), "local": len(jax.local_devices()), "ar": ar(mesh),
          "spec": sd(mesh)}


def _tiny_training(workdir: str, mesh=None, teacher_cache: str = ""):
  """6 steps of the tiny trainer at batch 8 (sequences and teacher of tests/test_training.py)."""
  from budgetdraft.training import trainer
  from tests import test_training

  config, params = test_training.make_tiny_teacher()
  cfg = test_training._config(steps=6, batch_size=8, checkpoint_every=3, log_every=3,
                              workdir=workdir)
  cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache_dir=teacher_cache))
  history = trainer.train(cfg, config, params,
                          test_training._sequences(config.vocab_size, count=16), mesh=mesh)
  return [float(h["loss"]) for h in history]


def _process_training(port: int, process_id: int, workdir: str) -> dict:
  """One of two CPU processes training together on a data=2 mesh in one workdir, the teacher
  targets cached by process 0: the losses it saw and the batch rows it read."""
  parallel.initialize(f"127.0.0.1:{port}", 2, process_id)
  mesh = parallel.make_mesh("data=2")
  losses = _tiny_training(os.path.join(workdir, "run"), mesh, os.path.join(workdir, "teacher"))
  return {"losses": losses, "rows": parallel.process_rows(mesh, 8).tolist()}


def _smollm2_run() -> dict:
  """Runs in a subprocess (6 devices): SmolLM2 greedy AR decoding unsharded, and AR and
  speculative decoding (a 4-layer cut drafting over SnapKV) on data=2,model=3 (9 heads, 3 KV
  heads, vocab 49152). Greedy speculative output must equal unsharded AR's, so the unsharded
  speculative run would add a compile and no check."""
  from budgetdraft import drafters
  from budgetdraft.decoding import autoregressive, speculative
  from budgetdraft.models import checkpoint_io
  from budgetdraft.sparsity.selection import SparsityConfig

  verifier = checkpoint_io.load()
  tokenizer = verifier.tokenizer
  prompts = [tokenizer.encode(tokenizer.chat_prompt(question)) for question in
             ("What is the capital of France?", "Name three colors of the rainbow.")]
  drafter_config, drafter_params = drafters.load("layers:4", verifier.config, verifier.params)
  spec = speculative.SpeculativeConfig(
      gamma=3, rule="greedy", max_new_tokens=16, prefill_chunk=64,
      sparsity=SparsityConfig(policy="snapkv", budget=20, sinks=2, window=8, observation=8))
  ar = lambda mesh: autoregressive.generate(verifier.params, prompts, jax.random.key(0),
                                            config=verifier.config, max_new_tokens=16,
                                            prefill_chunk=64, mesh=mesh)
  mesh = parallel.make_mesh("data=2,model=3")
  return {"unsharded": ar(None), "ar": ar(mesh),
          "spec": speculative.generate(verifier.params, drafter_params, prompts, jax.random.key(0),
                                       verifier_config=verifier.config,
                                       drafter_config=drafter_config, spec=spec, mesh=mesh)[0]}


def _sharded_run() -> dict:
  """Runs in the subprocess (8 devices): AR and speculative greedy decoding, unsharded and on
  three meshes, and the shardings the rules gave."""
  import flax
  from budgetdraft.decoding import autoregressive
  from budgetdraft.decoding.sampling import SamplingConfig
  from budgetdraft.models.prefill import pad_prompts

  ar, sd, params, config, prompts = _decoders()
  out = {"devices": len(jax.devices()), "ar": ar(None), "spec": sd(None)}
  for name in ("data=4,model=2", "data=8", "model=2,data=4"):
    mesh = parallel.make_mesh(name)
    out[name] = {"ar": ar(mesh), "spec": sd(mesh)}
  mesh = parallel.make_mesh("data=4,model=2")
  shardings = flax.traverse_util.flatten_dict(parallel.param_shardings(mesh, params), sep="/")
  out["params"] = {name: list(shardings[name].spec) for name in (
      "layers/q_proj/kernel", "layers/k_proj/bias", "layers/down_proj/kernel", "embed/embedding",
      "layers/attn_norm/scale", "final_norm/scale")}
  (placed,), prompt, lengths = parallel.place(
      mesh, (params,), *pad_prompts(prompts, 0, 256))
  static = dict(config=config, sampling=SamplingConfig(), eos_id=None, pad_id=0)
  state = autoregressive.start(placed, prompt, lengths, jax.random.key(0), max_new_tokens=12,
                               prefill_chunk=32, **static)
  final = autoregressive.decode(placed, parallel.place_state(mesh, state, 4), **static)
  spec = lambda x: list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
  out["cache"] = {"k": spec(final.cache.k), "length": spec(final.cache.length)}
  out["speedup"] = _speedup_rows(params, config, {"unsharded": None, "data=4,model=2": mesh})
  out["pallas"] = _pallas_run()
  return out


def _pallas_run() -> dict:
  """The tiny pair on the Pallas kernels (interpreted): greedy tokens unsharded and on
  data=4,model=2, and whether a kernel call runs inside shard_map there."""
  import jax.numpy as jnp
  from budgetdraft.models.kv_cache import FullKVCache

  ar, sd, _, config, _ = _decoders("pallas")
  mesh = parallel.make_mesh("data=4,model=2")
  out = {name: {"ar": ar(m), "spec": sd(m)} for name, m in (("unsharded", None),
                                                            ("data=4,model=2", mesh))}
  cache = FullKVCache.init(config, 4, 64)
  q = jnp.ones((4, 1, config.num_heads, config.head_dim))
  with parallel.running_on(mesh):
    jaxpr = jax.make_jaxpr(lambda q: cache.attend(0, q, None))(q).jaxpr
  shard_map = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "shard_map"]
  inner = shard_map[0].params["jaxpr"]
  out["kernel in shard_map"] = "pallas_call" in str(inner) and not any(
      "pallas_call" in str(eqn) for eqn in jaxpr.eqns if eqn not in shard_map)
  out["kernel queries"] = list(inner.invars[0].aval.shape)  # one device's [B, T, H, D]
  return out


def _speedup_rows(params, config, meshes: dict) -> dict:
  """The speedup experiment's measurement (greedy, a 1-layer cut over SnapKV) on each mesh: its
  `= AR` check and tokens per call."""
  import numpy as np
  from budgetdraft.decoding.speculative import SpeculativeConfig
  from budgetdraft.evaluation import speedup
  from budgetdraft.models.checkpoint_io import Checkpoint
  from budgetdraft.sparsity.selection import SparsityConfig

  verifier = Checkpoint(path="tiny", config=config, params=params, tokenizer=None)
  variants = [speedup.Variant("layers:1", SpeculativeConfig(
      gamma=3, max_new_tokens=12, prefill_chunk=32,
      sparsity=SparsityConfig(policy="snapkv", budget=40, window=8, recent=16)))]
  prompt = np.random.default_rng(0).integers(3, 200, (1, speedup.prompt_length(160, variants)))
  rows = {name: speedup.speedup(verifier, {160: prompt}, variants, mesh)[0]
          for name, mesh in meshes.items()}
  return {name: [row["= AR"], row["tokens/call"]] for name, row in rows.items()}


def _training_run() -> dict:
  """Runs in a subprocess (8 devices): the tiny BudgetDraft trainer at batch 8, unsharded, and
  sharded on data=8 for 3 steps, then resumed from that checkpoint on data=4,model=2."""
  import tempfile
  import flax
  import numpy as np
  from budgetdraft import drafters
  from budgetdraft.training import trainer, train_step
  from tests import test_training

  config, params = test_training.make_tiny_teacher()
  sequences = test_training._sequences(config.vocab_size, count=16)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    cfg = lambda name: test_training._config(steps=6, batch_size=8, checkpoint_every=3,
                                             log_every=3, workdir=os.path.join(tmp, name))
    plain = trainer.train(cfg("plain"), config, params, sequences)
    first = trainer.train(cfg("sharded"), config, params, sequences, stop_after=3,
                          mesh=parallel.make_mesh("data=8"))
    rest = trainer.train(cfg("sharded"), config, params, sequences,
                         mesh=parallel.make_mesh("data=4,model=2"))
    out["steps"] = [h["step"] for h in first + rest]
    out["plain"] = [float(h["loss"]) for h in plain]
    out["sharded"] = [float(h["loss"]) for h in first + rest]
    trained = [drafters.load(f"trained:{os.path.join(tmp, name)}", config, params)[1]
               for name in ("plain", "sharded")]
    out["param_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                            for a, b in zip(jax.tree.leaves(trained[0]),
                                            jax.tree.leaves(trained[1])))
    pallas = dataclasses.replace(config, attention_impl="pallas")  # views on the kernel's VJP
    out["pallas"] = {name: [float(h["loss"]) for h in trainer.train(
        test_training._config(steps=2, batch_size=8, workdir=os.path.join(tmp, f"pallas-{name}")),
        pallas, params, sequences, mesh=mesh and parallel.make_mesh(mesh))]
        for name, mesh in (("unsharded", None), ("data=4,model=2", "data=4,model=2"))}
  _, trainable, _ = drafters.initialize("layers", config, params, 1)
  optimizer = train_step.make_optimizer(cfg("unused"))
  state = train_step.TrainState(step=0, data_position=0, params=trainable,
                                opt_state=optimizer.init(trainable))
  shardings = train_step.state_shardings(parallel.make_mesh("data=4,model=2"), state, optimizer)
  flat = flax.traverse_util.flatten_dict(shardings.params, sep="/")
  moments = flax.traverse_util.flatten_dict(shardings.opt_state[1][0].mu, sep="/")
  out["specs"] = {name: list(flat[name].spec) for name in ("layers/q_proj/kernel",
                                                           "layers/down_proj/kernel")}
  out["moment_spec"] = list(moments["layers/q_proj/kernel"].spec)
  return out


def _in_subprocess(function: str, devices: int) -> dict:
  """The JSON result of `tests.test_parallel.<function>()` run with `devices` fake CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", "import json, tests.test_parallel as t; "
       f"print('RESULT', json.dumps(t.{function}()))"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def sharded():
  return _in_subprocess("_sharded_run", 8)


@pytest.mark.slow
def test_smollm2_tensor_parallel_over_three_devices_equals_unsharded():
  out = _in_subprocess("_smollm2_run", 6)
  assert out["ar"] == out["unsharded"] and out["spec"] == out["unsharded"]
  assert all(len(tokens) == 16 for tokens in out["unsharded"])


def test_two_processes_decode_what_one_does(sharded):
  """A multi-process run (jax.distributed, gloo, a coordinator on 127.0.0.1): each process holds
  one device of a data=2 mesh and every process ends with the unsharded tokens."""
  for result in _in_two_processes("_process_run({port}, {process_id})"):
    assert result["devices"] == 2 and result["local"] == 1
    assert result["ar"] == sharded["ar"] and result["spec"] == sharded["spec"]


def test_two_processes_train_as_one_reading_their_own_rows(tmp_path):
  """Multi-process training: each process reads only its half of the batch (and of the teacher
  cache that process 0 built), the losses and the exported drafter are one process's, and
  process 0 alone writes the metrics."""
  from budgetdraft import drafters
  from tests import test_training

  results = _in_two_processes(f"_process_training({{port}}, {{process_id}}, {str(tmp_path)!r})")
  assert [r["rows"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  alone = _tiny_training(str(tmp_path / "alone"))
  for result in results:
    assert result["losses"] == pytest.approx(alone, rel=1e-5)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(6))
  config, params = test_training.make_tiny_teacher()
  trained = [drafters.load(f"trained:{tmp_path / name}", config, params)[1]
             for name in ("run", "alone")]
  assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(*map(jax.tree.leaves, trained))) < 1e-5


def _in_two_processes(call: str) -> list[dict]:
  """The JSON results of `tests.test_parallel.<call>` in two CPU processes of one run (a
  coordinator on a free 127.0.0.1 port; `call` formats {port} and {process_id})."""
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  runs = [subprocess.Popen(
      [sys.executable, "-c", "import json, tests.test_parallel as t; "
       f"print('RESULT', json.dumps(t.{call.format(port=port, process_id=i)}))"],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  results = []
  for run in runs:
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
    results.append(json.loads(line[len("RESULT "):]))
  return results


def test_sharded_decoding_equals_unsharded(sharded):
  assert sharded["devices"] == 8
  for mesh in ("data=4,model=2", "data=8", "model=2,data=4"):
    assert sharded[mesh]["ar"] == sharded["ar"], mesh
    assert sharded[mesh]["spec"] == sharded["spec"], mesh
  assert sharded["ar"] == sharded["spec"]  # greedy speculative = greedy AR


def test_pallas_kernels_run_on_local_shards_and_decode_as_unsharded(sharded):
  """attention_impl="pallas" on a mesh: the kernels run in shard_map on each device's rows and
  heads (GSPMD cannot split them), and greedy decoding gives the unsharded kernels' tokens."""
  pallas = sharded["pallas"]
  assert pallas["kernel in shard_map"]
  assert pallas["kernel queries"] == [1, 1, 2, 16]  # 4 rows over data=4, 4 heads over model=2
  assert pallas["data=4,model=2"] == pallas["unsharded"]
  assert pallas["unsharded"]["ar"] == pallas["unsharded"]["spec"]


def test_the_speedup_experiment_measures_the_same_decoding_on_a_mesh(sharded):
  """`speedup.speedup(..., mesh)` (experiments/speedup.py --config.mesh): greedy tokens equal AR's
  on the mesh too, and the rounds (tokens per verifier call) are the unsharded run's."""
  rows = sharded["speedup"]
  assert rows["data=4,model=2"][0] == rows["unsharded"][0] == "yes"
  assert rows["data=4,model=2"][1] == rows["unsharded"][1]


def test_arrays_are_laid_out_by_the_rules_table(sharded):
  assert sharded["params"] == {
      "layers/q_proj/kernel": [None, None, "model"], "layers/k_proj/bias": [None, "model"],
      "layers/down_proj/kernel": [None, "model", None], "embed/embedding": ["model", None],
      "layers/attn_norm/scale": [None, None], "final_norm/scale": [None]}
  assert sharded["cache"] == {"k": [None, "data", "model", None, None], "length": ["data"]}


def test_sharded_training_equals_unsharded_and_resumes_on_another_mesh():
  """FSDP over data (and tensor parallel over model): the losses and the trained drafter equal the
  unsharded run's up to float reduction order; a checkpoint written on data=8 resumes on
  data=4,model=2."""
  out = _in_subprocess("_training_run", 8)
  assert out["steps"] == list(range(6))
  assert out["sharded"] == pytest.approx(out["plain"], rel=1e-5)
  assert out["param_diff"] < 1e-5
  assert out["specs"] == {"layers/q_proj/kernel": [None, "data", "model"],
                          "layers/down_proj/kernel": [None, "model", "data"]}
  assert out["moment_spec"] == [None, "data", "model"]  # Adam's moments sharded like the params
  # On the Pallas kernels (in shard_map on the mesh) too.
  assert out["pallas"]["data=4,model=2"] == pytest.approx(out["pallas"]["unsharded"], rel=1e-5)


@pytest.mark.parametrize("spec, message", [
    ("data=2", "needs 2 devices; 1 are available"), ("pipe=1", "expected comma-separated"),
    ("data=0", "expected comma-separated"), ("data=x", "expected comma-separated")])
def test_bad_mesh_specs_are_refused(spec, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(spec)


@pytest.mark.parametrize("args", [("127.0.0.1:1234", 1, 0), ("", 2, 0), ("h:1", 2, 2)])
def test_bad_multiprocess_settings_are_refused(args):
  with pytest.raises(ValueError, match="give host:port"):
    parallel.initialize(*args)


def test_one_device_mesh_replicates_everything():
  mesh = parallel.make_mesh("")
  sharding = parallel.logical_sharding(mesh, ("batch", "heads"), (4, 8))
  assert sharding.spec == jax.sharding.PartitionSpec(None, None)
