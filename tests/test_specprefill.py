"""Speculative prefill: kept tokens at their original positions, keep-all = full prefill, decoding
continues exactly (and losslessly w.r.t. the pruned-prompt verifier) from the pruned cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft import specprefill
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.decoding import sampling as sampling_lib
from budgetdraft.models.config import get_config
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.prefill import prefill
from budgetdraft.models.transformer import Transformer, init_params
from budgetdraft.sparsity import policies
from budgetdraft.sparsity.selection import SparsityConfig

CAPACITY = 256
CHUNK = 32  # prefill chunk


@pytest.fixture(scope="module")
def batch():
  prompt = jax.random.randint(jax.random.key(1), (2, 100), 0, 256)
  return prompt, jnp.array([100, 77], jnp.int32)


def _full_prefill(config, params, prompt, lengths):
  return prefill(Transformer(config), params, prompt, lengths,
                 FullKVCache.init(config, prompt.shape[0], CAPACITY), CHUNK)


def _pruned(config, params, prompt, lengths, settings, scorer=None):
  scorer_config, scorer_params = scorer or (config, params)
  scores = specprefill.score(scorer_params, prompt, lengths, config=scorer_config,
                             settings=settings, capacity=CAPACITY, prefill_chunk=CHUNK)
  return scores, specprefill.prefill_kept(params, prompt, lengths, scores.importance,
                                          config=config, settings=settings, capacity=CAPACITY,
                                          prefill_chunk=CHUNK)


def _greedy_ar(config, params, logits, cache, max_new_tokens=12):
  static = dict(sampling=sampling_lib.SamplingConfig(), eos_id=None, pad_id=0)
  state = autoregressive.begin(logits, cache, jax.random.key(0), max_new_tokens=max_new_tokens,
                               **static)
  return np.asarray(autoregressive.decode(params, state, config=config, **static).tokens)


def test_keeping_everything_is_the_full_prefill(tiny_model, batch):
  config, params = tiny_model
  prompt, lengths = batch
  full_logits, full_cache = _full_prefill(config, params, prompt, lengths)
  _, (logits, cache, kept, num_kept) = _pruned(config, params, prompt, lengths,
                                               specprefill.SpecPrefillConfig(keep_rate=1.0))
  np.testing.assert_array_equal(num_kept, lengths)
  np.testing.assert_array_equal(cache.skipped, [0, 0])
  np.testing.assert_array_equal(logits, full_logits)
  for row, length in enumerate(np.asarray(lengths)):
    np.testing.assert_array_equal(kept[row, :length], np.arange(length))
    np.testing.assert_array_equal(cache.k[:, row, :, :length], full_cache.k[:, row, :, :length])
  np.testing.assert_array_equal(_greedy_ar(config, params, logits, cache),
                                _greedy_ar(config, params, full_logits, full_cache))


def test_kept_tokens_sit_at_their_original_positions(tiny_model, batch):
  """Layer 0's keys depend only on a token and its RoPE position, so each kept slot must equal the
  full cache's key at the kept position, and decoding must continue at position P."""
  config, params = tiny_model
  prompt, lengths = batch
  settings = specprefill.SpecPrefillConfig(keep_rate=0.3, chunk=8, window=8)
  _, full_cache = _full_prefill(config, params, prompt, lengths)
  _, (logits, cache, kept, num_kept) = _pruned(config, params, prompt, lengths, settings)
  np.testing.assert_array_equal(cache.length, lengths)
  np.testing.assert_array_equal(cache.skipped, lengths - num_kept)
  for row in range(2):
    n = int(num_kept[row])
    assert n < int(lengths[row])
    assert (np.diff(np.asarray(kept[row, :n])) > 0).all()
    np.testing.assert_allclose(cache.k[0, row, :, :n], full_cache.k[0, row, :, kept[row, :n]]
                               .transpose(1, 0, 2), rtol=1e-6, atol=1e-6)
  # One decode step: the fed token's layer-0 key lands in slot num_kept with position P.
  token = jnp.array([[7], [9]], jnp.int32)
  _, stepped = Transformer(config).apply({"params": params}, token, cache.length[:, None], cache)
  _, reference = Transformer(config).apply({"params": params}, token, lengths[:, None],
                                           full_cache)
  for row in range(2):
    np.testing.assert_allclose(stepped.k[0, row, :, int(num_kept[row])],
                               reference.k[0, row, :, int(lengths[row])], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(stepped.length, lengths + 1)


def _reference_kept(importance, length, settings):
  """Independent selection: forced chunks first, then the best mean, ties to the earlier chunk."""
  chunk = settings.chunk
  chunks = [list(range(s, min(s + chunk, length))) for s in range(0, length, chunk)]
  means = [np.mean(importance[c]) for c in chunks]
  forced = [i for i, c in enumerate(chunks) if c[-1] >= length - settings.window]
  if settings.keep_tokens:
    wanted = -(-settings.keep_tokens // chunk)
  else:
    wanted = int(np.ceil(len(chunks) * settings.keep_rate - 1e-6))
  count = min(len(chunks), max(wanted, len(forced)))
  order = forced + [i for i in sorted(range(len(chunks)), key=lambda i: (-means[i], i))
                    if i not in forced]
  return sorted(p for i in order[:count] for p in chunks[i])


@pytest.mark.parametrize("settings", [
    specprefill.SpecPrefillConfig(keep_rate=0.1, chunk=8, window=8),
    specprefill.SpecPrefillConfig(keep_rate=0.5, chunk=16, window=20),
    specprefill.SpecPrefillConfig(keep_tokens=40, chunk=8, window=3),
    specprefill.SpecPrefillConfig(keep_rate=1.0, chunk=7, window=1),
])
def test_kept_positions_match_an_independent_selection(settings):
  rng = np.random.default_rng(0)
  lengths = np.array([100, 77, 9, 64])
  importance = rng.random((4, 100)).astype(np.float32)
  kept, num_kept = specprefill.kept_positions(jnp.asarray(importance), jnp.asarray(lengths),
                                              settings)
  for row, length in enumerate(lengths):
    expected = _reference_kept(importance[row], length, settings)
    assert int(num_kept[row]) == len(expected)
    np.testing.assert_array_equal(kept[row, :len(expected)], expected)
    assert expected[-1] == length - 1  # the last token always goes to the verifier


def test_importance_is_pooled_max_over_heads_mean_over_queries():
  rng = np.random.default_rng(1)
  probs = rng.random((2, 1, 2, 3, 4, 40)).astype(np.float32)  # [L, B, Hkv, G, T, S]
  length, pool = 30, 5
  got = specprefill.token_importance(jnp.asarray(probs), jnp.array([length]), pool)
  context = probs[..., :length] / probs[..., :length].sum(-1, keepdims=True)
  padded = np.pad(context, [(0, 0)] * 5 + [(pool // 2, pool // 2)])
  pooled = np.stack([padded[..., i:i + pool].mean(-1) for i in range(length)], axis=-1)
  expected = pooled.max(axis=(0, 2, 3)).mean(axis=1)[0]
  np.testing.assert_allclose(got[0, :length], expected, rtol=1e-5)
  np.testing.assert_array_equal(got[0, length:], 0.0)


def test_one_scoring_pass_gives_the_lookahead_policy_scores(tiny_model, batch):
  config, params = tiny_model
  prompt, lengths = batch
  settings = specprefill.SpecPrefillConfig(keep_rate=0.5, lookahead=4)
  sparsity = SparsityConfig(policy="lookahead", budget=32, sinks=2, window=8, lookahead=4)
  assert settings.shares_kv_scores(sparsity)
  assert not settings.shares_kv_scores(SparsityConfig(policy="snapkv", budget=32, window=8))
  scores, _ = _pruned(config, params, prompt, lengths, settings)
  expected = jax.jit(lambda c: policies.lookahead_scores(config, params, c, prompt, lengths,
                                                         sparsity, None))(scores.cache)
  np.testing.assert_allclose(scores.kv_scores[..., :expected.shape[-1]], expected, rtol=1e-6,
                             atol=1e-7)


@pytest.mark.parametrize("num_paths, rule", [(1, "greedy"), (2, "gbv")])
def test_speculative_decoding_from_a_pruned_prefill_equals_ar_from_it(tiny_model, batch,
                                                                      num_paths, rule):
  """Lossless w.r.t. the pruned-prompt verifier: greedy speculative = greedy AR, same cache; the
  drafter's kept keys come from the same scoring pass."""
  config, params = tiny_model
  prompt, lengths = batch
  settings = specprefill.SpecPrefillConfig(keep_rate=0.3, chunk=8, window=8, lookahead=4)
  drafter_config = get_config("tiny")
  drafter_params = init_params(drafter_config, jax.random.key(5))
  scores, (logits, cache, _, _) = _pruned(config, params, prompt, lengths, settings,
                                          scorer=(drafter_config, drafter_params))
  spec = speculative.SpeculativeConfig(
      gamma=3, num_paths=num_paths, rule=rule, max_new_tokens=12, prefill_chunk=CHUNK,
      sparsity=SparsityConfig(policy="lookahead", budget=24, sinks=2, window=8, recent=16,
                              lookahead=4))
  static = dict(verifier_config=config, drafter_config=drafter_config, spec=spec)
  state = speculative.begin(drafter_params, logits, cache, scores.cache, prompt, lengths,
                            jax.random.key(3), kv_scores=scores.kv_scores, drafter_config=drafter_config,
                            spec=spec)
  final = speculative.decode(params, drafter_params, state, **static)
  tokens, stats = speculative.outputs_and_stats(final, spec)
  assert stats.rounds > 0
  np.testing.assert_array_equal(tokens, _greedy_ar(config, params, logits, cache))
  full_logits, full_cache = _full_prefill(config, params, prompt, lengths)
  assert not np.array_equal(np.asarray(logits), np.asarray(full_logits))  # it did prune


@pytest.mark.parametrize("fields, message", [
    (dict(keep_rate=0.0), "keep_rate"), (dict(keep_rate=1.5), "keep_rate"),
    (dict(keep_rate=float("nan")), "keep_rate"), (dict(keep_rate=-0.2), "keep_rate"),
    (dict(keep_tokens=-1), "keep_tokens"), (dict(chunk=0), "chunk"), (dict(window=0), "window"),
    (dict(lookahead=0), "lookahead"), (dict(pool=0), "pool"),
])
def test_bad_settings_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    specprefill.SpecPrefillConfig(**fields)
