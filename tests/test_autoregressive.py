"""The jitted AR loop against a naive re-run-everything argmax loop, plus stops, sampling and limits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.decoding import autoregressive
from budgetdraft.decoding.sampling import SamplingConfig, probabilities, sample
from tests.test_transformer import full_logits


def naive_greedy(config, params, prompt, num_tokens, width=64):
  """Re-runs the whole (zero-padded, causal so padding is unseen) sequence for every token."""
  tokens = list(prompt)
  for _ in range(num_tokens):
    padded = jnp.asarray([tokens + [0] * (width - len(tokens))])
    tokens.append(int(jnp.argmax(full_logits(config, params, padded)[0, len(tokens) - 1])))
  return tokens[len(prompt):]


def test_greedy_matches_naive_loop_on_ragged_batch(tiny_model):
  config, params = tiny_model
  prompts = [list(range(5, 30)), [7, 8, 9], list(range(100, 140))]
  out = autoregressive.generate(params, prompts, jax.random.key(0), config=config,
                                max_new_tokens=12, prefill_chunk=16)
  for prompt, generated in zip(prompts, out):
    assert generated == naive_greedy(config, params, prompt, 12)


def test_eos_stops_each_row_independently(tiny_model):
  config, params = tiny_model
  prompts = [list(range(5, 30)), [7, 8, 9]]
  free = autoregressive.generate(params, prompts, jax.random.key(0), config=config,
                                 max_new_tokens=8, prefill_chunk=16)
  eos = free[0][2]  # the third token of row 0 becomes EOS
  out = autoregressive.generate(params, prompts, jax.random.key(0), config=config,
                                max_new_tokens=8, eos_id=eos, prefill_chunk=16)
  assert out[0] == free[0][:3]
  stop = free[1].index(eos) + 1 if eos in free[1] else 8
  assert out[1] == free[1][:stop]


def test_sampling_is_reproducible_and_seed_dependent(tiny_model):
  config, params = tiny_model
  sampling = SamplingConfig(temperature=1.0, top_p=0.95)
  run = lambda seed: autoregressive.generate(params, [[1, 2, 3]] * 4, jax.random.key(seed),
                                             config=config, max_new_tokens=10, sampling=sampling,
                                             prefill_chunk=8)
  assert run(0) == run(0)
  assert run(0) != run(1)


def test_first_sampled_token_follows_the_model_distribution(tiny_model):
  """Chi-square over 4000 rows: the sampled first token ~ softmax(logits / T)."""
  from scipy import stats
  config, params = tiny_model
  sampling = SamplingConfig(temperature=1.5)
  prompt = [3, 1, 4, 1, 5]
  out = autoregressive.generate(params, [prompt] * 4000, jax.random.key(7), config=config,
                                max_new_tokens=1, sampling=sampling, prefill_chunk=8)
  probs = np.asarray(probabilities(full_logits(config, params, jnp.asarray([prompt]))[0, -1],
                                   sampling), np.float64)
  counts = np.bincount([row[0] for row in out], minlength=config.vocab_size)
  frequent = probs * 4000 >= 5  # pool the rare tokens into one cell
  assert counts[probs == 0].sum() == 0
  observed = np.append(counts[frequent], counts[~frequent].sum())
  expected = np.append(probs[frequent], probs[~frequent].sum()) * 4000
  observed, expected = observed[expected > 0], expected[expected > 0]
  assert stats.chisquare(observed, expected / expected.sum() * observed.sum()).pvalue > 1e-3


def test_top_p_keeps_the_smallest_nucleus():
  probs = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  kept = probabilities(probs, SamplingConfig(temperature=1.0, top_p=0.7))
  np.testing.assert_allclose(kept, [0.625, 0.375, 0.0, 0.0], atol=1e-6)
  greedy = probabilities(probs, SamplingConfig())
  np.testing.assert_array_equal(greedy, [1.0, 0.0, 0.0, 0.0])


def test_rejects_requests_beyond_the_context(tiny_model):
  config, params = tiny_model
  short = dataclasses.replace(config, max_context=32)
  with pytest.raises(ValueError, match="exceeds the model's context of 32"):
    autoregressive.generate(params, [list(range(30))], jax.random.key(0), config=short,
                            max_new_tokens=3)
  with pytest.raises(ValueError, match="at least one token"):
    autoregressive.generate(params, [[]], jax.random.key(0), config=config, max_new_tokens=3)
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig(temperature=-1.0)


@pytest.mark.parametrize("prompt, pad_id, eos_id, message", [
    ([3, 256, 4], 0, None, "prompt 1 holds token id 256 at position 1"),
    ([3, -1], 0, None, "token id -1 at position 1"),
    ([3, 4], 256, None, "pad_id=256 is not a token id"),
    ([3, 4], -2, None, "pad_id=-2"),
    ([3, 4], 0, 300, "eos_id=300"),
])
def test_rejects_ids_outside_the_vocabulary(tiny_model, prompt, pad_id, eos_id, message):
  config, params = tiny_model  # vocabulary of 256
  with pytest.raises(ValueError, match=message):
    autoregressive.generate(params, [[5, 6], prompt], jax.random.key(0), config=config,
                            max_new_tokens=2, pad_id=pad_id, eos_id=eos_id)


@pytest.mark.parametrize("fields", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(top_p=float("nan"))])
def test_rejects_non_finite_sampling_settings(fields):
  with pytest.raises(ValueError, match="temperature|top_p"):
    SamplingConfig(**fields)


def test_zero_new_tokens_is_an_error(tiny_model):
  """AR and speculative decoding agree: max_new_tokens must be >= 1."""
  config, params = tiny_model
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    autoregressive.generate(params, [[1, 2, 3]], jax.random.key(0), config=config,
                            max_new_tokens=0)


def test_a_greedy_sample_is_the_draw_of_its_one_hot_rows():
  """Under a greedy config `sample` skips the random draw; the token is the one a draw gives."""
  logits = jax.random.normal(jax.random.key(0), (6, 300)) * 3
  greedy = SamplingConfig(temperature=0.0)
  one_hot = probabilities(logits, greedy)
  for seed in range(3):
    drawn = sample(jax.random.key(seed), one_hot)
    np.testing.assert_array_equal(sample(jax.random.key(seed), one_hot, greedy), drawn)
  np.testing.assert_array_equal(drawn, jnp.argmax(logits, -1))
