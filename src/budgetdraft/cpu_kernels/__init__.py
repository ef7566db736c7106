"""CPU kernels for the decode step, built on first use and called through XLA's FFI.

XLA:CPU runs a decode step's few-row products far from the memory bandwidth that bounds them
(`results/bench_decode.md`): a verify step's weight matmuls and its attention over a 4K cache
each ran at 10-30% of it. Two C++ kernels (`kernels.cc`) stream every weight and key once:
- `panel_matmul`: x [..., K] @ W [K, N], with W packed once (`pack_panels`) into panels of 64
  columns [ceil(N / 64), K, 64], each panel one contiguous stream;
- `decode_attention`: a few queries per row against a position-ordered cache, with the chunk's
  own visibility (causal or a draft tree), split over key ranges so every thread shares a head.
Each has a pure-jnp `*_reference` with the same signature, which the tests hold it to.

The library is compiled with the machine's C++ compiler (`$CXX`, default g++, `-march=native`)
into a cache folder keyed by the source, the flags, the compiler, the CPU and the jax version
(`$BUDGETDRAFT_KERNEL_CACHE`, default ~/.cache/budgetdraft). Where it cannot be built, `available()`
is False (with one warning saying why) and the model keeps XLA's ops; `BUDGETDRAFT_CPU_KERNELS=0`
turns the kernels off. Standalone: nothing here imports budgetdraft.
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

PANEL = 64  # columns of a packed weight panel (kernels.cc: kPanel)
MAX_QUERIES = 16  # decode_attention serves chunks of up to this many new tokens

_SOURCE = pathlib.Path(__file__).with_name("kernels.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
_TARGETS = ("budgetdraft_panel_matmul", "budgetdraft_decode_attention")
_MASKED = -1e30


def _cpu_signature() -> str:
  """The CPU's model and feature flags: a library built with -march=native runs only there."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return ""
  wanted = [line for line in lines if line.startswith(("model name", "flags"))]
  return "\n".join(sorted(set(wanted)))


def _build(compiler: str, target: pathlib.Path) -> None:
  """Compiles kernels.cc into `target` (written under a temporary name, then renamed, so that
  concurrent builders never see half a file)."""
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    output = pathlib.Path(scratch) / target.name
    command = [compiler, *_FLAGS, "-w", "-I", jax.ffi.include_dir(), str(_SOURCE), "-o",
               str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[:2000]}")
    os.replace(output, target)


@functools.cache
def library_path() -> pathlib.Path:
  """The compiled library, built if the cache does not hold it. Raises RuntimeError (with the
  compiler's message) where it cannot be built."""
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(_FLAGS), version,
                                  _cpu_signature(), jax.__version__]).encode()).hexdigest()[:16]
  root = pathlib.Path(os.environ.get("BUDGETDRAFT_KERNEL_CACHE",
                                     pathlib.Path.home() / ".cache" / "budgetdraft"))
  target = root / "cpu_kernels" / f"kernels-{key}.so"
  if not target.exists():
    logging.info("building the CPU kernels into %s", target)
    _build(compiler, target)
  return target


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered with XLA (once per process)."""
  if os.environ.get("BUDGETDRAFT_CPU_KERNELS", "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(library_path()))
  except (OSError, RuntimeError) as error:
    logging.warning("CPU kernels unavailable, XLA's ops are used instead: %s", error)
    return False
  for name in _TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
  return True


def _require():
  if not available():
    raise RuntimeError("the CPU kernels are not available here (see the warning logged above, "
                       "or unset BUDGETDRAFT_CPU_KERNELS=0)")


def pack_panels(w):
  """W [K, N] -> panels [ceil(N / 64), K, 64] (zero columns pad the last panel)."""
  depth, features = w.shape
  w = jnp.pad(w, ((0, 0), (0, -features % PANEL)))
  return w.reshape(depth, -1, PANEL).transpose(1, 0, 2)


def panel_matmul_reference(x, panels, features: int):
  """x [..., K] @ W [K, features] from W's panels [P, K, 64], in float32."""
  y = jnp.einsum("...k,pkc->...pc", x.astype(jnp.float32), panels.astype(jnp.float32))
  return y.reshape(x.shape[:-1] + (-1,))[..., :features]


def panel_matmul(x, panels, features: int):
  """`panel_matmul_reference` on the kernel: float32 x [..., K] and panels [P, K, 64]."""
  _require()
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  call = jax.ffi.ffi_call(
      "budgetdraft_panel_matmul",
      jax.ShapeDtypeStruct((rows.shape[0], panels.shape[0] * PANEL), jnp.float32),
      vmap_method="sequential")
  y = call(rows, panels.astype(jnp.float32))
  return y[:, :features].reshape(x.shape[:-1] + (features,))


def decode_attention_reference(q, k, v, filled, chunk_mask):
  """q: [B, T, H, D]; k, v: [B, Hkv, S, D] (slot = position order); filled: [B] slots before the
  chunk; chunk_mask: [B, T, T] bool. Key j is visible to query t iff j < filled, or j - filled
  = t' < T with chunk_mask[t, t']. Returns [B, T, H, D] float32 (zeros for a query that sees
  no key)."""
  batch, num_new, num_heads, head_dim = q.shape
  num_kv_heads, capacity = k.shape[1], k.shape[2]
  grouped = q.reshape(batch, num_new, num_kv_heads, num_heads // num_kv_heads,
                      head_dim).astype(jnp.float32) * head_dim ** -0.5
  scores = jnp.einsum("btkgd,bksd->bkgts", grouped, k.astype(jnp.float32))
  offset = jnp.arange(capacity)[None, :] - filled[:, None]  # [B, S]
  in_chunk = jnp.take_along_axis(
      chunk_mask, jnp.broadcast_to(jnp.clip(offset, 0, num_new - 1)[:, None, :],
                                   (batch, num_new, capacity)), axis=-1)  # [B, T, S]
  visible = (offset < 0)[:, None, :] | ((offset < num_new)[:, None, :] & in_chunk)
  visible = visible[:, None, None]  # [B, 1, 1, T, S]
  scores = jnp.where(visible, scores, _MASKED)
  probs = jnp.where(visible, jax.nn.softmax(scores, axis=-1), 0.0)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(jnp.float32))
  return out.reshape(batch, num_new, num_heads, head_dim)


def decode_attention(q, k, v, filled, chunk_mask):
  """`decode_attention_reference` on the kernel (float32 inputs, head_dim a multiple of 64,
  capacity a multiple of 16)."""
  _require()
  call = jax.ffi.ffi_call("budgetdraft_decode_attention",
                          jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
  return call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
              filled.astype(jnp.int32), chunk_mask.astype(bool))


def supports_attention(head_dim: int, capacity: int, num_new: int) -> bool:
  """Whether `decode_attention` takes these shapes."""
  return head_dim % PANEL == 0 and capacity % 16 == 0 and num_new <= MAX_QUERIES
