"""Device meshes and the one table that says how every array is laid out on them.

Arrays are annotated with logical axis names (`PARAM_AXES`, `CACHE_AXES`: `batch`, `heads`,
`kv_heads`, `mlp`, `vocab`, ...) and `RULES` maps each name to a mesh axis (MaxText style):
batch -> data; heads, kv_heads, mlp, vocab -> model (tensor parallel); the rest replicated. Model
and decoding code carry no sharding literals: parameters, caches and decode states are placed with
these shardings and the jitted loops follow their inputs (GSPMD inserts the collectives), so one
program runs on one CPU or on a mesh of accelerators.

A dimension that the mesh axis does not divide is replicated instead (e.g. a batch of 1 on
data = 4): sharding changes where a computation runs, never what it computes.
"""

from collections.abc import Mapping
import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import numpy as np

from budgetdraft.models.kv_cache import FullKVCache, MaskedKVCache, SparseKVCache

RULES = (("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
         ("vocab", "model"), ("embed", None), ("layers", None), ("length", None),
         ("head_dim", None))
# Training (FSDP): parameters and optimizer state are also split along `embed` over `data`, and
# gathered where a step uses them; the batch stays on `data`.
FSDP_RULES = tuple((name, "data" if name == "embed" else axis) for name, axis in RULES)

PARAM_AXES = {
    "embed/embedding": ("vocab", "embed"),
    "layers/attn_norm/scale": ("layers", "embed"),
    "layers/mlp_norm/scale": ("layers", "embed"),
    "layers/q_proj/kernel": ("layers", "embed", "heads"),
    "layers/k_proj/kernel": ("layers", "embed", "kv_heads"),
    "layers/v_proj/kernel": ("layers", "embed", "kv_heads"),
    "layers/o_proj/kernel": ("layers", "heads", "embed"),
    "layers/q_proj/bias": ("layers", "heads"),
    "layers/k_proj/bias": ("layers", "kv_heads"),
    "layers/v_proj/bias": ("layers", "kv_heads"),
    "layers/gate_proj/kernel": ("layers", "embed", "mlp"),
    "layers/up_proj/kernel": ("layers", "embed", "mlp"),
    "layers/down_proj/kernel": ("layers", "mlp", "embed"),
    "final_norm/scale": ("embed",),
    "lm_head/kernel": ("embed", "vocab"),
    "input_proj/kernel": (None, "embed"),   # an EAGLE-style drafter's [dim + F, dim] fusion
    "input_proj/bias": ("embed",),
    "draft_head/kernel": ("embed", None),   # a reduced head: small, replicated
    "draft_head/ids": (None,),
    # The CPU kernels' packed decoding layout (`ModelConfig.packed_weights`): panels [P, in, 64]
    # mix heads within a panel, so they stay whole (under a mesh the kernels do not run anyway).
    "layers/qkv_proj/panels": ("layers", None, "embed", None),
    "layers/qkv_proj/bias": ("layers", None),
    "layers/o_proj/panels": ("layers", None, None, None),
    "layers/gate_up_proj/panels": ("layers", None, "embed", None),
    "layers/down_proj/panels": ("layers", None, None, None),
    "head/panels": (None, "embed", None),
}

KV = ("layers", "batch", "kv_heads", "length", "head_dim")
CACHE_AXES = {
    FullKVCache: {"k": KV, "v": KV, "length": ("batch",), "skipped": ("batch",)},
    SparseKVCache: {"k": KV, "v": KV, "positions": KV[:4], "length": ("batch",),
                    "ring_base": ("batch",)},
}


def make_mesh(spec: str = "", devices=None) -> jax.sharding.Mesh:
  """A mesh with axes `data` and `model` from "data=4,model=2" ("" = every device on data).

  Axis sizes must multiply to the device count; an axis left out has size 1.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = {"data": len(devices), "model": 1} if not spec.strip() else {"data": 1, "model": 1}
  if spec.strip():
    for part in spec.split(","):
      name, _, value = part.partition("=")
      name = name.strip()
      if name not in sizes or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"mesh {spec!r}: expected comma-separated data=<n>, model=<n> with n >= 1")
      sizes[name] = int(value)
  if sizes["data"] * sizes["model"] != len(devices):
    raise ValueError(f"mesh {spec!r} needs {sizes['data'] * sizes['model']} devices; "
                     f"{len(devices)} are available")
  return jax.make_mesh((sizes["data"], sizes["model"]), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def running_on(mesh):
  """The context in which Pallas kernels run on each device's shard of `mesh`
  (`models.attention.on_local_shards` reads the mesh and this module's rules from it); a no-op
  for None. The jnp path needs no context: GSPMD follows the inputs' shardings."""
  stack = contextlib.ExitStack()
  if mesh is not None:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(RULES))
  return stack


def mesh_from_flag(spec: str):
  """An entry point's `--config.mesh`: `make_mesh(spec)` when given or when several devices are
  present (then "" puts all on data), else None (one device: no mesh)."""
  return make_mesh(spec) if spec or jax.device_count() > 1 else None


def logical_sharding(mesh, axes: tuple, shape: tuple, rules=RULES) -> NamedSharding:
  """The sharding of an array of `shape` with logical `axes`, by `rules` (replicated where the
  mesh axis does not divide the dimension)."""
  rules = dict(rules)
  spec = []
  for name, size in zip(axes, shape):
    mesh_axis = None if name is None else rules[name]
    fits = mesh_axis is not None and size % mesh.shape[mesh_axis] == 0
    spec.append(mesh_axis if fits and mesh.shape[mesh_axis] > 1 else None)
  return NamedSharding(mesh, PartitionSpec(*spec))


def param_axes(name: str) -> tuple:
  """The logical axes of a parameter; an unrolled layer's own (layers/<l>/...) are those of the
  stacked parameter without the leading `layers` axis."""
  parts = name.split("/")
  if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
    return param_axes("/".join(parts[:1] + parts[2:]))[1:]
  if name not in PARAM_AXES:
    raise ValueError(f"parameter {name} has no entry in parallel.PARAM_AXES")
  return PARAM_AXES[name]


def param_shardings(mesh, params: Mapping, rules=RULES):
  """NamedShardings for a params tree (`Transformer`'s), by `param_axes` and `rules`."""
  def sharding(path, leaf):
    return logical_sharding(mesh, param_axes("/".join(key.key for key in path)), leaf.shape, rules)
  return jax.tree_util.tree_map_with_path(sharding, params)


def cache_shardings(mesh, cache):
  """NamedShardings for a KV cache, by `CACHE_AXES`."""
  if isinstance(cache, MaskedKVCache):
    return cache.replace(cache=cache_shardings(mesh, cache.cache),
                         keep=logical_sharding(mesh, KV[:4], cache.keep.shape),
                         ring_base=logical_sharding(mesh, ("batch",), cache.ring_base.shape))
  def sharding(names, array):  # a per-layer array of a layered cache drops the `layers` axis
    return logical_sharding(mesh, names[-array.ndim:], array.shape)
  return cache.replace(**{field: jax.tree.map(functools.partial(sharding, names),
                                              getattr(cache, field))
                          for field, names in CACHE_AXES[type(cache)].items()})


def state_shardings(mesh, state, batch_size: int):
  """NamedShardings for a decode state (AR or speculative): caches by their rules, every other
  array with a leading batch dimension along `batch`, the rest (step, rng) replicated."""
  is_cache = lambda leaf: isinstance(leaf, (FullKVCache, SparseKVCache, MaskedKVCache))

  def sharding(leaf):
    if is_cache(leaf):
      return cache_shardings(mesh, leaf)
    shape = getattr(leaf, "shape", ())
    if shape and shape[0] == batch_size:
      return batch_sharding(mesh, shape)
    return replicated(mesh)
  return jax.tree.map(sharding, state, is_leaf=is_cache)


def batch_sharding(mesh, shape: tuple) -> NamedSharding:
  """A [B, ...] input (prompts, lengths) split along `batch`."""
  return logical_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def place_params(mesh, params, rules=RULES):
  """A params tree on `mesh` by `rules` (tensor-parallel over `model`); unchanged when mesh is
  None. Every jitted function given these params then runs on the mesh."""
  if mesh is None:
    return params
  if jax.process_count() > 1:  # every process holds the same copy: each puts its own shards
    params = jax.tree.map(np.asarray, params)
  return jax.device_put(params, param_shardings(mesh, params, rules))


def place_checkpoint(mesh, checkpoint):
  """A loaded model (`checkpoint_io.Checkpoint`) with its params on `mesh`."""
  return (checkpoint if mesh is None else
          dataclasses.replace(checkpoint, params=place_params(mesh, checkpoint.params)))


def place_drafter(mesh, drafter: tuple) -> tuple:
  """A drafter's (config, params) (`drafters.load`) with its params on `mesh`."""
  config, params = drafter
  return config, place_params(mesh, params)


def place(mesh, params_trees: tuple, prompt, lengths):
  """(params trees, prompt, lengths) on `mesh` by the rules; unchanged when mesh is None."""
  if mesh is None:
    return params_trees, prompt, lengths
  params_trees = tuple(place_params(mesh, p) for p in params_trees)
  prompt, lengths = (jax.device_put(x, batch_sharding(mesh, x.shape)) for x in (prompt, lengths))
  return params_trees, prompt, lengths


def process_rows(mesh, batch_size: int) -> np.ndarray:
  """The rows of a [batch_size, ...] batch that this process's devices hold (all rows with one
  process, or where `data` does not divide the batch): the only rows it needs to read."""
  shards = batch_sharding(mesh, (batch_size,)).addressable_devices_indices_map((batch_size,))
  rows = {row for (index,) in shards.values() for row in range(batch_size)[index]}
  return np.array(sorted(rows))


def from_process_rows(mesh, local, batch_size: int) -> jax.Array:
  """The global [batch_size, ...] array (split along `batch`) of which this process read the
  rows `process_rows(mesh, batch_size)`."""
  local = np.asarray(local)
  shape = (batch_size,) + local.shape[1:]
  return jax.make_array_from_process_local_data(batch_sharding(mesh, shape), local, shape)


def is_writer() -> bool:
  """Whether this process writes logs, metrics, results and exports (process 0 of a run)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here for the others (e.g. for process 0's files); one process: no-op."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def place_state(mesh, state, batch_size: int):
  """A decode state on `mesh` by the rules (a no-op move where XLA already laid it out so)."""
  return state if mesh is None else jax.device_put(state,
                                                   state_shardings(mesh, state, batch_size))


def initialize(coordinator: str = "", num_processes: int = 1, process_id: int = 0) -> None:
  """Joins a multi-process run, so that `jax.devices()` spans every process's devices.

  One process (the default): nothing to do. On a TPU pod or a SLURM / Open MPI GPU cluster, call it
  with coordinator="auto" and jax reads the topology from the environment; elsewhere (e.g. several
  CPU processes on one host) give the coordinator's host:port, the process count and this
  process's id. CPU processes exchange data through gloo.
  """
  if coordinator == "" and num_processes == 1:
    return
  if coordinator == "auto":
    jax.distributed.initialize()
    return
  if not coordinator or num_processes < 2 or not 0 <= process_id < num_processes:
    raise ValueError(f"coordinator={coordinator!r}, num_processes={num_processes}, process_id="
                     f"{process_id}: give host:port, >= 2 processes and an id in [0, processes)")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)


def to_host(array) -> np.ndarray:
  """A (possibly multi-process) array as one NumPy array on every process."""
  if getattr(array, "is_fully_addressable", True):
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
