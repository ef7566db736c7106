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
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

VARIANTS = ("mosaic", "triton")

# The triton layout asks for the Triton lowering by name: without compiler params, Pallas lowers a
# GPU kernel with Mosaic GPU, which stages every block in shared memory, and a block of a whole KV
# row (up to 16K x head_dim) does not fit there.
TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)


def pad_to_power_of_two(x, axis: int, fill):
  """x padded with `fill` along `axis` to a power-of-two length: Triton's arrays need one, and a
  query-row axis (GQA group x queries, e.g. 3 x 5) rarely is one. The fill makes padded query
  rows see no key, so they return zeros that the caller slices off."""
  extra = pl.next_power_of_2(x.shape[axis]) - x.shape[axis]
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad, constant_values=fill)


def platform() -> str:
  """The platform the kernels are built for: JAX's default backend ("cpu", "gpu" or "tpu"). The
  one place that asks, so a test can build for an accelerator it does not have (and lower for it,
  `jax.jit(...).trace(...).lower(lowering_platforms=...)`)."""
  return jax.default_backend()


def compiled() -> bool:
  """Pallas runs compiled on TPU and GPU; on CPU only the interpreter exists."""
  return platform() in ("tpu", "gpu")


def choose(variant: str | None, interpret: bool | None) -> tuple[str, bool]:
  """(variant, interpret) for a call: None picks this platform's (mosaic on TPU, triton
  elsewhere) and interprets off TPU / GPU. A compiled mosaic kernel needs a TPU, a compiled triton
  one a GPU. Resolved before the kernels' jit, so its cache keys on the answer."""
  backend = platform()
  if variant is None:
    variant = "mosaic" if backend == "tpu" else "triton"
  if variant not in VARIANTS:
    raise ValueError(f"kernel variant {variant!r}; valid: {VARIANTS}")
  if interpret is None:
    interpret = not compiled()
  native = {"mosaic": "tpu", "triton": "gpu"}[variant]
  if not interpret and backend != native:
    raise ValueError(f"the {variant} kernels compile only on {native}, not {backend}; pass "
                     "interpret=True to run them in the interpreter")
  return variant, interpret
