"""Backend choice shared by the kernels.

Each kernel has two layouts of one algorithm:
- "mosaic" (TPU): the KV blocks are a grid axis, fetched by index maps (a block table arrives by
  scalar prefetch), so Mosaic pipelines the DMA of the next block behind the current one, and the
  online softmax is carried across that axis in VMEM scratch;
- "triton" (GPU): one program per (batch, KV head[, query block]) loops over the KV blocks,
  loading each at a dynamic offset, as JAX's GPU decode attention does.
On CPU, Pallas only interprets: "triton" in the generic interpreter (the default there) or
"mosaic" in the TPU interpreter (`pltpu.InterpretParams`, which simulates TPU memory spaces and
DMAs), so both layouts are tested on any machine.
"""

import jax

VARIANTS = ("mosaic", "triton")


def interpret_mode() -> bool:
  """Pallas runs compiled on TPU and GPU; on CPU only the interpreter exists."""
  return jax.default_backend() not in ("tpu", "gpu")


def choose(variant: str | None, interpret: bool | None) -> tuple[str, bool]:
  """(variant, interpret) for a call: None picks this backend's (mosaic on TPU, triton
  elsewhere) and interprets off TPU / GPU. A compiled mosaic kernel needs a TPU, a compiled triton
  one a GPU."""
  backend = jax.default_backend()
  if variant is None:
    variant = "mosaic" if backend == "tpu" else "triton"
  if variant not in VARIANTS:
    raise ValueError(f"kernel variant {variant!r}; valid: {VARIANTS}")
  if interpret is None:
    interpret = interpret_mode()
  native = {"mosaic": "tpu", "triton": "gpu"}[variant]
  if not interpret and backend != native:
    raise ValueError(f"the {variant} kernels compile only on {native}, not {backend}; pass "
                     "interpret=True to run them in the interpreter")
  return variant, interpret
