"""EAGLE-style drafters (a feature input) and reduced-vocabulary heads, through the whole engine."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft import drafters
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.models import prefill
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.transformer import Transformer
from budgetdraft.training import losses
from tests.test_speculative import TINY_SPARSITY, tiny_pair  # noqa: F401 (fixture)

PROMPTS = [list(range(3, 90)), list(range(40, 75))]
# The tiny verifier's greedy continuations of PROMPTS loop over these ids, so a drafter restricted
# to them is accepted part of the time.
LOOP_IDS = [10, 74, 193, 209]


@pytest.fixture(scope="module")
def eagle(tiny_pair):
  config, params, _ = tiny_pair
  drafter_config, trainable, shared = drafters.initialize("eagle", config, params, 1, LOOP_IDS)
  return drafter_config, {**shared, **trainable}


HIDDEN_LENGTH = 128  # > the longest prompt + generated tokens below


@functools.partial(jax.jit, static_argnames="config")
def _forward(config, params, tokens):
  cache = FullKVCache.init(config, 1, tokens.shape[1])
  return Transformer(config).apply({"params": params}, tokens,
                                   jnp.arange(tokens.shape[1])[None], cache)[0][0]


def _hidden(config, params, tokens):
  """The verifier's hidden states [T, dim] of one token list, by one full forward (padded to one
  length so that one compiled forward serves every call; causal: the padding changes nothing
  before it)."""
  padded = np.zeros((1, HIDDEN_LENGTH), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_forward(config, params, jnp.asarray(padded)))[:len(tokens)]


def test_initialize_shapes_and_shared_head(tiny_pair, eagle):
  config, params, _ = tiny_pair
  drafter_config, drafter_params = eagle
  assert (drafter_config.num_layers, drafter_config.feature_dim) == (1, config.dim)
  assert drafter_config.draft_vocab == len(LOOP_IDS)
  np.testing.assert_array_equal(drafter_params["draft_head"]["ids"], LOOP_IDS)
  np.testing.assert_array_equal(drafter_params["draft_head"]["kernel"],
                                params["embed"]["embedding"][np.array(LOOP_IDS)].T)
  assert drafter_params["input_proj"]["kernel"].shape == (2 * config.dim, config.dim)


def test_subset_head_scores_only_its_ids(tiny_pair, eagle):
  config, params, _ = tiny_pair
  drafter_config, drafter_params = eagle
  hidden = jax.random.normal(jax.random.key(3), (5, config.dim))
  logits = Transformer(drafter_config).apply({"params": drafter_params}, hidden,
                                             method=Transformer.logits)
  verifier_logits = Transformer(config).apply({"params": params}, hidden,
                                              method=Transformer.logits)
  outside = np.setdiff1d(np.arange(config.vocab_size), LOOP_IDS)
  assert np.all(np.isneginf(np.asarray(logits)[:, outside]))
  np.testing.assert_allclose(logits[:, np.array(LOOP_IDS)],
                             verifier_logits[:, np.array(LOOP_IDS)], rtol=1e-5, atol=1e-5)


def test_missing_features_fail_clearly(eagle):
  drafter_config, drafter_params = eagle
  tokens = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="pass features"):
    Transformer(drafter_config).apply({"params": drafter_params}, tokens, tokens,
                                      FullKVCache.init(drafter_config, 1, 32))


@pytest.mark.parametrize("rule,num_paths,sparsity", [
    ("block", 1, None), ("block", 1, TINY_SPARSITY), ("tokenwise", 1, TINY_SPARSITY),
    ("gbv", 3, TINY_SPARSITY)])
def test_greedy_speculative_with_eagle_equals_greedy_ar(tiny_pair, eagle, rule, num_paths,
                                                        sparsity):
  config, params, _ = tiny_pair
  drafter_config, drafter_params = eagle
  expected = autoregressive.generate(params, PROMPTS, jax.random.key(0), config=config,
                                     max_new_tokens=24, prefill_chunk=32)
  spec = speculative.SpeculativeConfig(gamma=3, num_paths=num_paths, rule=rule,
                                       max_new_tokens=24, prefill_chunk=32, sparsity=sparsity)
  out, stats = speculative.generate(params, drafter_params, PROMPTS, jax.random.key(1),
                                    verifier_config=config, drafter_config=drafter_config,
                                    spec=spec)
  assert out == expected
  assert 0 < stats.acceptance_rate < 1  # both accepted and rejected drafts were exercised


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0)])
def test_features_are_the_verifiers_hidden_states_of_the_last_two_tokens(tiny_pair, eagle,
                                                                         sampling):
  """After every round, SpecState.features = the verifier's hidden states at positions root - 2
  and root - 1 of the emitted sequence, as one full forward computes them."""
  config, params, _ = tiny_pair
  drafter_config, drafter_params = eagle
  spec = speculative.SpeculativeConfig(gamma=3, max_new_tokens=20, prefill_chunk=32,
                                       sampling=sampling)
  static = dict(verifier_config=config, drafter_config=drafter_config, spec=spec)
  prompt, lengths = prefill.pad_prompts(PROMPTS, 0, config.vocab_size)
  state = speculative.start(params, drafter_params, prompt, lengths, jax.random.key(2), **static)
  accepted_some = False
  while not speculative.finished(state, spec):
    for row, tokens in enumerate(PROMPTS):
      emitted = np.asarray(state.tokens[row, :int(state.num_emitted[row])]).tolist()
      root = int(state.verifier_cache.length[row])
      assert root == len(tokens) + len(emitted) - 1
      hidden = _hidden(config, params, tokens + emitted)
      np.testing.assert_allclose(state.features[row], hidden[root - 2:root], atol=2e-4, rtol=2e-4)
    state = speculative.step(params, drafter_params, jax.tree.map(jnp.copy, state), **static)
    accepted_some |= bool(state.accepted.sum() > 0)
  assert accepted_some


def test_a_reduced_vocabulary_loss_stays_finite(tiny_pair):
  """Teacher mass outside the drafter's ids is an unavoidable rejection, not an infinite KL."""
  config, _, _ = tiny_pair
  teacher = jax.nn.softmax(jax.random.normal(jax.random.key(0), (6, config.vocab_size)))
  ids = np.array(LOOP_IDS)

  def loss(scores):
    logits = jnp.full((6, config.vocab_size), -jnp.inf).at[:, ids].set(scores)
    return losses.divergence(teacher, logits, jnp.ones(6), kl_weight=0.5)[0]

  scores = jax.random.normal(jax.random.key(1), (6, len(ids)))
  value, grad = jax.value_and_grad(loss)(scores)
  assert np.isfinite(value) and np.all(np.isfinite(grad)) and np.any(grad != 0)
  # The rejection part: 1 - sum over the ids of min(p, q) >= the teacher's mass outside the ids.
  outside = 1 - teacher[:, ids].sum(-1)
  rejection = losses.expected_rejection(teacher, jax.nn.log_softmax(
      jnp.full((6, config.vocab_size), -jnp.inf).at[:, ids].set(scores)))
  assert np.all(rejection >= outside - 1e-6)


def test_frequent_ids_rank_by_count_then_id():
  sequences = np.array([[5, 5, 5, 2, 2, 9, 9, 1]])
  np.testing.assert_array_equal(drafters.frequent_ids(sequences, 3, 16), [2, 5, 9])
  np.testing.assert_array_equal(drafters.frequent_ids(sequences, 4, 16), [1, 2, 5, 9])
  with pytest.raises(ValueError, match="draft_vocab"):
    drafters.frequent_ids(sequences, 0, 16)


def test_acceptance_table_measures_eagle_with_the_engine(tiny_pair, eagle):
  """An EAGLE drafter's rows are the engine's own rounds (its law within a round depends on where
  the round began, so no teacher-forced pass gives them), per budget and prompt."""
  from budgetdraft.evaluation import acceptance
  from budgetdraft.models.checkpoint_io import Checkpoint
  config, params, _ = tiny_pair
  drafter_config, drafter_params = eagle
  verifier = Checkpoint(path="tiny", config=config, params=params, tokenizer=None)
  windows = np.array([PROMPTS[0], list(range(10, 97))])
  rows = acceptance.acceptance_vs_budget(
      verifier, {"eagle": eagle}, {100: windows}, [TINY_SPARSITY, None], gamma=3,
      max_new_tokens=16, prefill_chunk=32)
  for row, sparsity in zip(rows, [TINY_SPARSITY, None]):
    spec = speculative.SpeculativeConfig(gamma=3, rule="block", max_new_tokens=16,
                                         prefill_chunk=32, sparsity=sparsity)
    per_prompt = [speculative.generate(params, drafter_params, [window.tolist()],
                                       jax.random.key(1), verifier_config=config,
                                       drafter_config=drafter_config, spec=spec)[1]
                  for window in windows]
    pooled = per_prompt[0] + per_prompt[1]
    assert row["tokens/call"] == pooled.tokens_per_call
    assert row["greedy acceptance"] == pooled.acceptance_rate
    assert row[acceptance.PER_PROMPT] == pytest.approx([p.tokens_per_call for p in per_prompt],
                                                       abs=1e-4)
    assert np.isnan(row["sum min(p,q) T=1"])
  assert 1 < rows[0]["tokens/call"] < 4  # partly accepted: the replay is not trivially 1 or 4


def test_a_table_leaves_its_prompts_the_positions_the_engine_reserves(tiny_pair, eagle):
  """The engine (EAGLE rows) reserves one position more than the teacher-forced path: prompts of
  max_context - `positions_after_prompt` tokens fit both, one token more fails the engine only."""
  from budgetdraft.evaluation import acceptance
  from budgetdraft.models.checkpoint_io import Checkpoint
  config, params, _ = tiny_pair
  short = dataclasses.replace(config, max_context=120)
  verifier = Checkpoint(path="tiny", config=short, params=params, tokenizer=None)
  itself, with_eagle = {"self": (short, params)}, {"self": (short, params), "eagle": eagle}
  gamma, new_tokens = 3, 16
  free = {label: acceptance.positions_after_prompt(models, gamma=gamma,
                                                   max_new_tokens=new_tokens)
          for label, models in (("self", itself), ("eagle", with_eagle))}
  assert free == {"self": new_tokens + gamma, "eagle": new_tokens + gamma + 1}
  table = lambda models, length: acceptance.acceptance_vs_budget(
      verifier, models, {120: np.arange(3, 3 + length)[None]}, [None], gamma=gamma,
      max_new_tokens=new_tokens, prefill_chunk=32)
  assert len(table(with_eagle, 120 - free["eagle"])) == 2
  assert len(table(itself, 120 - free["self"])) == 1
  with pytest.raises(ValueError, match="exceeds the model's context of 120"):
    table(with_eagle, 120 - free["self"])
