"""The speculative loop: exact greedy equality with AR, sampled losslessness, cache invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from budgetdraft import verification
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.models.prefill import prefill
from budgetdraft.decoding.sampling import SamplingConfig, probabilities
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import Transformer, init_params
from budgetdraft.sparsity import selection
from tests.test_transformer import full_logits

RULE_PATHS = [("tokenwise", 1), ("block", 1), ("greedy", 1), ("specinfer", 2), ("residual_bv", 2),
              ("gbv", 3)]
TINY_SPARSITY = selection.SparsityConfig(policy="snapkv", budget=24, sinks=2, window=8, recent=12,
                                         observation=8, lookahead=3, score_chunk=32)


@pytest.fixture(scope="module")
def tiny_pair():
  """A 3-layer verifier and a drafter = the verifier with perturbed weights (partial acceptance).

  The tied embedding is scaled up 20x (RMSNorm cancels it on the input side) so that next-token
  laws have ~2 nats of entropy, like a trained model, instead of being near-uniform.
  """
  config = get_config("tiny", num_layers=3, attention_block=32)
  params = init_params(config, jax.random.key(0))
  params = {**params, "embed": {"embedding": params["embed"]["embedding"] * 20}}
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  drafter = jax.tree.unflatten(tree, [x + 0.6 * jnp.std(x) * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])
  return config, params, drafter


def _generate(tiny_pair, prompts, spec, seed=1):
  config, params, drafter = tiny_pair
  return speculative.generate(params, drafter, prompts, jax.random.key(seed),
                              verifier_config=config, drafter_config=config, spec=spec)


@pytest.mark.parametrize("rule,num_paths", RULE_PATHS)
@pytest.mark.parametrize("sparsity", [None, TINY_SPARSITY])
def test_greedy_speculative_equals_greedy_ar(tiny_pair, rule, num_paths, sparsity):
  config, params, _ = tiny_pair
  prompts = [list(range(3, 90)), list(range(40, 75))]
  expected = autoregressive.generate(params, prompts, jax.random.key(0), config=config,
                                     max_new_tokens=24, prefill_chunk=32)
  spec = speculative.SpeculativeConfig(gamma=3, num_paths=num_paths, rule=rule,
                                       max_new_tokens=24, prefill_chunk=32, sparsity=sparsity)
  out, stats = _generate(tiny_pair, prompts, spec)
  assert out == expected
  assert 0 < stats.acceptance_rate < 1  # both accepted and rejected drafts were exercised


@pytest.mark.parametrize("policy", ["streaming", "h2o", "chunk_retrieval", "random"])
def test_greedy_speculative_equals_greedy_ar_under_every_kv_policy(tiny_pair, policy):
  """(snapkv above; lookahead and every policy on SmolLM2 in test_losslessness.)"""
  config, params, _ = tiny_pair
  prompts = [list(range(3, 90)), list(range(40, 75))]
  expected = autoregressive.generate(params, prompts, jax.random.key(0), config=config,
                                     max_new_tokens=24, prefill_chunk=32)
  sparsity = dataclasses.replace(TINY_SPARSITY, policy=policy)
  spec = speculative.SpeculativeConfig(gamma=3, rule="block", max_new_tokens=24, prefill_chunk=32,
                                       sparsity=sparsity)
  out, stats = _generate(tiny_pair, prompts, spec)
  assert out == expected
  assert 0 < stats.acceptance_rate < 1


@pytest.mark.parametrize("rule,num_paths", [r for r in RULE_PATHS if r[0] != "greedy"])
def test_sampled_first_two_tokens_follow_the_verifier(tiny_pair, rule, num_paths):
  """Chi-square (p > 1e-3) of the joint law of the first two emitted tokens over 3000 rows.

  Token 1 comes from the verifier prefill and token 2 from the first speculative round, so the
  joint tests the verification rule against the exact law p(t1) p(t2 | t1).
  """
  config, params, _ = tiny_pair
  sampling = SamplingConfig(temperature=0.6)
  prompt = list(range(10, 40))
  rows = 3000
  spec = speculative.SpeculativeConfig(gamma=3, num_paths=num_paths, rule=rule, sampling=sampling,
                                       max_new_tokens=2, prefill_chunk=32)
  out, _ = _generate(tiny_pair, [prompt] * rows, spec, seed=5)
  pairs = np.array([row[:2] for row in out])
  vocab = config.vocab_size
  first = np.asarray(probabilities(full_logits(config, params, jnp.asarray([prompt]))[0, -1],
                                   sampling), np.float64)
  sequences = jnp.asarray([prompt + [t] for t in range(vocab)])
  second = np.asarray(probabilities(full_logits(config, params, sequences)[:, -1], sampling),
                      np.float64)
  joint = (first[:, None] * second).reshape(-1) * rows
  counts = np.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab)
  assert counts[joint == 0].sum() == 0
  big = joint >= 5
  observed = np.append(counts[big], counts[~big].sum())
  expected = np.append(joint[big], joint[~big].sum())
  assert big.sum() > 10
  assert stats.chisquare(observed, expected / expected.sum() * rows).pvalue > 1e-3


@pytest.fixture(scope="module")
def three_token_law(tiny_pair):
  """Exact verifier law [V, V, V] of the first three tokens after THREE_TOKEN_PROMPT."""
  config, params, _ = tiny_pair
  vocab, sampling = config.vocab_size, SamplingConfig(temperature=1.0)
  last = lambda sequences: np.concatenate([
      np.asarray(probabilities(full_logits(config, params, jnp.asarray(chunk))[:, -1], sampling),
                 np.float64) for chunk in np.array_split(sequences, max(1, len(sequences) // 4096))])
  prompt = np.array(THREE_TOKEN_PROMPT)
  first = last(prompt[None])[0]                                                   # [V]
  one = np.concatenate([np.tile(prompt, (vocab, 1)), np.arange(vocab)[:, None]], 1)
  second = last(one)                                                              # [V, V]
  two = np.concatenate([np.repeat(one, vocab, 0), np.tile(np.arange(vocab), vocab)[:, None]], 1)
  third = last(two).reshape(vocab, vocab, vocab)
  return first[:, None, None] * second[:, :, None] * third


THREE_TOKEN_PROMPT = list(range(10, 50))  # 40 tokens: a sparse budget of 24 drops 16 of them


@pytest.mark.parametrize("rule,num_paths", [("block", 1), ("gbv", 3), ("residual_bv", 2)])
def test_sampled_first_three_tokens_follow_the_verifier_with_a_sparse_drafter(
    tiny_pair, three_token_law, rule, num_paths):
  """Chi-square (p > 1e-3, fixed seed) of the first three emitted tokens over 4000 rows against
  the exact law (enumerated over all V^3 continuations), with the drafter on a sparse cache."""
  rows = 4000
  spec = speculative.SpeculativeConfig(gamma=3, num_paths=num_paths, rule=rule,
                                       sampling=SamplingConfig(temperature=1.0), max_new_tokens=3,
                                       prefill_chunk=32, sparsity=TINY_SPARSITY)
  out, stats_ = _generate(tiny_pair, [THREE_TOKEN_PROMPT] * rows, spec, seed=9)
  assert 0 < stats_.acceptance_rate < 1
  vocab = three_token_law.shape[0]
  triples = np.array(out)
  counts = np.bincount((triples[:, 0] * vocab + triples[:, 1]) * vocab + triples[:, 2],
                       minlength=vocab ** 3)
  expected = three_token_law.reshape(-1) * rows
  assert counts[expected == 0].sum() == 0
  big = expected >= 5
  observed = np.append(counts[big], counts[~big].sum())
  expected = np.append(expected[big], expected[~big].sum())
  assert big.sum() > 20
  assert stats.chisquare(observed, expected / expected.sum() * rows).pvalue > 1e-3


@pytest.mark.parametrize("rule,num_paths,sparsity", [("block", 1, None), ("gbv", 3, TINY_SPARSITY),
                                                     ("specinfer", 2, TINY_SPARSITY)])
def test_caches_equal_a_fresh_prefill_of_the_emitted_tokens(tiny_pair, rule, num_paths, sparsity):
  config, params, drafter = tiny_pair
  prompt = jnp.asarray([list(range(5, 105))])
  lengths = jnp.array([100])
  spec = speculative.SpeculativeConfig(gamma=3, num_paths=num_paths, rule=rule,
                                       sampling=SamplingConfig(temperature=1.0),
                                       max_new_tokens=30, prefill_chunk=32, sparsity=sparsity)
  static = dict(verifier_config=config, drafter_config=config, spec=spec)
  state = speculative.start(params, drafter, prompt, lengths, jax.random.key(3), **static)
  state = speculative.decode(params, drafter, state, **static)
  num_emitted = int(state.num_emitted[0])
  assert 0 < int(state.accepted[0]) < int(state.active_rounds[0]) * spec.gamma
  emitted = np.asarray(state.tokens[0, :num_emitted])
  length = 100 + num_emitted - 1  # every emitted token but the last is in the verifier cache
  assert int(state.verifier_cache.length[0]) == length
  sequence = jnp.asarray([np.concatenate([np.asarray(prompt[0]), emitted[:-1]])])

  def fresh(model_params):
    cache = FullKVCache.init(config, 1, length + 32)
    return prefill(Transformer(config), model_params, sequence, jnp.array([length]), cache, 32)[1]

  verifier_fresh = fresh(params)
  np.testing.assert_allclose(state.verifier_cache.k[..., :length, :],
                             verifier_fresh.k[..., :length, :], atol=2e-5)
  np.testing.assert_allclose(state.verifier_cache.v[..., :length, :],
                             verifier_fresh.v[..., :length, :], atol=2e-5)
  if sparsity is None:
    return
  # Every drafter row holds the same state: the kept prompt set plus the ring of recent tokens.
  cache, drafter_fresh = state.drafter_cache, fresh(drafter)
  positions = np.asarray(cache.positions)
  assert np.all(positions == positions[:, :1])
  budget = sparsity.budget
  prompt_region = positions[:, 0, :, :budget]
  assert np.all((prompt_region >= 0) & (prompt_region < 100))
  ring = positions[:, 0, :, budget:]
  # The newest committed token may be missing (a fully accepted block's last draft is never fed to
  # the drafter); the next round re-feeds it as `previous`.
  recent = range(max(100, length - sparsity.recent), length - 1)
  for layer in range(config.num_layers):
    for head in range(config.num_kv_heads):
      slots = {int(p): s for s, p in enumerate(ring[layer, head]) if p >= 0}
      assert set(recent) <= set(slots)
  # Layer-0 keys depend only on (token, position), so they pin down which committed token each ring
  # slot holds; deeper keys depend on the sparse context and differ from a full-cache prefill.
  for head in range(config.num_kv_heads):
    slots = {int(p): s for s, p in enumerate(ring[0, head]) if p >= 0}
    for position in recent:
      np.testing.assert_allclose(cache.k[0, 0, head, budget + slots[position]],
                                 drafter_fresh.k[0, 0, head, position], atol=2e-5)


@pytest.mark.parametrize("rule,num_paths", RULE_PATHS)
def test_every_rule_is_greedy_on_one_hot_laws(rule, num_paths):
  """Why the loop runs `greedy` under greedy sampling (`SpeculativeConfig.loop_rule`): on one-hot
  drafter and verifier laws every rule accepts the same prefix and emits the same next token."""
  vocab, gamma = 5, 3
  rng = np.random.default_rng(0)
  spec = speculative.SpeculativeConfig(gamma=gamma, num_paths=num_paths, rule=rule)
  assert spec.loop_rule == "greedy"
  assert dataclasses.replace(spec, sampling=SamplingConfig(temperature=1.0)).loop_rule == rule
  for trial in range(50):
    drafts = jnp.asarray(rng.integers(0, 2, (num_paths, gamma)), jnp.int32)  # often matching
    law = {}  # the verifier's argmax after each drafted prefix: paths that share one agree
    targets = jnp.asarray([[law.setdefault(tuple(row[:i].tolist()), int(rng.integers(0, 2)))
                            for i in range(gamma + 1)] for row in np.asarray(drafts)], jnp.int32)
    q, p = jax.nn.one_hot(drafts, vocab), jax.nn.one_hot(targets, vocab)
    accepted, token, path = verification.RULES[rule](drafts, q, p, jax.random.key(trial))
    greedy_accepted, greedy_token, greedy_path = verification.RULES["greedy"](
        drafts, q, p, jax.random.key(trial))
    emitted = list(drafts[path, :accepted]) + [token]
    greedy_emitted = list(drafts[greedy_path, :greedy_accepted]) + [greedy_token]
    assert [int(t) for t in emitted] == [int(t) for t in greedy_emitted]


def test_round_stats_from_accepted_lengths():
  """Rounds accepting 0, 1, 3, 3 of gamma = 3 drafts emit 1, 2, 4, 4 tokens."""
  stats = speculative.RoundStats.of_rounds([0, 1, 3, 3], gamma=3)
  assert stats.counts == (1, 1, 0, 2) and (stats.rounds, stats.accepted) == (4, 7)
  assert stats.acceptance_rate == pytest.approx(7 / 12)
  assert stats.tokens_per_call == pytest.approx(2.75)
  # sample variance of (1, 2, 4, 4) = 2.25; standard error = sqrt(2.25 / 4)
  assert stats.tokens_per_call_stderr == pytest.approx(0.75)
  assert (stats + stats).counts == (2, 2, 0, 4)
  with pytest.raises(ValueError, match="gamma"):
    stats + speculative.RoundStats.of_rounds([1], gamma=2)


def test_bad_requests_fail_clearly(tiny_pair):
  config, params, drafter = tiny_pair
  with pytest.raises(ValueError, match="verifies one path"):
    speculative.SpeculativeConfig(rule="block", num_paths=2)
  with pytest.raises(ValueError, match="unknown rule"):
    speculative.SpeculativeConfig(rule="magic")
  with pytest.raises(ValueError, match="exceeds the model's context"):
    _generate((dataclasses.replace(config, max_context=64), params, drafter), [list(range(60))],
              speculative.SpeculativeConfig(max_new_tokens=8))
  with pytest.raises(ValueError, match="window 8 exceeds the shortest prompt"):
    _generate(tiny_pair, [list(range(5))], speculative.SpeculativeConfig(sparsity=TINY_SPARSITY))
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    speculative.SpeculativeConfig(max_new_tokens=0)  # as in AR decoding
  with pytest.raises(ValueError, match="token id 999"):
    _generate(tiny_pair, [[1, 999]], speculative.SpeculativeConfig(max_new_tokens=4))
  with pytest.raises(ValueError, match="pad_id=-1"):
    _generate(tiny_pair, [[1, 2]], speculative.SpeculativeConfig(max_new_tokens=4, pad_id=-1))
