"""Lost positions: the per-position matches replay the acceptance table, and the kept share of a
prompt span is exact for a cache whose kept keys are known."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.data.retrieval import TaskPrompt
from budgetdraft.evaluation import acceptance, lost_positions
from budgetdraft.models.checkpoint_io import Checkpoint
from tests.test_acceptance import CHUNK, GAMMA, NEW_TOKENS, _DigitTokenizer
from tests.test_speculative import TINY_SPARSITY, tiny_pair  # noqa: F401 (fixture)

STREAMING = dataclasses.replace(TINY_SPARSITY, policy="streaming")
SPAN = (40, 50)  # inside the prompt, outside a streaming cache's sinks and recent keys


def test_position_matches_replay_the_table_and_say_which_keys_a_cache_kept(tiny_pair):
  """Per position, the drafter's matches give the table's rounds; the verifier drafting for
  itself matches every position over its full cache; a streaming cache keeps exactly its sinks
  and the prompt's last keys, and `span_kept` says so of spans inside and outside them."""
  config, params, drafter = tiny_pair
  verifier = Checkpoint(path="tiny", config=config, params=params, tokenizer=None)
  window = np.arange(3, 90)
  sparsities = [TINY_SPARSITY, STREAMING, None]
  rows = acceptance.acceptance_vs_budget(
      verifier, {"other": (config, drafter)}, {100: window[None]}, sparsities, gamma=GAMMA,
      max_new_tokens=NEW_TOKENS, prefill_chunk=CHUNK)
  measured = lost_positions.position_matches(verifier, config, drafter, window, SPAN, sparsities,
                                             gamma=GAMMA, max_new_tokens=NEW_TOKENS,
                                             prefill_chunk=CHUNK)
  assert len(measured["greedy"]) == NEW_TOKENS + GAMMA
  for row, drafted in zip(rows, measured["drafted"]):
    matches = drafted == measured["greedy"][1:]
    assert acceptance.greedy_rounds(matches, GAMMA, NEW_TOKENS).tokens_per_call == row[
        "tokens/call"]
  itself = lost_positions.position_matches(verifier, config, params, window, SPAN, [None],
                                           gamma=GAMMA, max_new_tokens=NEW_TOKENS,
                                           prefill_chunk=CHUNK)
  np.testing.assert_array_equal(itself["drafted"][0], itself["greedy"][1:])
  assert measured["kept"][2] is None and itself["kept"] == [None]

  cache, = acceptance.drafter_caches(config, params, jnp.asarray(window[None]), [STREAMING],
                                     continuation_length=NEW_TOKENS, gamma=GAMMA,
                                     prefill_chunk=CHUNK, rng=jax.random.key(0))
  recent = len(window) - (STREAMING.budget - STREAMING.sinks)  # the first recent key kept
  assert recent > SPAN[1]
  for span, share in [((0, STREAMING.sinks), 1.0), ((STREAMING.sinks, recent), 0.0),
                      ((recent, len(window)), 1.0), ((0, 2 * STREAMING.sinks), 0.5)]:
    np.testing.assert_array_equal(lost_positions.span_kept(cache, span),
                                  np.full(config.num_layers, share))
  np.testing.assert_array_equal(measured["kept"][1], np.zeros(config.num_layers))


def test_a_lost_token_is_marked_with_the_drafters_guess():
  assert lost_positions.marked(_DigitTokenizer(), [1, 2, 3, 4], [2, 9, 4]) == "12[3 -> 9]4"


def test_the_table_splits_the_answer_from_the_rest_and_marks_one_path(tiny_pair):
  """A row per (context, cache) and per prompt; over its full cache the verifier drafting for
  itself matches everything and keeps the whole inserted text; the marked path of the first
  prompt whose output holds the answer shows the full cache's line unmarked."""
  config, params, _ = tiny_pair
  tokenizer = _DigitTokenizer()
  verifier = Checkpoint(path="tiny", config=config, params=params, tokenizer=tokenizer)
  windows = [list(range(3, 90)), list(range(10, 97))]
  greedy = acceptance.greedy_path(verifier, windows[1], length=NEW_TOKENS, prefill_chunk=CHUNK)
  answer = " " + " ".join(map(str, greedy[:6]))
  prompts = [TaskPrompt(windows[0], "no such answer", "copy", 0.1, SPAN),
             TaskPrompt(windows[1], answer, "copy", 0.5, SPAN)]
  sparsities = [TINY_SPARSITY, STREAMING, None]
  rows, per_prompt, (example,) = lost_positions.lost_positions(
      verifier, config, params, {100: prompts}, {100: sparsities}, gamma=GAMMA,
      max_new_tokens=NEW_TOKENS, prefill_chunk=CHUNK)
  assert [r["drafter cache"] for r in rows] == [
      f"snapkv {TINY_SPARSITY.budget}", f"streaming {STREAMING.budget}", "full KV"]
  assert [(r["drafter cache"], r["verifier retrieved"]) for r in per_prompt] == [
      (r["drafter cache"], hit) for r in rows for hit in (False, True)]
  full = rows[2]
  assert full["verifier retrieved"] == "1/2"
  assert full["answer matched"] == full["rest matched"] == full["inserted text kept"] == 1.0
  assert rows[1]["inserted text kept"] == 0.0  # streaming keeps none of the span
  assert rows[0]["answer matched"] < 1 or rows[0]["rest matched"] < 1
  assert f"prompt 1 (depth 0.5, answer {answer!r})" in example
  assert "full KV: " + "".join(map(str, greedy)) + "\n" in example
