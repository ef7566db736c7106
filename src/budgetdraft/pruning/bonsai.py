"""Bonsai (Dery, Kolawole et al. 2024): structured pruning with forward passes only.

Each iteration removes `step` of the verifier's decoder parameters:
  1. prior: a cheap forward pass gives every present head and channel group an activation-based
     magnitude relative to its layer (`activation_prior`); each layer's prior is the loss its
     removal alone causes (`layer_prior`, one forward pass per layer);
  2. candidates: per kind, the units of lowest prior (twice the share to remove; the rest stay);
  3. perturbation: `masks_per_step` sub-models, each dropping a random half of the candidates
     (drawn with probability rising as the prior falls) and then its complement, are scored by
     their loss on calibration text, using the verifier's own weights with units switched off;
  4. estimate: a linear regression of -loss on the keep masks, shrunk toward the prior, gives
     each candidate's contribution;
  5. prune: candidates in order of contribution per parameter until `step` of the parameters are
     gone.
Nothing but inference runs: no gradient, no optimizer state. Where ours differs from the
published code (github.com/ldery/Bonsai): the regression is closed-form ridge on the mean NLL
(theirs: an L1-regularized fit by SGD with a hyper-parameter search, on -perplexity); candidates
and sampling are pooled per kind across layers on priors normalized within each layer (theirs:
per module); whole layers are a third kind of unit, perturbed at `layer_rate` of the others' rate,
with a measured prior; the prior weighs each unit's mean activation magnitude by the norm of its
outgoing weights (Wanda-style; theirs: activations only).
"""

import dataclasses
import functools
import math
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.prefill import negative_log_likelihood
from budgetdraft.models.transformer import Transformer
from budgetdraft.pruning.units import KINDS, Layout, masked_params


@dataclasses.dataclass(frozen=True)
class BonsaiConfig:
  targets: tuple[float, ...] = (0.5, 0.3, 0.15)  # kept fractions of the decoder's parameters
  max_step: float = 0.05       # at most this share of the original parameters per iteration
  masks_per_step: int = 32     # sub-models scored per iteration (half are complements)
  layer_rate: float = 0.25     # whole layers are perturbed at this fraction of the units' rate
                               # (0: no layer units; a layer goes when its units all have)
  ridge: float = 1.0           # L2 penalty, relative to the mean diagonal of X^T X
  seed: int = 0

  def __post_init__(self):
    if not self.targets or any(not 0 < t < 1 for t in self.targets) or list(self.targets) != \
        sorted(self.targets, reverse=True):
      raise ValueError(f"targets={self.targets} must be kept fractions in (0, 1), decreasing")
    if not 0 < self.max_step < 1 or self.masks_per_step < 2 or self.masks_per_step % 2:
      raise ValueError(f"max_step={self.max_step} must be in (0, 1) and masks_per_step="
                       f"{self.masks_per_step} even and >= 2")


def schedule(targets, max_step: float) -> list[tuple[float, float | None]]:
  """(kept-fraction goal, the target it completes or None) of each iteration: every gap between
  targets in equal steps of at most max_step."""
  kept, out = 1.0, []
  for target in targets:
    steps = math.ceil((kept - target) / max_step - 1e-9)
    out += [(kept - (kept - target) * (i + 1) / steps, None) for i in range(steps - 1)]
    out.append((target, target))
    kept = target
  return out


def _captured(tree, name):
  return tree[name]["__call__"][0]


@functools.partial(jax.jit, static_argnames=("layout",))
def _activation_magnitudes(params, tokens, *, layout: Layout):
  """Mean |v| per KV head [L, Hkv] and mean |silu(gate) * up| per MLP channel [L, mlp_dim]."""
  c = layout.config
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  _, state = Transformer(c).apply(
      {"params": params}, tokens, positions, FullKVCache.init(c, batch, length),
      capture_intermediates=lambda module, method: module.name in ("v_proj", "gate_proj",
                                                                    "up_proj"),
      mutable=["intermediates"])
  layers = state["intermediates"]["layers"]
  v = _captured(layers, "v_proj").reshape(c.num_layers, batch, length, c.num_kv_heads, -1)
  gated = nn.silu(_captured(layers, "gate_proj")) * _captured(layers, "up_proj")
  return (jnp.linalg.norm(v.astype(jnp.float32), axis=-1).mean(axis=(1, 2)),
          jnp.abs(gated.astype(jnp.float32)).mean(axis=(1, 2)))


def activation_prior(layout: Layout, params: dict, tokens, keep) -> np.ndarray:
  """[N] prior usefulness of every head and channel group within its layer (layers get 0;
  absent units 0).

  A head: its mean value norm x the norm of its o_proj rows; a channel group: the sum over its
  channels of mean |activation| x the norm of the channel's down_proj row; each divided by the
  mean over the present units of its kind in its layer. Only comparisons inside a layer are
  meaningful: activations grow along the residual stream, and on SmolLM2 ranking globally removes
  the early layers' small but vital units (5% of channels: NLL 2.74 -> 7.3; per layer: 3.2).
  """
  c = layout.config
  present = layout.present(keep)
  current = masked_params(layout, params, np.asarray(keep, np.float32))
  head_act, channel_act = map(np.asarray, _activation_magnitudes(current, tokens, layout=layout))
  o_rows = np.asarray(current["layers"]["o_proj"]["kernel"], np.float32).reshape(
      c.num_layers, c.num_kv_heads, -1, c.dim)
  down_rows = np.asarray(current["layers"]["down_proj"]["kernel"], np.float32)
  heads = head_act * np.linalg.norm(o_rows, axis=(2, 3))
  channels = (channel_act * np.linalg.norm(down_rows, axis=-1)).reshape(
      c.num_layers, -1, layout.channel_group).sum(-1)
  present_heads, present_channels, _ = layout.split(present)
  within_layer = lambda x, alive: np.where(alive, x, 0.0) / np.maximum(
      (x * alive).sum(1, keepdims=True) / np.maximum(alive.sum(1, keepdims=True), 1), 1e-30)
  return np.concatenate([within_layer(heads, present_heads).reshape(-1),
                         within_layer(channels, present_channels).reshape(-1),
                         np.zeros(c.num_layers)])


def layer_prior(layout: Layout, loss, params: dict, tokens, keep) -> np.ndarray:
  """[N] zero but for the present layers: how much the calibration loss rises when each one is
  removed on its own (one forward pass per layer). On SmolLM2 it spans 0.07 to 7.4 nats, and
  activation sizes rank the layers backwards (layer 0, the most vital, has the smallest). It
  grows as the rest is pruned, so it is measured again at every step."""
  keep = np.asarray(keep, np.float32)
  base = float(loss(params, keep, tokens))
  prior = np.zeros(layout.size)
  for unit in np.flatnonzero(layout.present(keep) & (layout.kinds() == KINDS.index("layers"))):
    dropped = keep.copy()
    dropped[unit] = 0.0
    prior[unit] = max(float(loss(params, dropped, tokens)) - base, 0.0)
  return prior


def candidate_masks(rng: np.random.Generator, layout: Layout, prior, keep, rate: float,
                    layer_rate: float, num_masks: int) -> tuple[np.ndarray, np.ndarray]:
  """(candidates [K] unit indices, keep masks [num_masks, N]) of one perturbation round.

  Per kind, the candidates are the ~2 * rate share of present units with the lowest prior; each
  pair of masks drops a random half of them (more likely the lower the prior) and then the other
  half, so every candidate is dropped in exactly half the sub-models.
  """
  present = layout.present(keep)
  kinds = layout.kinds()
  candidates, draws = [], []
  for kind_index, kind in enumerate(KINDS):
    units = np.flatnonzero(present & (kinds == kind_index))
    kind_rate = rate * (layer_rate if kind == "layers" else 1.0)
    count = min(len(units), 2 * math.ceil(kind_rate * len(units)))
    if count < 2:
      continue
    chosen = units[np.argsort(prior[units], kind="stable")[:count]]
    weights = prior[chosen].max() - prior[chosen] + 1e-6 * (prior[chosen].max() + 1e-30)
    candidates.append(chosen)
    draws.append((chosen, weights / weights.sum()))
  masks = np.repeat(np.asarray(present, np.float32)[None], num_masks, axis=0)
  for pair in range(num_masks // 2):
    for chosen, probs in draws:
      dropped = rng.choice(chosen, size=len(chosen) // 2, replace=False, p=probs)
      masks[2 * pair, dropped] = 0.0
      masks[2 * pair + 1, np.setdiff1d(chosen, dropped)] = 0.0
  return np.concatenate(candidates) if candidates else np.zeros(0, int), masks


def fit_contributions(masks, losses, ridge: float, prior=None, kinds=None) -> np.ndarray:
  """[K] contributions of the units: the coefficients of a linear model of -loss [M] on the keep
  masks [M, K] (larger = the unit lowers the loss more).

  With a prior [K] (and each unit's kind [K]: priors of different kinds are on different scales),
  the coefficients are shrunk toward it rather than toward zero: first -loss is fitted by a
  non-negative multiple of each kind's prior, then ridge fits the residual. With fewer sub-models
  than units (the usual case) the data can only correct the prior where it disagrees with it;
  the published code gets a similar effect by starting its fit at the prior.
  """
  x = masks - masks.mean(0)
  y = -(losses - losses.mean())
  base = np.zeros(x.shape[1])
  if prior is not None:
    kinds = np.zeros(x.shape[1], int) if kinds is None else np.asarray(kinds)
    groups = np.unique(kinds)
    predicted = np.stack([x[:, kinds == k] @ prior[kinds == k] for k in groups], axis=1)
    scales = np.clip(np.linalg.lstsq(predicted, y, rcond=None)[0], 0.0, None)
    base = np.asarray(prior, np.float64) * scales[np.searchsorted(groups, kinds)]
  residual = y - x @ base
  gram = x.T @ x
  penalty = ridge * max(np.trace(gram) / max(len(gram), 1), 1e-12)
  return base + np.linalg.solve(gram + penalty * np.eye(len(gram)), x.T @ residual)


def remove_lowest(layout: Layout, keep, order, fraction: float, slack: float = 0.01) -> np.ndarray:
  """keep with units dropped in `order` until at most `fraction` of the parameters remain; a unit
  whose removal would undershoot by more than `slack` (a whole layer, late in a step) is passed
  over."""
  keep = np.array(keep, bool)
  total = layout.total_params()
  for unit in order:
    if layout.kept_params(keep) <= fraction * total:
      break
    keep[unit] = False
    if layout.kept_params(keep) < (fraction - slack) * total:
      keep[unit] = True
  return keep


def bonsai(layout: Layout, params: dict, calibration, config: BonsaiConfig,
           on_target=None) -> dict[float, np.ndarray]:
  """{target kept fraction: keep vector [N]} after iterative perturbative pruning.

  calibration: [B, T] tokens (T - 1 a multiple of min(T - 1, 512)); on_target(target, keep) is
  called as each target is reached (to save it before the next iteration starts).
  """
  rng = np.random.default_rng(config.seed)
  chunk = min(calibration.shape[1] - 1, 512)
  loss = jax.jit(lambda p, k, t: negative_log_likelihood(masked_params(layout, p, k), t,
                                                         config=layout.config, chunk_size=chunk))
  keep = np.ones(layout.size, bool)
  reached, kept = {}, 1.0
  for iteration, (fraction, target) in enumerate(schedule(config.targets, config.max_step)):
    started = time.time()
    prior = activation_prior(layout, params, calibration, keep)
    if config.layer_rate:
      prior += layer_prior(layout, loss, params, calibration, keep)
    rate = (kept - fraction) / kept  # the share of what remains that this step removes
    candidates, masks = candidate_masks(rng, layout, prior, keep, rate, config.layer_rate,
                                        config.masks_per_step)
    losses = np.array([float(loss(params, m, calibration)) for m in masks])
    contributions = fit_contributions(masks[:, candidates], losses, config.ridge,
                                      prior[candidates], layout.kinds()[candidates])
    # Least contribution per parameter first (a layer holds ~16 channel groups' worth). Should the
    # candidates not hold enough parameters, the other units follow by prior.
    per_param = contributions / layout.removable_params(keep)[candidates]
    others = np.setdiff1d(np.flatnonzero(layout.present(keep)), candidates)
    order = np.concatenate([candidates[np.argsort(per_param, kind="stable")],
                            others[np.argsort(prior[others], kind="stable")]])
    keep = remove_lowest(layout, keep, order, fraction)
    kept = layout.kept_fraction(keep)
    logging.info("bonsai step %d: kept %.3f of the decoder parameters (goal %.3f); sub-model "
                 "NLL %.2f-%.2f over %d masks; pruned model NLL %.3f; %.0f s", iteration + 1,
                 kept, fraction, losses.min(), losses.max(), len(masks),
                 float(loss(params, keep.astype(np.float32), calibration)), time.time() - started)
    if target is not None:
      reached[target] = keep.copy()
      if on_target is not None:
        on_target(target, keep)
  return reached


def magnitude_one_shot(layout: Layout, params: dict, calibration, target: float) -> np.ndarray:
  """The simple baseline: heads and channel groups ranked by `activation_prior` (relative to their
  layer) in one shot, the same share of parameters removed from attention and from the MLPs; no
  layer units."""
  keep = np.ones(layout.size, bool)
  prior = activation_prior(layout, params, calibration, keep)
  kinds, sizes = layout.kinds(), layout.unit_params()
  for kind in ("heads", "channels"):
    units = np.flatnonzero(kinds == KINDS.index(kind))
    budget = (1 - target) * sizes[units].sum()
    removed = units[np.argsort(prior[units], kind="stable")]
    cumulative = np.cumsum(sizes[removed])
    keep[removed[:np.searchsorted(cumulative, budget, side="right")]] = False
  return keep
