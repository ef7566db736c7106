"""Verification rules: exact losslessness by enumeration, optimality against the LP, sampling, edges."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from budgetdraft import verification
from budgetdraft.verification import block, exact, gbv, greedy, lp, multipath, tokenwise

SINGLE_PATH = ["tokenwise", "block", "specinfer", "residual_bv", "gbv"]
MULTI_PATH = ["specinfer", "residual_bv", "gbv"]
TOY_P, TOY_Q = np.array([1 / 3, 2 / 3]), np.array([2 / 3, 1 / 3])  # the BV paper's toy example
EXACT_CASES = [(seed, vocab, gamma, mix) for seed, (vocab, gamma), mix in zip(
    range(6), [(3, 1), (3, 2), (4, 3), (5, 2), (3, 3), (4, 2)], [0.3, 0.9, 0.6, 0.5, 1.0, 0.1])]


@pytest.mark.parametrize("seed,vocab,gamma,mix", EXACT_CASES)
@pytest.mark.parametrize("method", SINGLE_PATH)
def test_single_path_rules_are_exactly_lossless(method, seed, vocab, gamma, mix):
  pair = exact.random_markov_pair(seed, vocab, mix)
  law, _ = exact.emitted_law(pair, method, gamma)
  assert exact.total_variation(law, exact.target_law(pair, gamma + 1)) < 1e-6


@pytest.mark.parametrize("seed,vocab,gamma,num_paths", [(0, 3, 2, 2), (1, 3, 2, 3), (2, 4, 2, 2),
                                                        (3, 3, 3, 2), (4, 4, 1, 3)])
@pytest.mark.parametrize("method", MULTI_PATH)
def test_multi_path_rules_are_exactly_lossless(method, seed, vocab, gamma, num_paths):
  pair = exact.random_markov_pair(seed, vocab, mix=0.7)
  law, _ = exact.emitted_law(pair, method, gamma, num_paths)
  assert exact.total_variation(law, exact.target_law(pair, gamma + 1)) < 1e-6


@pytest.mark.parametrize("seed,vocab,gamma,mix", EXACT_CASES)
def test_block_verification_attains_the_lp_optimum(seed, vocab, gamma, mix):
  pair = exact.random_markov_pair(seed, vocab, mix)
  _, block_accepted = exact.emitted_law(pair, "block", gamma)
  _, tokenwise_accepted = exact.emitted_law(pair, "tokenwise", gamma)
  optimum = lp.optimal_expected_accepted(pair, gamma)
  assert block_accepted == pytest.approx(optimum, abs=1e-6)
  assert tokenwise_accepted <= block_accepted + 1e-7


@pytest.mark.parametrize("seed,vocab,gamma,num_paths", [(0, 3, 2, 2), (1, 3, 2, 3), (5, 4, 2, 2)])
def test_multi_path_ordering(seed, vocab, gamma, num_paths):
  """BV <= residual BV <= LP optimum with K paths; SpecInfer and GBV <= LP optimum."""
  pair = exact.random_markov_pair(seed, vocab, mix=0.7)
  _, block_accepted = exact.emitted_law(pair, "block", gamma)
  _, residual_accepted = exact.emitted_law(pair, "residual_bv", gamma, num_paths)
  optimum = lp.optimal_expected_accepted(pair, gamma, num_paths)
  assert block_accepted + 1e-3 < residual_accepted <= optimum + 1e-6
  for method in ("specinfer", "gbv"):
    assert exact.emitted_law(pair, method, gamma, num_paths)[1] <= optimum + 1e-6


# Prefix-dependent laws (every prefix has its own rows), dense and sparse (zeros in p and q).
PREFIX_CASES = [  # (seed, vocab, support, gamma, num_paths): at most ~7K drafts each
    (0, 3, None, 1, 4), (1, 3, None, 2, 3), (2, 2, None, 3, 4), (3, 3, None, 3, 2),
    (4, 4, 2, 2, 2), (5, 4, 3, 1, 3), (6, 3, 2, 2, 4), (7, 4, 2, 3, 2)]


@pytest.mark.parametrize("seed,vocab,support,gamma,num_paths", PREFIX_CASES)
@pytest.mark.parametrize("method", MULTI_PATH)
def test_multi_path_rules_are_lossless_on_prefix_dependent_and_sparse_laws(
    method, seed, vocab, support, gamma, num_paths):
  pair = exact.PrefixPair(seed, vocab, mix=0.6, support=support)
  law, _ = exact.emitted_law(pair, method, gamma, num_paths)
  assert exact.total_variation(law, exact.target_law(pair, gamma + 1)) < 1e-6


@pytest.mark.parametrize("seed,vocab,support,gamma", [(0, 3, None, 3), (1, 4, 2, 2)])
@pytest.mark.parametrize("method", ["tokenwise", "block"])
def test_single_path_rules_are_lossless_on_prefix_dependent_and_sparse_laws(
    method, seed, vocab, support, gamma):
  pair = exact.PrefixPair(seed, vocab, mix=0.6, support=support)
  law, _ = exact.emitted_law(pair, method, gamma)
  assert exact.total_variation(law, exact.target_law(pair, gamma + 1)) < 1e-6


def test_gbv_attains_the_lp_optimum_on_the_bv_toy_example():
  """Published value: 2.6173 tokens per call with K = 2 (131/81 accepted), the 2-path LP optimum;
  SpecInfer 2.3333 and sequential residual BV 2.4198 on the same example."""
  toy = exact.iid_pair(TOY_P, TOY_Q)
  tokens_per_call = lambda method: 1 + exact.emitted_law(toy, method, 2, 2)[1]
  assert tokens_per_call("gbv") == pytest.approx(1 + 131 / 81, abs=1e-6)
  assert 1 + lp.optimal_expected_accepted(toy, 2, 2) == pytest.approx(1 + 131 / 81, abs=1e-6)
  assert tokens_per_call("specinfer") == pytest.approx(2.3333, abs=1e-4)
  assert tokens_per_call("residual_bv") == pytest.approx(2.4198, abs=1e-4)


def _lexicographic_max_law(pair, gamma, num_paths):
  """{path: P(the selected path is path)} by brute force over every K-tuple of i.i.d. drafts."""
  paths = list(itertools.product(range(pair.vocab_size), repeat=gamma))
  prob = {x: np.prod([pair.q(x[:i])[x[i]] for i in range(gamma)]) for x in paths}

  def key(x):  # the ranking of GBV: lexicographic in (min(1, p/q), token id) node by node
    return tuple((min(1.0, pair.p(x[:i])[x[i]] / pair.q(x[:i])[x[i]]), x[i]) for i in range(gamma))

  law = {}
  for combo in itertools.product(paths, repeat=num_paths):
    mass = np.prod([prob[x] for x in combo])
    if mass > 0:
      best = max(combo, key=key)
      law[best] = law.get(best, 0.0) + mass
  return law


@pytest.mark.parametrize("seed,vocab,support,gamma,num_paths", [(0, 3, None, 2, 3), (1, 4, 3, 2, 2),
                                                                (2, 2, None, 3, 4)])
def test_selected_path_law_is_the_law_of_the_lexicographic_max(seed, vocab, support, gamma,
                                                               num_paths):
  pair = exact.PrefixPair(seed, vocab, mix=0.6, support=support)
  for path, expected in _lexicographic_max_law(pair, gamma, num_paths).items():
    q_rows, p_rows = exact.path_rows(pair, path)
    q_selected = np.asarray(gbv.selected_path_law(jnp.array(path), jnp.asarray(q_rows, jnp.float32),
                                                  jnp.asarray(p_rows, jnp.float32), num_paths))
    np.testing.assert_allclose(q_selected.sum(-1), 1.0, atol=1e-5)
    law = np.prod([q_selected[i, path[i]] for i in range(gamma)])
    assert law == pytest.approx(expected, abs=2e-6), path


def test_selected_path_law_is_stable_along_improbable_paths():
  """Draft prefix mass 1e-6 per step over 8 steps (1e-48 < float32's range): rows stay normalized."""
  vocab, gamma = 5, 8
  q = jnp.tile(jnp.array([1e-6, 0.25, 0.25, 0.25, 0.25 - 1e-6]), (gamma, 1))
  p = jnp.tile(jnp.array([0.3, 0.1, 0.2, 0.2, 0.2]), (gamma + 1, 1))
  rows = np.asarray(gbv.selected_path_law(jnp.zeros((gamma,), jnp.int32), q, p, num_paths=4))
  assert np.all(np.isfinite(rows)) and np.allclose(rows.sum(-1), 1.0, atol=1e-5)
  assert rows.shape == (gamma, vocab)


def test_paper_example_token_vs_block():
  """Sun et al.'s example: q = (2/3, 1/3), p = (1/3, 2/3), gamma = 2 gives 10/9 vs 11/9."""
  pair = exact.iid_pair(TOY_P, TOY_Q)
  assert exact.emitted_law(pair, "tokenwise", 2)[1] == pytest.approx(10 / 9, abs=1e-6)
  assert exact.emitted_law(pair, "block", 2)[1] == pytest.approx(11 / 9, abs=1e-6)


@pytest.mark.parametrize("num_paths", [1, 3])
def test_greedy_rules_emit_the_target_argmax_chain(num_paths):
  pair = exact.random_markov_pair(7, 4, mix=0.5, greedy_target=True)
  law, _ = exact.emitted_law(pair, "greedy", 3, num_paths)
  assert exact.total_variation(law, exact.target_law(pair, 4)) < 1e-9


def _sample_drafts(pair, num_samples, num_paths, gamma, rng):
  """num_samples independent K-path drafts from the draft chain: tokens [N, K, gamma]."""
  tokens = np.zeros((num_samples, num_paths, gamma), int)
  previous = np.full((num_samples, num_paths), pair.context)
  for i in range(gamma):
    cdf = np.cumsum(pair.draft[previous], axis=-1)
    u = rng.random((num_samples, num_paths, 1))
    previous = tokens[..., i] = np.minimum((u > cdf).sum(-1), pair.vocab_size - 1)
  return tokens


@pytest.mark.parametrize("rule,num_paths", [(tokenwise.verify_tokenwise, 1),
                                            (block.verify_block, 1),
                                            (multipath.verify_specinfer, 3),
                                            (multipath.verify_residual_bv, 3),
                                            (gbv.verify_gbv, 3)])
def test_sampled_rules_match_target_on_a_larger_vocabulary(rule, num_paths):
  """Chi-square (p > 1e-3, fixed seeds) on a 64-token vocabulary: with a fresh draft and key per
  sample, the first output token follows the target's first-position law."""
  vocab, gamma, num_samples = 64, 3, 20_000
  pair = exact.random_markov_pair(11, vocab, mix=0.6, sharpness=1.5)
  paths = _sample_drafts(pair, num_samples, num_paths, gamma, np.random.default_rng(0))
  contexts = np.concatenate([np.full(paths.shape[:2] + (1,), pair.context), paths], axis=-1)
  q = jnp.asarray(pair.draft[contexts[..., :gamma]], jnp.float32)
  p = jnp.asarray(pair.target[contexts], jnp.float32)
  keys = jax.random.split(jax.random.key(0), num_samples)
  if num_paths == 1:
    num_accepted, token = jax.jit(jax.vmap(rule))(jnp.asarray(paths[:, 0]), q[:, 0], p[:, 0], keys)
    drafted_first = paths[:, 0, 0]
  else:
    num_accepted, token, path = jax.jit(jax.vmap(rule))(jnp.asarray(paths), q, p, keys)
    drafted_first = paths[np.arange(num_samples), np.asarray(path), 0]
  first = np.where(np.asarray(num_accepted) > 0, drafted_first, np.asarray(token))
  counts = np.bincount(first, minlength=vocab)
  expected = pair.target[pair.context] * num_samples
  big = expected >= 5  # rare tokens are pooled into one cell (when there are any)
  observed = np.append(counts[big], counts[~big].sum())[:big.sum() + (~big).any()]
  expected = np.append(expected[big], expected[~big].sum())[:big.sum() + (~big).any()]
  assert stats.chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-3


# ------------------------------------------------------------------------------------ edge cases


def _rows(vocab, gamma, seed):
  rng = np.random.default_rng(seed)
  q = rng.dirichlet(np.ones(vocab), size=gamma).astype(np.float32)
  p = rng.dirichlet(np.ones(vocab), size=gamma + 1).astype(np.float32)
  return jnp.asarray(q), jnp.asarray(p)


@pytest.mark.parametrize("law", [tokenwise.tokenwise_law, block.block_law])
def test_identical_models_accept_everything(law):
  q, p = _rows(6, 4, 1)
  p = p.at[:4].set(q)
  stop_probs, _ = law(jnp.array([0, 3, 2, 5]), q, p)
  np.testing.assert_allclose(stop_probs, [0, 0, 0, 0, 1], atol=1e-6)


@pytest.mark.parametrize("law", [tokenwise.tokenwise_law, block.block_law])
def test_disjoint_supports_accept_nothing(law):
  q = jnp.array([[0.5, 0.5, 0.0, 0.0]] * 2)
  p = jnp.array([[0.0, 0.0, 0.3, 0.7]] * 3)
  stop_probs, next_dists = law(jnp.array([0, 1]), q, p)
  np.testing.assert_allclose(stop_probs, [1, 0, 0], atol=1e-7)
  np.testing.assert_allclose(next_dists[0], [0, 0, 0.3, 0.7], atol=1e-6)


@pytest.mark.parametrize("law", [tokenwise.tokenwise_law, block.block_law])
def test_gamma_one_is_a_single_speculative_step(law):
  q, p = _rows(5, 1, 2)
  stop_probs, next_dists = law(jnp.array([3]), q, p)
  accept = min(1.0, float(p[0, 3] / q[0, 3]))
  np.testing.assert_allclose(stop_probs, [1 - accept, accept], atol=1e-6)
  residual = np.maximum(np.asarray(p[0] - q[0]), 0)
  np.testing.assert_allclose(next_dists[0], residual / residual.sum(), atol=1e-6)
  np.testing.assert_allclose(next_dists[1], p[1], atol=1e-7)


@pytest.mark.parametrize("name", ["tokenwise", "block", "greedy"])
def test_batch_of_mixed_outcomes_under_vmap(name):
  """Row 0: p = q (accept all); row 1: disjoint supports (accept none); row 2: greedy match of 2."""
  vocab, gamma = 4, 3
  q0 = jnp.full((gamma, vocab), 0.25)
  p_rows = [jnp.full((gamma + 1, vocab), 0.25),
            jnp.tile(jnp.array([0.0, 0.0, 0.0, 1.0]), (gamma + 1, 1)),
            jnp.eye(vocab)[jnp.array([1, 2, 1, 0])]]
  drafts = jnp.array([[0, 1, 2], [0, 1, 2], [1, 2, 2]])
  q = jnp.stack([q0, q0.at[:, 3].set(0.0).at[:, :3].set(1 / 3), q0])
  p = jnp.stack(p_rows)
  keys = jax.random.split(jax.random.key(3), 3)
  one_path = lambda x: x[:, None]  # the common rule signature: a K = 1 draft
  num_accepted, token, path = jax.jit(jax.vmap(verification.RULES[name]))(
      one_path(drafts), one_path(q), one_path(p), keys)
  assert np.all(np.asarray(path) == 0)
  if name != "greedy":
    assert int(num_accepted[0]) == 3
  assert (int(num_accepted[1]), int(token[1])) == (0, 3)
  if name == "greedy":
    assert (int(num_accepted[2]), int(token[2])) == (2, 1)


def test_greedy_multipath_prefers_the_longest_match():
  p = jnp.eye(5)[jnp.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])]
  drafts = jnp.array([[1, 0, 0], [1, 2, 0], [1, 2, 3]])
  num_accepted, token, path = greedy.verify_greedy(drafts, None, p, None)
  assert (int(num_accepted), int(token), int(path)) == (3, 4, 2)


def test_multi_path_block_rules_with_one_path_are_block_verification():
  pair = exact.random_markov_pair(3, 4, mix=0.8)
  drafts, _, q, p = exact.all_drafts(pair, 2, 1)
  for draft, qq, pp in itertools.islice(zip(drafts, q, p), 0, None, 5):
    residual = multipath.residual_bv_outcomes(draft, qq, pp)
    gbv_stop_probs, _ = gbv.gbv_law(jnp.asarray(draft), qq, pp)
    stop_probs, _ = block.block_law(jnp.asarray(draft[0]), qq[0], pp[0])
    for k in range(3):
      assert residual.get((0, k), (0.0,))[0] == pytest.approx(float(stop_probs[k]), abs=1e-6)
      assert float(gbv_stop_probs[0, k]) == pytest.approx(float(stop_probs[k]), abs=1e-6)
