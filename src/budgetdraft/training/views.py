"""The drafter's training branches over one packed sequence: a full-cache branch and sparse views.

A sequence [B, P + C] is split at the compression point P. The prompt pass runs the drafter over
the first P tokens with full causal attention (as the inference prefill does) and keeps every
key. The inference selection policy then scores those keys with the drafter's own attention (the
same `policy_scores` code as decoding, on gradient-stopped inputs: selection is discrete), and each
budget keeps, per layer and KV head, what the inference rule `selection.keep_mask` keeps. The
C continuation tokens then run once per branch against the shared prompt keys: the full branch sees
every key, a view at budget B sees its kept keys + the last `ring_size` tokens since P, which is
what a `SparseKVCache` compressed at P would show (`MaskedKVCache`). Gradients reach the prompt
pass through the kept keys and values, unless `prefix_gradient=False` (the published recipe): the
prompt is then prefilled without gradient in chunks, so long prefixes (16K) fit in memory. An
EAGLE-style drafter takes `features` [B, P + C, F] (its feature inputs, `prefill.feature_inputs`
of the verifier's hidden states) in every pass. From its second draft step on, such a drafter is
fed its own last hidden state instead of the verifier's (`speculative._draft`); a self-fed pass
(`self_fed_features`) runs the continuation again that way, so training sees what decoding feeds
(EAGLE-3's training-time test, one step deep).
"""

import jax
import jax.numpy as jnp

from budgetdraft.models import prefill
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache, MaskedKVCache
from budgetdraft.models.transformer import Transformer
from budgetdraft.sparsity import policies, selection


def _positions(batch: int, start: int, count: int):
  return jnp.broadcast_to(start + jnp.arange(count), (batch, count))


def prompt_pass(config: ModelConfig, params, prompt, capacity: int, features=None,
                gradient: bool = True) -> FullKVCache:
  """Keys and values of the prompt [B, P] (full causal attention; differentiable if `gradient`,
  else a chunked prefill of constant parameters)."""
  batch, prompt_len = prompt.shape
  cache = FullKVCache.init(config, batch, capacity)
  if not gradient:
    frozen = jax.lax.stop_gradient
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    _, cache = prefill.prefill(Transformer(config), frozen(params), prompt, lengths, cache,
                               min(prompt_len, config.attention_block),
                               features=None if features is None else frozen(features))
    return frozen(cache)
  keep_all = jnp.ones(cache.k.shape[:4], bool)
  view = MaskedKVCache(cache, keep_all, jnp.zeros((batch,), jnp.int32))
  _, view = Transformer(config).apply({"params": params}, prompt,
                                      _positions(batch, 0, prompt_len), view, features=features)
  return view.cache


def keep_masks(config: ModelConfig, params, cache: FullKVCache, prompt, budgets,
               sparsity: selection.SparsityConfig, rng, features=None):
  """[M, L, B, Hkv, capacity] bool: the prompt keys each budget in `budgets` [M] keeps."""
  prompt_lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
  frozen = jax.lax.stop_gradient
  scores = policies.policy_scores(config, frozen(params), frozen(cache), prompt, prompt_lengths,
                                  sparsity, rng, features)
  return jax.vmap(lambda budget: selection.keep_mask(scores, prompt_lengths, budget, sparsity))(
      budgets)


def branch_outputs(config: ModelConfig, params, cache: FullKVCache, continuation, keeps,
                   ring_size: int, features=None):
  """(hidden [N, B, C, dim], logits [N, B, C, V]) of the continuation [B, C] under each keep mask
  in keeps [N, L, B, Hkv, S].

  The cache holds the prompt (its length is the compression point P). features: the
  continuation's feature inputs, [B, C, F] for every branch or [N, B, C, F] one per branch.
  """
  model = Transformer(config)
  batch, num_new = continuation.shape
  positions = _positions(batch, cache.length[0], num_new)
  if features is not None and features.ndim == 3:
    features = jnp.broadcast_to(features, keeps.shape[:1] + features.shape)

  def one_branch(inputs):
    keep, branch_features = inputs
    view = MaskedKVCache(cache, keep, cache.length, ring_size)
    hidden, _ = model.apply({"params": params}, continuation, positions, view,
                            features=branch_features)
    return hidden, model.apply({"params": params}, hidden, method=Transformer.logits)

  return jax.lax.map(one_branch, (keeps, features))


def self_fed_features(features, hidden):
  """[N, B, C, F]: each branch's continuation feature inputs with the drafter's own hidden states
  (hidden [N, B, C, dim], a first pass's, without gradient) in place of the verifier's from the
  second position on, as decoding feeds every draft step after the first."""
  if features.shape[-1] != hidden.shape[-1]:
    raise ValueError(f"a self-fed pass feeds the drafter's hidden states ({hidden.shape[-1]}) "
                     f"as its features ({features.shape[-1]}): they must have one width")
  own = jax.lax.stop_gradient(hidden[:, :, :-1]).astype(features.dtype)
  first = jnp.broadcast_to(features[:, :1], hidden.shape[:2] + (1, features.shape[-1]))
  return jnp.concatenate([first, own], axis=2)


def prompt_views(config: ModelConfig, params, tokens, prompt_len: int, budgets,
                 sparsity: selection.SparsityConfig, rng, features=None,
                 prefix_gradient: bool = True):
  """(the prompt's cache, keep masks [1 + M, L, B, Hkv, S]: the full branch's, then one per
  budget in `budgets` [M]) for the continuation passes (`branch_outputs`)."""
  prompt = tokens[:, :prompt_len]
  prompt_features = None if features is None else features[:, :prompt_len]
  cache = prompt_pass(config, params, prompt, tokens.shape[1], prompt_features, prefix_gradient)
  keep_all = jnp.ones((1,) + cache.k.shape[:4], bool)
  if budgets.shape[0]:
    keeps = keep_masks(config, params, cache, prompt, budgets, sparsity, rng, prompt_features)
    keep_all = jnp.concatenate([keep_all, keeps], axis=0)
  return cache, keep_all


def all_branch_outputs(config: ModelConfig, params, tokens, prompt_len: int, budgets,
                       sparsity: selection.SparsityConfig, ring_size: int, rng, features=None,
                       prefix_gradient: bool = True):
  """(hidden [1 + M, B, C, dim], logits [1 + M, B, C, V]) of the continuation tokens[:, P:]: the
  full branch, then M views."""
  cache, keeps = prompt_views(config, params, tokens, prompt_len, budgets, sparsity, rng,
                              features, prefix_gradient)
  return branch_outputs(config, params, cache, tokens[:, prompt_len:], keeps, ring_size,
                        None if features is None else features[:, prompt_len:])
