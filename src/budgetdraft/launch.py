"""What every entry point does first: join the processes of a run and build its mesh.

One process needs no flags (several local devices: every one on `data`, or `--config.mesh`).
A TPU pod, or a SLURM / Open MPI GPU cluster, runs the same command on every worker with
`--distributed=auto` (jax reads the topology from the environment). Elsewhere, e.g. several CPU
processes on one host, name a coordinator and give each process its id:

  python experiments/speedup.py --distributed=127.0.0.1:8476 --num_processes=2 --process_id=0

Every process computes; process 0 alone logs progress and writes (`parallel.is_writer`).
"""

from absl import flags, logging
import jax

from budgetdraft import parallel
from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import ATTENTION_IMPLS

_DISTRIBUTED = flags.DEFINE_string(
    "distributed", "", "Join a multi-process run: '' (one process), 'auto' (TPU pod, SLURM, Open "
    "MPI: from the environment) or the coordinator's host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1,
                                      "Processes in the run (with --distributed=host:port).")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0,
                                   "This process's id in [0, num_processes) (with host:port).")
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl", "auto", ATTENTION_IMPLS, "Attention of every model the run loads: 'auto' "
    "(the Pallas kernels on TPU and GPU, the C++ kernels on CPU), 'jnp' (XLA's ops) or 'pallas'.")


def mesh(spec: str) -> jax.sharding.Mesh | None:
  """Joins the run named by the flags, then the mesh of `--config.mesh` (`spec`; None for one
  device). Call it before anything touches a device: jax fixes its devices at first use."""
  parallel.initialize(_DISTRIBUTED.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not parallel.is_writer():  # progress is logged once, by process 0; warnings by every one
    logging.set_verbosity(logging.WARNING)
  built = parallel.mesh_from_flag(spec)
  parallel.running_on(built).__enter__()  # for the whole run: Pallas kernels on local shards
  if built is not None:
    logging.info("process %d of %d, mesh %s over %d devices", jax.process_index(),
                 jax.process_count(), dict(built.shape), built.size)
  return built


def checkpoint(path: str, contexts=()) -> checkpoint_io.Checkpoint:
  """The model at `path` ("" = the default verifier) with this run's `--attention_impl`; drafters
  built from it inherit the choice. Refused, before any work, if one of the run's `contexts`
  (prompt + generated positions) exceeds the model's positions."""
  loaded = checkpoint_io.load(path, attention_impl=_ATTENTION_IMPL.value)
  if contexts and max(contexts) > loaded.config.max_context:
    raise ValueError(f"context {max(contexts)} exceeds the verifier's context of "
                     f"{loaded.config.max_context} positions ({loaded.name}); pass "
                     "--config.checkpoint=<a longer-context model> or shorter --config.contexts")
  return loaded
