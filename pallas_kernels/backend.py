"""Backend choice shared by the kernels."""

import jax


def interpret_mode() -> bool:
  """Pallas runs compiled on TPU and GPU; on CPU only the interpreter exists."""
  return jax.default_backend() not in ("tpu", "gpu")
