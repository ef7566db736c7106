"""The structured units a pruned verifier keeps or drops, and the smaller model they leave.

Three kinds of unit, in one flat keep vector (`Layout`):
  heads     a KV head with its whole group of num_heads // num_kv_heads query heads (grouped-query
            attention: a KV head never loses part of its group), [L * Hkv];
  channels  `channel_group` consecutive MLP channels, [L * (mlp_dim // channel_group)];
  layers    a whole block, the coarse unit, [L].
A unit is present iff it is kept and its layer is kept. `masked_params` switches units off in the
verifier's own params (a zeroed o_proj / down_proj row removes exactly that unit's contribution),
which is how candidate sub-models are evaluated without building them; `prune` builds the really
smaller model: per-layer widths in its config, weights sliced, empty layers removed.
Parameter counts are of the decoder blocks only: the embedding and head stay whole and shared.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from budgetdraft.models.config import ModelConfig

KINDS = ("heads", "channels", "layers")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each kind of unit sits in a flat keep vector of a (scanned, full-width) verifier."""

  config: ModelConfig
  channel_group: int

  def __post_init__(self):
    c = self.config
    if c.per_layer_widths:
      raise ValueError("prune a full-width model: this one is already pruned")
    if self.channel_group < 1 or c.mlp_dim % self.channel_group:
      raise ValueError(f"channel_group={self.channel_group} must divide mlp_dim={c.mlp_dim}")

  @property
  def group_size(self) -> int:
    """Query heads per KV head."""
    return self.config.num_heads // self.config.num_kv_heads

  @property
  def counts(self) -> dict[str, int]:
    c = self.config
    return {"heads": c.num_layers * c.num_kv_heads,
            "channels": c.num_layers * (c.mlp_dim // self.channel_group),
            "layers": c.num_layers}

  @property
  def size(self) -> int:
    return sum(self.counts.values())

  def slices(self) -> dict[str, slice]:
    start, out = 0, {}
    for kind in KINDS:
      out[kind] = slice(start, start + self.counts[kind])
      start += self.counts[kind]
    return out

  def kinds(self) -> np.ndarray:
    """[N] index into KINDS of every unit."""
    return np.repeat(np.arange(len(KINDS)), [self.counts[k] for k in KINDS])

  def split(self, keep):
    """(heads [L, Hkv], channels [L, mlp_dim // channel_group], layers [L]) of a keep vector."""
    c, s = self.config, self.slices()
    return (keep[s["heads"]].reshape(c.num_layers, c.num_kv_heads),
            keep[s["channels"]].reshape(c.num_layers, -1), keep[s["layers"]])

  def unit_of_layer(self) -> np.ndarray:
    """[N] the layer of every unit."""
    c = self.config
    return np.concatenate([np.repeat(np.arange(c.num_layers), c.num_kv_heads),
                           np.repeat(np.arange(c.num_layers), c.mlp_dim // self.channel_group),
                           np.arange(c.num_layers)])

  def unit_params(self) -> np.ndarray:
    """[N] parameters each unit holds on its own (a layer: its two norms)."""
    c = self.config
    per_kind = {"heads": c.kv_head_params(), "channels": 3 * c.dim * self.channel_group,
                "layers": 2 * c.dim}
    return np.concatenate([np.full(self.counts[k], per_kind[k], np.int64) for k in KINDS])

  def present(self, keep) -> np.ndarray:
    """[N] bool: kept, and in a kept layer."""
    keep = np.asarray(keep, bool)
    return keep & keep[self.slices()["layers"]][self.unit_of_layer()]

  def removable_params(self, keep) -> np.ndarray:
    """[N] parameters that removing each present unit would remove (a layer: all it still holds)."""
    present = self.present(keep)
    own = self.unit_params() * present
    per_layer = np.bincount(self.unit_of_layer(), weights=own, minlength=self.config.num_layers)
    layers = self.kinds() == KINDS.index("layers")
    return np.where(layers, per_layer[self.unit_of_layer()] * present, own)

  def kept_params(self, keep) -> int:
    return int(self.unit_params()[self.present(keep)].sum())

  def total_params(self) -> int:
    return int(self.unit_params().sum())

  def kept_fraction(self, keep) -> float:
    return self.kept_params(keep) / self.total_params()


def masked_params(layout: Layout, params: dict, keep) -> dict:
  """The verifier's params with the units where keep [N] (float, 0/1) is 0 switched off: their
  o_proj / down_proj rows zeroed, so the model computes exactly the sub-model. jit-friendly."""
  c = layout.config
  heads, channels, layers = layout.split(jnp.asarray(keep, c.weight_dtype))
  head_rows = jnp.repeat(heads, layout.group_size * c.head_dim, axis=1) * layers[:, None]
  channel_rows = jnp.repeat(channels, layout.channel_group, axis=1) * layers[:, None]
  blocks = dict(params["layers"])
  blocks["o_proj"] = {**blocks["o_proj"],
                      "kernel": blocks["o_proj"]["kernel"] * head_rows[:, :, None]}
  blocks["down_proj"] = {**blocks["down_proj"],
                         "kernel": blocks["down_proj"]["kernel"] * channel_rows[:, :, None]}
  return {**params, "layers": blocks}


def _columns(kept_units, unit_width: int) -> np.ndarray:
  """Indices of the columns of the kept units, each unit_width wide."""
  return (np.flatnonzero(kept_units)[:, None] * unit_width + np.arange(unit_width)).reshape(-1)


def prune(layout: Layout, params: dict, keep) -> tuple[ModelConfig, dict]:
  """(config, params) of the smaller model that keeps the present units.

  Layers left with no head and no channel (or dropped as a unit) are removed; the others keep
  their heads and channels, in order. The config records each layer's widths (its layers are
  unrolled); nothing pruned gives the same function as the verifier.
  """
  c = layout.config
  present = layout.present(keep)
  heads, channels, _ = layout.split(present)
  kept_layers = [l for l in range(c.num_layers) if heads[l].any() or channels[l].any()]
  if not kept_layers:
    raise ValueError("the keep vector removes every layer")
  blocks = params["layers"]
  head_width = layout.group_size * c.head_dim
  new_blocks = {}
  for new_index, l in enumerate(kept_layers):
    q_cols = _columns(heads[l], head_width)
    kv_cols = _columns(heads[l], c.head_dim)
    mlp_cols = _columns(channels[l], layout.channel_group)
    take = lambda module, cols, axis: {
        name: np.take(np.asarray(value[l]), cols, axis=axis if name == "kernel" else 0)
        for name, value in blocks[module].items()}
    block = {"attn_norm": {"scale": np.asarray(blocks["attn_norm"]["scale"][l])}}
    if heads[l].any():  # a layer with no head (or no channel) has no projections there
      block.update(q_proj=take("q_proj", q_cols, 1), k_proj=take("k_proj", kv_cols, 1),
                   v_proj=take("v_proj", kv_cols, 1), o_proj=take("o_proj", q_cols, 0))
    if channels[l].any():
      block.update(mlp_norm={"scale": np.asarray(blocks["mlp_norm"]["scale"][l])},
                   gate_proj=take("gate_proj", mlp_cols, 1), up_proj=take("up_proj", mlp_cols, 1),
                   down_proj=take("down_proj", mlp_cols, 0))
    new_blocks[str(new_index)] = block
  config = dataclasses.replace(
      c, num_layers=len(kept_layers),
      layer_kv_heads=tuple(int(heads[l].sum()) for l in kept_layers),
      layer_mlp_dims=tuple(int(channels[l].sum()) * layout.channel_group for l in kept_layers))
  new_params = {k: v for k, v in params.items() if k != "layers"}
  new_params["layers"] = {k: {m: {n: jnp.asarray(a) for n, a in leaves.items()}
                              for m, leaves in v.items()} for k, v in new_blocks.items()}
  return config, new_params
