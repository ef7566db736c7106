"""KV selection: budgets, forced sinks/window, planted keys, compression, and the sparse cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.models.prefill import prefill
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import Transformer, init_params
from budgetdraft.sparsity import policies, selection

SPARSITY = selection.SparsityConfig(policy="snapkv", budget=24, sinks=4, window=8, recent=16,
                                    observation=8, lookahead=4, score_chunk=32)


def _prefilled(config, params, prompt, lengths, capacity=256):
  cache = FullKVCache.init(config, prompt.shape[0], capacity)
  run = jax.jit(lambda p, t, l, c: prefill(Transformer(config), p, t, l, c, 32))
  return run(params, prompt, lengths, cache)[1]


@pytest.mark.parametrize("policy", sorted(policies.POLICIES))
def test_each_policy_keeps_budget_sinks_and_window(tiny_model, policy):
  config, params = tiny_model
  sparsity = dataclasses.replace(SPARSITY, policy=policy)
  lengths = jnp.array([150, 90])
  prompt = jax.random.randint(jax.random.key(0), (2, 150), 0, config.vocab_size)
  cache = _prefilled(config, params, prompt, lengths)
  scores = jax.jit(policies.policy_scores, static_argnums=(0, 5))(
      config, params, cache, prompt, lengths, sparsity, jax.random.key(1))
  kept = np.asarray(selection.select_kept(scores, lengths, sparsity))
  assert kept.shape == (config.num_layers, 2, config.num_kv_heads, sparsity.budget)
  for row, length in enumerate(lengths.tolist()):
    row_kept = kept[:, row].reshape(-1, sparsity.budget)
    assert np.all((row_kept >= 0) & (row_kept < length))       # exactly B valid keys each
    assert all(len(set(k)) == sparsity.budget for k in row_kept)
    forced = set(range(4)) | set(range(length - 8, length))
    assert all(forced <= set(k) for k in row_kept)


def test_budget_beyond_the_prompt_keeps_everything():
  scores = jax.random.uniform(jax.random.key(0), (2, 1, 2, 64))
  kept = np.asarray(selection.select_kept(scores, jnp.array([40]), dataclasses.replace(
      SPARSITY, budget=100)))
  assert kept.shape[-1] == 100
  assert all(sorted(k[k >= 0].tolist()) == list(range(40)) for k in kept.reshape(-1, 100))


def test_streaming_keeps_sinks_and_the_most_recent():
  scores = policies.streaming_scores(None, None, FullKVCache.init(get_config("tiny"), 1, 128),
                                     None, None, SPARSITY, None)
  kept = np.asarray(selection.select_kept(scores, jnp.array([100]), SPARSITY))
  np.testing.assert_array_equal(kept[0, 0, 0], list(range(4)) + list(range(80, 100)))


def test_bad_sparsity_configs_fail_clearly():
  with pytest.raises(ValueError, match="below sinks \\+ window"):
    selection.SparsityConfig(budget=16, sinks=4, window=64)
  with pytest.raises(ValueError, match="unknown KV policy"):
    selection.SparsityConfig(policy="magic")


@pytest.mark.parametrize("field", ["pool", "observation", "lookahead", "score_chunk", "recent",
                                   "chunk"])
def test_zero_sizes_fail_at_the_config_not_deep_in_jax(field):
  with pytest.raises(ValueError, match=f"{field}=0 must be >= 1"):
    selection.SparsityConfig(**{field: 0})


@pytest.mark.parametrize("prompt_len", [150, 96])  # score_chunk 32: a partial last chunk, none
def test_h2o_scores_are_the_attention_mass_of_every_prompt_query(tiny_model, prompt_len):
  """Reference: one dense causal pass of all prompt queries at once, its probabilities summed
  over queries and grouped heads; chunked scoring must give the same mass per key."""
  config, params = tiny_model
  prompt = jax.random.randint(jax.random.key(2), (1, prompt_len), 0, config.vocab_size)
  lengths = jnp.array([prompt_len])
  cache = _prefilled(config, params, prompt, lengths)
  sparsity = dataclasses.replace(SPARSITY, policy="h2o")
  scores = policies.h2o_scores(config, params, cache, prompt, lengths, sparsity, None)
  probs = policies.attention_probs(config, params, cache, prompt,
                                   jnp.arange(prompt_len)[None])  # [L, B, Hkv, G, T, S]
  reference = np.asarray(probs.sum(axis=(3, 4)))
  np.testing.assert_allclose(np.asarray(scores), reference, rtol=1e-4, atol=1e-4)
  # No mass on the slots past the prompt (capacity 256 > 150).
  assert np.all(np.asarray(scores)[..., prompt_len:] == 0)


def test_snapkv_finds_planted_high_attention_keys():
  """A 1-layer model whose queries all point at one token's key: SnapKV must keep that token."""
  config = get_config("tiny-untied", num_layers=1, rope_theta=1e9, attention_block=64)
  params = jax.tree.map(lambda x: np.array(x), init_params(config, jax.random.key(0)))
  special = 200
  head_dim, num_heads, num_kv = config.head_dim, config.num_heads, config.num_kv_heads
  direction = np.zeros(head_dim, np.float32)
  direction[[head_dim // 2 - 1, head_dim - 1]] = 4.0  # lowest RoPE frequency: ~no rotation
  params["layers"]["q_proj"]["kernel"][:] = 0.0
  params["layers"]["q_proj"]["bias"][0] = np.tile(direction, num_heads)
  params["layers"]["k_proj"]["bias"][:] = 0.0
  params["layers"]["k_proj"]["kernel"][:] = 0.0
  params["layers"]["k_proj"]["kernel"][0, 0] = np.tile(direction, num_kv)
  params["embed"]["embedding"][:, 0] = 0.0
  params["embed"]["embedding"][special, 0] = 5.0
  prompt = np.array(jax.random.randint(jax.random.key(1), (1, 300), 0, 199))
  planted = [57, 181]
  prompt[0, planted] = special
  prompt, lengths = jnp.asarray(prompt), jnp.array([300])
  cache = _prefilled(config, params, prompt, lengths, capacity=320)
  scores = policies.snapkv_scores(config, params, cache, prompt, lengths, SPARSITY, None)
  kept = np.asarray(selection.select_kept(scores, lengths, SPARSITY))
  for head_kept in kept.reshape(-1, SPARSITY.budget):
    assert set(planted) <= set(head_kept.tolist())


def test_compressed_cache_holds_the_kept_keys(tiny_model):
  config, params = tiny_model
  prompt = jax.random.randint(jax.random.key(2), (1, 120), 0, config.vocab_size)
  lengths = jnp.array([120])
  cache = _prefilled(config, params, prompt, lengths)
  scores = jax.random.uniform(jax.random.key(3), cache.k.shape[:3] + (cache.capacity,))
  kept = selection.select_kept(scores, lengths, SPARSITY)
  sparse = selection.compress(config, cache, kept, lengths, SPARSITY.ring_size(3))
  assert sparse.capacity == SPARSITY.budget + SPARSITY.recent + 3
  np.testing.assert_array_equal(sparse.positions[..., :SPARSITY.budget], kept)
  assert np.all(np.asarray(sparse.positions[..., SPARSITY.budget:]) == -1)
  expected = np.take_along_axis(np.asarray(cache.k), np.asarray(kept)[..., None], axis=3)
  np.testing.assert_array_equal(sparse.k[..., :SPARSITY.budget, :], expected)


def test_sparse_attention_equals_full_attention_over_the_kept_set(tiny_model):
  """Decoding over the sparse cache == decoding over a full cache restricted to the kept keys."""
  config, params = tiny_model
  model = Transformer(config)
  prompt = jax.random.randint(jax.random.key(4), (1, 100), 0, config.vocab_size)
  lengths = jnp.array([100])
  cache = _prefilled(config, params, prompt, lengths)
  budget = dataclasses.replace(SPARSITY, budget=200)  # keeps everything: must equal full
  kept = selection.select_kept(jnp.zeros(cache.k.shape[:3] + (cache.capacity,)), lengths, budget)
  sparse = selection.compress(config, cache, kept, lengths, budget.ring_size(2))
  tokens = jnp.array([[5, 9, 3]])
  positions = 100 + jnp.arange(3)[None]
  full_hidden, _ = model.apply({"params": params}, tokens, positions, cache)
  sparse_hidden, sparse = model.apply({"params": params}, tokens, positions, sparse)
  np.testing.assert_allclose(sparse_hidden, full_hidden, atol=2e-5)
  ring = np.asarray(sparse.positions[..., budget.budget:])
  assert sorted(set(ring[ring >= 0].tolist())) == [100, 101, 102]


def test_chunk_retrieval_keeps_chunk_zero_and_the_best_whole_chunks():
  """Scores by hand: last prompt key . each chunk's mean key; chunk 0 first, then the best."""
  config = get_config("tiny")
  sparsity = selection.SparsityConfig(policy="chunk_retrieval", budget=32, sinks=0, window=0,
                                      chunk=8)
  cache = FullKVCache.init(config, 2, 128)
  cache = cache.replace(k=jax.random.normal(jax.random.key(0), cache.k.shape))
  lengths = jnp.array([100, 61])  # 61: a partial last chunk of 5 keys
  scores = policies.chunk_retrieval_scores(config, None, cache, None, lengths, sparsity, None)
  kept = np.asarray(selection.select_kept(scores, lengths, sparsity))
  keys = np.asarray(cache.k)
  partial_kept = 0
  for row, length in enumerate(lengths.tolist()):
    for layer in range(config.num_layers):
      for head in range(config.num_kv_heads):
        k = keys[layer, row, head, :length]
        chunk_means = [k[start:start + 8].mean(0) for start in range(0, length, 8)]
        by_hand = np.array([m @ k[-1] for m in chunk_means])
        ranked = [0, *(1 + np.argsort(-by_hand[1:], kind="stable"))]
        # Whole chunks in rank order, up to the budget (a partial last chunk leaves room that the
        # next chunk's first positions fill).
        in_rank_order = [p for c in ranked for p in range(8 * c, min(8 * c + 8, length))]
        got = kept[layer, row, head]
        assert got[got >= 0].tolist() == sorted(in_rank_order[:32])
        partial_kept += length - 1 in in_rank_order[:24]
  assert partial_kept  # the partial-chunk case was exercised


def test_chunk_retrieval_budgets_must_be_whole_chunks():
  with pytest.raises(ValueError, match="positive multiple of chunk=8"):
    selection.SparsityConfig(policy="chunk_retrieval", budget=100, sinks=0, window=0)
  with pytest.raises(ValueError, match="chunk=0 must be >= 1"):
    selection.SparsityConfig(policy="chunk_retrieval", chunk=0)
  selection.SparsityConfig(policy="snapkv", budget=100)  # other policies take any budget
