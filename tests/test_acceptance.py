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


class _DigitTokenizer:
  def decode(self, tokens):
    return " ".join(map(str, tokens))

  def encode(self, text):
    return [int(word) for word in text.split() if word.isdigit()]


def test_the_table_counts_the_verifier_retrievals_and_accepts_the_verifier_fully(tiny_pair):
  """Every (drafter, budget) row; the verifier drafting for itself over its full cache is always
  accepted; with answers, `verifier retrieved` counts the greedy continuations that hold one."""
  from budgetdraft.models.checkpoint_io import Checkpoint
  config, params, drafter = tiny_pair
  verifier = Checkpoint(path="tiny", config=config, params=params, tokenizer=_DigitTokenizer())
  windows = np.array([list(range(3, 90)), list(range(10, 97))])
  greedy = autoregressive.generate(params, [windows[0].tolist()], jax.random.key(0),
                                   config=config, max_new_tokens=NEW_TOKENS, prefill_chunk=CHUNK)[0]
  answers = {100: [" ".join(map(str, greedy[:4])), "no such answer"]}
  rows = acceptance.acceptance_vs_budget(
      verifier, {"self": (config, params), "other": (config, drafter)}, {100: windows},
      [TINY_SPARSITY.budget, None], TINY_SPARSITY, gamma=GAMMA, max_new_tokens=NEW_TOKENS,
      prefill_chunk=CHUNK, answers=answers)
  assert [(r["drafter"], r["budget"]) for r in rows] == [
      ("self", TINY_SPARSITY.budget), ("self", "full"), ("other", TINY_SPARSITY.budget),
      ("other", "full")]
  assert rows[1]["greedy acceptance"] == 1.0 and rows[1]["sum min(p,q) T=1"] == pytest.approx(1)
  assert {r["verifier retrieved"] for r in rows} == {"1/2"}
  assert rows[1]["answer match"] == 1.0 and 0 <= rows[2]["answer match"] <= 1
