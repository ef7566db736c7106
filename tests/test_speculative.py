"""The speculative loop: exact greedy equality with AR, sampled losslessness, cache invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from budgetdraft.data import packing
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.models.prefill import prefill
from budgetdraft.decoding.sampling import SamplingConfig, probabilities
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import Transformer, init_params
from budgetdraft.sparsity import policies, selection
from tests.test_transformer import full_logits

RULE_PATHS = [("tokenwise", 1), ("block", 1), ("greedy", 1), ("specinfer", 2), ("gbv", 3)]
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


# ------------------------------------------------------------------------- real SmolLM2 verifier


@pytest.fixture(scope="module")
def long_prompt(smollm2, data_dir):
  _, _, tokenizer = smollm2
  sequences = packing.dataset_sequences("long_books", data_dir, "validation", tokenizer, 2048, 1)
  return sequences[0].tolist()


@pytest.fixture(scope="module")
def smollm2_greedy_reference(smollm2, long_prompt):
  config, params, _ = smollm2
  return autoregressive.generate(params, [long_prompt], jax.random.key(0), config=config,
                                 max_new_tokens=20)


SMOLLM2_CASES = ([(rule, paths, "snapkv") for rule, paths in RULE_PATHS] +
                 [("block", 1, policy) for policy in sorted(policies.POLICIES) if policy != "snapkv"] +
                 [("block", 1, None)])


@pytest.mark.slow
@pytest.mark.parametrize("rule,num_paths,policy", SMOLLM2_CASES)
def test_smollm2_greedy_speculative_equals_ar_at_2k(smollm2, long_prompt, smollm2_greedy_reference,
                                                    rule, num_paths, policy):
  """2048-token prompt; the drafter is the verifier itself over a 256-key sparse cache (so drafts
  are good but not perfect), or the first 4 layers with a full cache."""
  config, params, _ = smollm2
  if policy is None:
    from budgetdraft.models.checkpoint_io import take_layers
    drafter_config, drafter_params = take_layers(config, params, 4)
    sparsity = None
  else:
    drafter_config, drafter_params = config, params
    sparsity = selection.SparsityConfig(policy=policy, budget=256, window=32, recent=32,
                                        lookahead=4)
  spec = speculative.SpeculativeConfig(gamma=3, num_paths=num_paths, rule=rule, max_new_tokens=20,
                                       sparsity=sparsity)
  out, stats = speculative.generate(params, drafter_params, [long_prompt], jax.random.key(1),
                                    verifier_config=config, drafter_config=drafter_config,
                                    spec=spec)
  assert out == smollm2_greedy_reference
  if policy is not None:
    assert stats.acceptance_rate > 0.2
