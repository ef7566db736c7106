"""Teacher-forced acceptance replays the speculative engine exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.evaluation import acceptance, results
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
  streaming = dataclasses.replace(TINY_SPARSITY, policy="streaming")
  rows = acceptance.acceptance_vs_budget(
      verifier, {"self": (config, params), "other": (config, drafter)}, {100: windows},
      [TINY_SPARSITY, streaming, None], gamma=GAMMA, max_new_tokens=NEW_TOKENS,
      prefill_chunk=CHUNK, answers=answers)
  budget = TINY_SPARSITY.budget
  assert [(r["drafter"], r["policy"], r["budget"]) for r in rows] == [
      (label, policy, size) for label in ("self", "other")
      for policy, size in ((TINY_SPARSITY.policy, budget), ("streaming", budget),
                           ("full KV", "full"))]
  full = rows[2]
  assert full["greedy acceptance"] == 1.0 and full["sum min(p,q) T=1"] == pytest.approx(1)
  assert full["tokens/call s.e."] == 0.0 and full["sum min(p,q) s.e."] < 1e-5
  assert {r["verifier retrieved"] for r in rows} == {"1/2"}
  assert full["answer match"] == 1.0 and 0 <= rows[3]["answer match"] <= 1
  assert rows[3]["sum min(p,q) s.e."] > 0  # another drafter: its overlap differs per prompt
  assert full[acceptance.PER_PROMPT] == [GAMMA + 1] * 2
  for row in rows:  # the per-prompt values are the ones behind the mean and standard error
    for key, error in ((acceptance.PER_PROMPT, "tokens/call s.e."),
                       (acceptance.PER_PROMPT_OVERLAP, "sum min(p,q) s.e.")):
      assert len(row[key]) == 2
      assert results.mean_and_error(row[key])[1] == pytest.approx(row[error], abs=1e-3)
    assert np.mean(row[acceptance.PER_PROMPT_OVERLAP]) == pytest.approx(
        row["sum min(p,q) T=1"], abs=1e-4)


def test_the_verifier_drafting_for_itself_shares_its_prefill_exactly(tiny_pair):
  """The verifier's own params object as a drafter reuses the verifier's prefill; a copy of the
  params (prefilled on its own) gives the same rows."""
  from budgetdraft.models.checkpoint_io import Checkpoint
  config, params, _ = tiny_pair
  verifier = Checkpoint(path="tiny", config=config, params=params, tokenizer=None)
  copy = jax.tree.map(jnp.array, params)
  rows = acceptance.acceptance_vs_budget(
      verifier, {"self": (config, params), "copy": (config, copy)},
      {100: np.array([list(range(3, 90))])}, [TINY_SPARSITY, None], gamma=GAMMA,
      max_new_tokens=NEW_TOKENS, prefill_chunk=CHUNK)
  shared, alone = rows[:2], rows[2:]
  for a, b in zip(shared, alone):
    for key in (acceptance.PER_PROMPT, acceptance.PER_PROMPT_OVERLAP):
      assert a.pop(key) == pytest.approx(b.pop(key), abs=1e-4)
    assert {**a, "drafter": "copy"} == pytest.approx(b, nan_ok=True)
  assert shared[0]["greedy acceptance"] < 1  # the sparse row differs from the full one


def test_each_policy_scores_once_for_all_its_budgets(tiny_pair, monkeypatch):
  """Budgets share their policy's scores (H2O's cost a second prefill), and a budget sliced
  from shared scores gives the logits of its own selection."""
  config, params, _ = tiny_pair
  prompt = jnp.array([list(range(3, 90))])
  fed = jnp.array([list(range(90, 90 + NEW_TOKENS))])
  calls = []
  scored = acceptance.policy_scores
  monkeypatch.setattr(acceptance, "policy_scores",
                      lambda *args: calls.append(args[5].policy) or scored(*args))
  sparsities = [dataclasses.replace(TINY_SPARSITY, budget=b) for b in (24, 40)]
  shared = acceptance.teacher_forced_logits(config, params, prompt, fed, sparsities + [None],
                                            gamma=GAMMA, prefill_chunk=CHUNK,
                                            rng=jax.random.key(0))
  assert calls == [TINY_SPARSITY.policy]
  for sparsity, logits in zip(sparsities, shared):
    alone, = acceptance.teacher_forced_logits(config, params, prompt, fed, [sparsity],
                                              gamma=GAMMA, prefill_chunk=CHUNK,
                                              rng=jax.random.key(0))
    np.testing.assert_allclose(logits, alone, atol=1e-5)
  assert not np.allclose(shared[0], shared[1], atol=1e-3)  # the budgets kept different keys


def test_paired_gaps_compare_two_drafters_prompt_by_prompt():
  """The gaps are means of per-prompt differences (a hard prompt hurts both drafters and
  cancels), the share each prompt's budget value over its own full-cache value."""
  row = lambda drafter, policy, budget, values, overlaps: {
      "context": 8, "drafter": drafter, "policy": policy, "budget": budget,
      acceptance.PER_PROMPT: values, acceptance.PER_PROMPT_OVERLAP: overlaps}
  rows = [row("a", "snapkv", 4, [3.0, 4.0, 2.0], [0.6, 0.9, 0.5]),
          row("a", "full KV", "full", [4.0, 4.0, 4.0], [1.0, 1.0, 1.0]),
          row("b", "snapkv", 4, [2.0, 3.5, 2.0], [0.5, 0.5, 0.5]),
          row("b", "full KV", "full", [4.0, 4.0, 4.0], [1.0, 1.0, 1.0])]
  sparse, full = acceptance.paired_gaps(rows, "a", "b")
  assert (sparse["policy"], sparse["budget"], sparse["baseline"]) == ("snapkv", 4, "b")
  assert sparse["gap"] == pytest.approx(0.5) and sparse["gap s.e."] == pytest.approx(0.5 / 3**.5)
  assert sparse["share of own full"] == pytest.approx(0.75)
  assert sparse["share s.e."] == pytest.approx(0.25 / 3**.5)
  assert sparse["T=1 gap"] == pytest.approx(0.5 / 3)  # differences 0.1, 0.4, 0
  assert sparse["T=1 gap s.e."] == pytest.approx(np.std([0.1, 0.4, 0.0], ddof=1) / 3**.5)
  assert (full["gap"], full["gap s.e."], full["share of own full"]) == (0.0, 0.0, 1.0)
  assert (full["T=1 gap"], full["T=1 gap s.e."]) == (0.0, 0.0)
  with pytest.raises(ValueError, match="'c' has no row"):
    acceptance.paired_gaps(rows, "a", "c")
