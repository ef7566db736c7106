"""Timing: compiled-only wall times and the memory-bandwidth floor."""

import resource
import time

import jax
import jax.numpy as jnp


def compiled(fn, *args, **static):
  """Ahead-of-time compiled jitted `fn` for these arguments: compile time stays out of timings."""
  return fn.lower(*args, **static).compile()


def timed(fn, *args, repeats: int = 1, **kwargs):
  """(result of the last call, median wall seconds) of an already compiled callable."""
  return timed_with_fresh_args(lambda *a: fn(*a, **kwargs), lambda: args, repeats)


def timed_with_fresh_args(fn, make_args, repeats: int = 3):
  """Like `timed` for a callable that donates its inputs: `make_args()` (untimed) builds each call's."""
  result, times = repeated(fn, make_args, repeats)
  return result, times[len(times) // 2]


def repeated(fn, make_args, repeats: int):
  """(result of the last call, sorted wall seconds of every call): median and spread for noisy
  machines. `make_args()` builds each call's arguments outside the timer."""
  times = []
  for _ in range(repeats):
    args = jax.block_until_ready(make_args())
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return result, sorted(times)


def read_bandwidth(num_bytes: int = 1024 * 2**20, repeats: int = 5) -> float:
  """Measured device read bandwidth (bytes/s): the best of `repeats` max-reductions streaming
  `num_bytes` once.

  A decode step is a read stream (weights + KV); an elementwise copy would instead be dominated by
  first-touch page faults of its fresh output buffer on CPU and understate the bandwidth ~10x.
  """
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  reduce = compiled(jax.jit(jnp.max), x)
  reduce(x).block_until_ready()
  _, times = repeated(reduce, lambda: (x,), repeats)
  return num_bytes / times[0]  # the best read: other work on a shared machine only slows it


def matmul_peak(size: int = 1024, repeats: int = 5) -> float:
  """Measured float32 matmul throughput (FLOP/s): the best of `repeats` products of two square
  [size, size] matrices, the ceiling that a forward of many tokens could reach."""
  a = jnp.ones((size, size), jnp.float32)
  product = compiled(jax.jit(lambda a, b: a @ b), a, a)
  product(a, a).block_until_ready()
  _, times = repeated(product, lambda: (a, a), repeats)
  return 2 * size ** 3 / times[0]


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def peak_memory_gb() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
