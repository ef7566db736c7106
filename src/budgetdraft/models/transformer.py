"""Llama-family decoder in pure-functional Flax (linen).

`Transformer.__call__(tokens, positions, cache, chunk_mask)` runs any number of new tokens against a
cache (any `kv_cache.KVCache`): prefill and decode are the same function. Layers are stacked with
`nn.scan` (one compiled layer, params with a leading `layers` axis), and the cache travels in the
scan carry so that XLA updates it in place. Unrolled (`UnrolledLayers`, params layers/<l>/...):
a pruned model's layers, which differ in shape, and the decoding layout (`unroll`), whose
separate per-layer weights and cache arrays XLA reads in place where a scan copies each layer's
slice out of the stack. Applied with `mutable="intermediates"`, the
call also sows each cached key's attention mass (`key_scores`, [L, B, Hkv, S]), the input of the
KV selection policies; with `mutable="attention"`, every head's probabilities (`probs`,
[L, B, Hkv, G, T, S]), which speculative prefill aggregates its own way; otherwise no attention
probabilities are formed.

A drafter config may add an EAGLE-style feature input (`feature_dim`: `features` [B, T, F] are
the verifier's hidden states one position earlier, fused with the token embeddings) and a
reduced-vocabulary head (`draft_vocab`).

Params tree (kernels are [in, out], stacked layers lead with L):
  embed/embedding [V, dim]; layers/{attn_norm,mlp_norm}/scale [L, dim];
  layers/{q,k,v,o,gate,up,down}_proj/kernel [L, in, out] (+ q/k/v bias when attention_bias);
  final_norm/scale [dim]; lm_head/kernel [dim, V] when embeddings are untied;
  input_proj/{kernel [dim + F, dim], bias} when feature_dim; draft_head/{kernel [dim, Vd],
  ids [Vd] int32} when draft_vocab. Sown (when asked): intermediates/key_scores and
  attention/probs, each a one-tuple of the [L, ...] stack.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft import cpu_kernels
from budgetdraft.models import attention
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """[head_dim // 2] inverse frequencies, with Llama-3 scaling when configured."""
  exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** exponents)
  scaling = config.rope_scaling
  if scaling is not None:
    wavelength = 2 * np.pi / inv_freq
    low_wavelength = scaling.original_max_position / scaling.low_freq_factor
    high_wavelength = scaling.original_max_position / scaling.high_freq_factor
    smooth = (scaling.original_max_position / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    inv_freq = np.where(wavelength > low_wavelength, inv_freq / scaling.factor,
                        np.where(wavelength < high_wavelength, inv_freq, blended))
  return inv_freq.astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """Rotate-half (HF/NeoX) RoPE. x: [B, T, H, D]; positions: [B, T]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class SubsetHead(nn.Module):
  """Logits over `num_ids` token ids (`ids`, an int32 param), -inf for every other id: a cheap
  draft head whose law is zero outside the ids."""

  vocab_size: int
  num_ids: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, hidden):
    kernel = self.param("kernel", nn.initializers.normal(0.02), (hidden.shape[-1], self.num_ids),
                        self.param_dtype)
    ids = self.param("ids", lambda rng, shape: jnp.arange(shape[0], dtype=jnp.int32),
                     (self.num_ids,))
    scores = jnp.dot(hidden.astype(self.dtype), kernel.astype(self.dtype)).astype(jnp.float32)
    logits = jnp.full(hidden.shape[:-1] + (self.vocab_size,), -jnp.inf, jnp.float32)
    return logits.at[..., ids].set(scores)


class PanelDense(nn.Module):
  """A dense layer whose kernel is packed in panels (`cpu_kernels.pack_panels`: [ceil(features /
  64), in, 64]), the decoding layout's form for the CPU kernels (`ModelConfig.packed_weights`);
  XLA's einsum over the panels where the kernels do not run (under a mesh)."""

  features: int
  use_bias: bool
  attention_impl: str

  @nn.compact
  def __call__(self, x):
    shape = (-(-self.features // cpu_kernels.PANEL), x.shape[-1], cpu_kernels.PANEL)
    panels = self.param("panels", nn.initializers.zeros, shape, jnp.float32)
    matmul = (cpu_kernels.panel_matmul if attention.uses_cpu_kernels(self.attention_impl)
              else cpu_kernels.panel_matmul_reference)
    y = matmul(x, panels, self.features)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y.astype(x.dtype)


def _pad_heads(x, num_heads: int):
  """x [B, T, h, D] with zero heads appended up to num_heads (a pruned layer's missing heads)."""
  return jnp.pad(x, ((0, 0), (0, 0), (0, num_heads - x.shape[2]), (0, 0)))


class DecoderLayer(nn.Module):
  """Pre-norm attention + SwiGLU block, with the whole stacked cache in its carry.

  Scanned (`index` None, every layer full width) or unrolled (`index` = its layer, whose widths
  `config.kv_heads_of` / `mlp_dim_of` give). Its output is what the caller sows: `key_scores`
  [B, Hkv, S] when "intermediates" is mutable, `probs` [B, Hkv, G, T, S] when "attention" is.
  """

  config: ModelConfig
  index: int | None = None

  @nn.compact
  def __call__(self, carry, layer, positions, chunk_mask):
    x, cache = carry
    c = self.config
    dense = lambda features, name, bias=False: nn.Dense(
        features, use_bias=bias, dtype=c.dtype, param_dtype=c.weight_dtype, name=name)
    packed = lambda features, name, bias=False: PanelDense(features, bias, c.attention_impl,
                                                           name=name)
    norm = lambda name: RMSNorm(c.norm_eps, c.dtype, c.weight_dtype, name=name)
    batch, num_new, _ = x.shape
    inv_freq = rope_inverse_frequencies(c)
    kv_heads = c.num_kv_heads if self.index is None else c.kv_heads_of(self.index)
    heads = kv_heads * (c.num_heads // c.num_kv_heads)
    mlp_dim = c.mlp_dim if self.index is None else c.mlp_dim_of(self.index)

    h = norm("attn_norm")(x)
    if c.packed_weights:  # one matmul for q, k and v (every layer full width here)
      q, k, v = jnp.split(packed(heads * c.head_dim + 2 * kv_heads * c.head_dim, "qkv_proj",
                                 c.attention_bias)(h),
                          [heads * c.head_dim, (heads + kv_heads) * c.head_dim], axis=-1)
    elif kv_heads:
      q = dense(heads * c.head_dim, "q_proj", c.attention_bias)(h)
      k = dense(kv_heads * c.head_dim, "k_proj", c.attention_bias)(h)
      v = dense(kv_heads * c.head_dim, "v_proj", c.attention_bias)(h)
    if kv_heads:
      q = apply_rope(q.reshape(batch, num_new, heads, c.head_dim), positions, inv_freq)
      k = apply_rope(k.reshape(batch, num_new, kv_heads, c.head_dim), positions, inv_freq)
      v = v.reshape(batch, num_new, kv_heads, c.head_dim)
    else:  # every head pruned: the layer still fills its cache slot (zeros) and sows its scores
      q = k = v = jnp.zeros((batch, num_new, 0, c.head_dim), c.dtype)
    if kv_heads < c.num_kv_heads:  # zero heads up to the cache's width; their output is dropped
      q, k, v = _pad_heads(q, c.num_heads), _pad_heads(k, c.num_kv_heads), _pad_heads(
          v, c.num_kv_heads)

    cache = cache.write(layer, k, v, positions)
    sown = {}
    if self.is_mutable_collection("intermediates") or self.is_mutable_collection("attention"):
      attended, probs = cache.attend_with_probs(layer, q, chunk_mask)
      if self.is_mutable_collection("intermediates"):
        # The attention mass each key gets from the group's heads and the new queries.
        sown["key_scores"] = probs.sum(axis=(2, 3))
      if self.is_mutable_collection("attention"):
        sown["probs"] = probs  # for a few queries only
    else:
      attended = cache.attend(layer, q, chunk_mask)
    linear = packed if c.packed_weights else dense
    if kv_heads:
      x = x + linear(c.dim, "o_proj")(attended[:, :, :heads].reshape(batch, num_new, -1))

    if mlp_dim:
      h = norm("mlp_norm")(x)
      if c.packed_weights:
        gate, up = jnp.split(packed(2 * mlp_dim, "gate_up_proj")(h), 2, axis=-1)
      else:
        gate, up = dense(mlp_dim, "gate_proj")(h), dense(mlp_dim, "up_proj")(h)
      x = x + linear(c.dim, "down_proj")(nn.silu(gate) * up)
    return (x, cache), sown


class UnrolledLayers(nn.Module):
  """The layers one after the other (`config.unrolled`), each with its own params (layers/<l>/...)
  and its own static index into the cache; same call and output as the scanned stack."""

  config: ModelConfig

  @nn.compact
  def __call__(self, carry, layers, positions, chunk_mask):
    del layers  # the index of each layer is static here
    outputs = []
    for index in range(self.config.num_layers):
      carry, sown = DecoderLayer(self.config, index, name=str(index))(carry, index, positions,
                                                                      chunk_mask)
      outputs.append(sown)
    return carry, jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *outputs)


class Transformer(nn.Module):
  config: ModelConfig

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.dim, dtype=c.dtype, param_dtype=c.weight_dtype,
                          embedding_init=nn.initializers.normal(0.02))
    if c.unrolled:
      self.layers = UnrolledLayers(c)
    else:
      self.layers = nn.scan(
          DecoderLayer, variable_axes={"params": 0, "intermediates": 0, "attention": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast), length=c.num_layers)(c)
    self.final_norm = RMSNorm(c.norm_eps, c.dtype, c.weight_dtype)
    if c.feature_dim:
      self.input_proj = nn.Dense(c.dim, dtype=c.dtype, param_dtype=c.weight_dtype)
    if c.draft_vocab:
      self.draft_head = SubsetHead(c.vocab_size, c.draft_vocab, c.dtype, c.weight_dtype)
    elif c.packed_weights:
      self.head = PanelDense(c.vocab_size, False, c.attention_impl)
    elif not c.tie_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype,
                              param_dtype=c.weight_dtype)

  def __call__(self, tokens, positions, cache, chunk_mask=None, features=None):
    """Runs new tokens against the cache.

    tokens, positions: [B, T] (positions drive RoPE; the cache's length is the chunk start);
    chunk_mask: [B, T, T] visibility among the new tokens (a tree mask for multi-path
    verification; None = causal, which lets the caches use their Pallas kernels); features:
    [B, T, feature_dim], required iff the config has a feature input. Returns (hidden [B, T, dim]
    after the final norm, the cache holding the new keys with length + T).
    """
    x = self.embed(tokens)
    if self.config.feature_dim:
      if features is None:
        raise ValueError("this model fuses the verifier's hidden states with its tokens: pass "
                         "features [B, T, feature_dim]")
      x = self.input_proj(jnp.concatenate([x, features.astype(x.dtype)], axis=-1))
    (x, cache), sown = self.layers((x, cache), jnp.arange(self.config.num_layers), positions,
                                   chunk_mask)
    for collection, name in (("intermediates", "key_scores"), ("attention", "probs")):
      if name in sown:
        self.sow(collection, name, sown[name])  # [L, ...]
    return self.final_norm(x), cache.advance(tokens.shape[1])

  def logits(self, hidden):
    """float32 logits [..., V] of final hidden states."""
    if self.config.draft_vocab:
      return self.draft_head(hidden)
    if self.config.packed_weights:
      return self.head(hidden).astype(jnp.float32)
    if self.config.tie_embeddings:
      return self.embed.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)


def packs_weights(config: ModelConfig) -> bool:
  """Whether `unroll` packs this model's weights for the CPU kernels: float32 weights and compute
  where the kernels run (`attention.uses_cpu_kernels`)."""
  return (config.param_dtype == config.compute_dtype == "float32"
          and attention.uses_cpu_kernels(config.attention_impl))


def _packed_layer(layer: dict) -> dict:
  """One layer's params in the packed form (`ModelConfig.packed_weights`)."""
  attention_names = ("q_proj", "k_proj", "v_proj")
  fused = lambda names, field: jnp.concatenate([layer[n][field] for n in names], axis=-1)
  packed = {name: layer[name] for name in ("attn_norm", "mlp_norm")}
  packed["qkv_proj"] = {"panels": cpu_kernels.pack_panels(fused(attention_names, "kernel"))}
  if "bias" in layer["q_proj"]:
    packed["qkv_proj"]["bias"] = fused(attention_names, "bias")
  packed["gate_up_proj"] = {"panels": cpu_kernels.pack_panels(fused(("gate_proj", "up_proj"),
                                                                    "kernel"))}
  for name in ("o_proj", "down_proj"):
    packed[name] = {"panels": cpu_kernels.pack_panels(layer[name]["kernel"])}
  return packed


def unroll(config: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
  """The same model in the decoding layout: layers run one by one, each with weights of its own
  (layers/<l>/...) and, through the config, a per-layer cache (`FullKVCache.init`); on a CPU
  where the C++ kernels run (`packs_weights`), with its weights packed for them.

  On XLA:CPU a decode step over the scanned stack copies every layer's weights and keys out of
  their stacked arrays; these separate arrays are read in place, and the packed panels stream
  once per step whatever the number of new tokens (`results/bench_decode.md` measures the
  layouts). Training and the drafters keep the stack; an unrolled model is returned as is.
  """
  if config.unrolled:
    return config, params
  layers = {str(index): jax.tree.map(lambda x, index=index: x[index], params["layers"])
            for index in range(config.num_layers)}
  if not packs_weights(config):
    return dataclasses.replace(config, unroll_layers=True), {**params, "layers": layers}
  packed = {**{key: value for key, value in params.items() if key != "lm_head"},
            "layers": {index: _packed_layer(layer) for index, layer in layers.items()}}
  if not config.draft_vocab:  # a drafter's reduced head (`SubsetHead`) stays as it is
    head = (params["embed"]["embedding"].T if config.tie_embeddings
            else params["lm_head"]["kernel"])
    packed["head"] = {"panels": cpu_kernels.pack_panels(head)}
  return dataclasses.replace(config, unroll_layers=True, packed_weights=True), packed


def init_params(config: ModelConfig, rng) -> dict:
  """Random params (tests and drafters trained from scratch)."""
  model = Transformer(config)
  tokens = jnp.zeros((1, 1), jnp.int32)
  cache = FullKVCache.init(config, 1, config.attention_block)
  features = jnp.zeros((1, 1, config.feature_dim)) if config.feature_dim else None
  # Trace the head too, so an untied lm_head is created.
  forward = lambda module, *args: module.logits(module(*args, features=features)[0])
  return model.init(rng, tokens, tokens, cache, method=forward)["params"]
