"""Teacher-forced acceptance replays the speculative engine exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.evaluation import acceptance
from tests.test_speculative import TINY_SPARSITY, tiny_pair  # noqa: F401 (fixture)

GAMMA, NEW_TOKENS, CHUNK = 3, 10, 32


def test_greedy_rounds_on_hand_made_matches():
  # Round 1 from token 0: drafts match tokens 1, 2, then miss -> 2 accepted, 3 emitted (0..3).
  # Round 2 from token 3: all three match -> 3 accepted, emitted 0..7 (8 tokens) >= 7.
  matches = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0], bool)
  assert acceptance.greedy_rounds(matches, gamma=3, num_tokens=7).counts == (0, 0, 1, 1)
  assert acceptance.greedy_rounds(np.zeros(9, bool), gamma=3, num_tokens=7).counts == (6, 0, 0, 0)


@pytest.mark.parametrize("sparsity", [None, TINY_SPARSITY])
def test_teacher_forced_replay_equals_the_engine(tiny_pair, sparsity):
  config, params, drafter = tiny_pair
  prompt = list(range(3, 90))
  greedy = autoregressive.generate(params, [prompt], jax.random.key(0), config=config,
                                   max_new_tokens=NEW_TOKENS + GAMMA, prefill_chunk=CHUNK)[0]
  prompt_array, fed = jnp.array([prompt]), jnp.array([greedy[:-1]])

  def logits(model_params, sparsity):
    return acceptance.teacher_forced_logits(config, model_params, prompt_array, fed, [sparsity],
                                            gamma=GAMMA, prefill_chunk=CHUNK,
                                            rng=jax.random.key(0))[0]

  verifier_logits = logits(params, None)
  np.testing.assert_array_equal(np.argmax(verifier_logits, -1), greedy[1:])
  overlap, stats = acceptance.path_statistics(verifier_logits, logits(drafter, sparsity),
                                              np.array(greedy), GAMMA, NEW_TOKENS)
  spec = speculative.SpeculativeConfig(gamma=GAMMA, rule="greedy", max_new_tokens=NEW_TOKENS,
                                       prefill_chunk=CHUNK, sparsity=sparsity)
  _, engine = speculative.generate(params, drafter, [prompt], jax.random.key(1),
                                   verifier_config=config, drafter_config=config, spec=spec)
  assert stats == engine  # the same rounds with the same accepted lengths
  assert 0 < stats.accepted < stats.rounds * GAMMA
  assert 0 < overlap < 1
