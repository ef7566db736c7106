"""A drafter's acceptance along the verifier's greedy path, measured teacher-forced.

In greedy speculative decoding every committed token is the verifier's greedy token, so the
drafter's state in every round is fixed by the verifier's greedy continuation y: kept prompt keys
(or the full prompt) plus y's keys in the ring. Feeding y once, teacher-forced
(`teacher_forced_logits`), therefore gives the drafter's exact law at every position (as long as y
fits the ring: no eviction), a drafted token is accepted iff the drafter's argmax after y_i is
y_{i+1}, and the engine's rounds are a replay of those matches (`greedy_rounds`). One drafter
forward per (drafter, budget) yields the engine's acceptance and tokens per call, and also
sum_v min(p, q): the expected acceptance of token-wise speculative sampling at temperature 1 on
the same path.
"""

import dataclasses
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.data import retrieval
from budgetdraft.decoding import autoregressive
from budgetdraft.decoding.speculative import RoundStats
from budgetdraft.evaluation import results
from budgetdraft.models import prefill
from budgetdraft.models.checkpoint_io import Checkpoint
from budgetdraft.models.config import ModelConfig
from budgetdraft.sparsity import selection

# The drafter's sparse cache after its prefill, as decoding builds it (jitted once per shape).
sparse_cache = jax.jit(selection.sparse_cache, static_argnames=("config", "sparsity", "gamma"))


def greedy_rounds(matches: np.ndarray, gamma: int, num_tokens: int) -> RoundStats:
  """The rounds of greedy speculative decoding emitting num_tokens tokens.

  matches[i]: the drafter's argmax after greedy token i is greedy token i + 1 (token 0 comes from
  the prefill). Each round drafts gamma tokens from the last emitted one, accepts the matching
  prefix and emits one more token; like the engine, the last round may run past num_tokens.
  """
  emitted, runs = 1, []
  while emitted < num_tokens:
    run = 0
    while run < gamma and emitted - 1 + run < len(matches) and matches[emitted - 1 + run]:
      run += 1
    runs.append(run)
    emitted += run + 1
  return RoundStats.of_rounds(runs, gamma)


def path_statistics(verifier_logits, drafter_logits, greedy_tokens, gamma: int,
                    num_tokens: int) -> tuple[float, RoundStats]:
  """(mean sum_v min(p, q) at temperature 1, greedy `RoundStats`) of one prompt.

  verifier_logits, drafter_logits: [N, V] after greedy tokens 0..N-1; greedy_tokens: [N + 1].
  """
  p = jax.nn.softmax(verifier_logits.astype(jnp.float32), axis=-1)
  q = jax.nn.softmax(drafter_logits.astype(jnp.float32), axis=-1)
  overlap = np.asarray(jnp.minimum(p, q).sum(-1))
  matches = np.asarray(jnp.argmax(drafter_logits, -1)) == np.asarray(greedy_tokens[1:])
  return float(overlap[:num_tokens - 1].mean()), greedy_rounds(matches, gamma, num_tokens)


def teacher_forced_logits(config: ModelConfig, params, prompt, continuation, sparsities, *,
                          gamma: int, prefill_chunk: int, rng) -> list:
  """Logits [C, V] of the continuation [1, C] after the prompt [1, P], one per entry of
  `sparsities`: None = over the full cache, else over the drafter's sparse cache (as decoding
  builds it: `selection.sparse_cache`). The prompt is prefilled once for all of them."""
  for sparsity in sparsities:
    if sparsity is not None and continuation.shape[1] > sparsity.ring_size(gamma):
      raise ValueError(f"continuation of {continuation.shape[1]} tokens overflows the ring of "
                       f"{sparsity.ring_size(gamma)}: teacher forcing would differ from decoding")
  cache = prefill.prefill_cache(params, prompt, config=config,
                                capacity=prompt.shape[1] + continuation.shape[1],
                                prefill_chunk=prefill_chunk)
  logits = []
  for sparsity in sparsities:
    drafter_cache = cache if sparsity is None else sparse_cache(
        config, params, cache, prompt, cache.length, sparsity, gamma, rng)
    logits.append(prefill.continuation_logits(params, drafter_cache, continuation,
                                              config=config)[0])
  return logits


def acceptance_vs_budget(verifier: Checkpoint, drafters: dict, prompts: dict, budgets: list,
                         sparsity: selection.SparsityConfig, *, gamma: int, max_new_tokens: int,
                         prefill_chunk: int, answers: dict | None = None) -> list[dict]:
  """Rows (context, drafter, budget, greedy acceptance, tokens/call, sum min(p,q) T=1).

  drafters: {label: (config, params)}; prompts: {context: [N, P] prompt tokens}; budgets: kept
  keys per layer and KV head (None = the full cache); sparsity: policy and sizes (budget unset).
  answers: {context: [text that correctly continues each prompt]} for retrieval tasks; the rows
  then count the verifier's greedy continuations that hold it (`verifier retrieved`), and give
  the drafter's agreement with the verifier on the answer's drafted tokens (`answer match`: its
  tokens after the first, which the verifier emits itself): what only distant context holds.
  """
  sparsities = [None if b is None else dataclasses.replace(sparsity, budget=b) for b in budgets]
  rows = []
  for context, windows in prompts.items():
    totals, hits, answer_matches = {}, 0, {}
    for prompt_index, window in enumerate(windows):
      started = time.time()
      prompt = jnp.asarray(window[None])
      greedy = np.array(autoregressive.generate(
          verifier.params, [window.tolist()], jax.random.key(0), config=verifier.config,
          max_new_tokens=max_new_tokens + gamma, prefill_chunk=prefill_chunk)[0])
      fed = jnp.asarray(greedy[None, :-1])
      if answers:
        answer = answers[context][prompt_index]
        hits += retrieval.retrieved(verifier.tokenizer.decode(greedy[:max_new_tokens].tolist()),
                                    answer)
        span = max(0, min(len(verifier.tokenizer.encode(answer)), max_new_tokens) - 1)
      logits = lambda config, params, sparsities: teacher_forced_logits(
          config, params, prompt, fed, sparsities, gamma=gamma, prefill_chunk=prefill_chunk,
          rng=jax.random.key(0))
      verifier_logits, = logits(verifier.config, verifier.params, [None])
      for label, (config, params) in drafters.items():
        for budget, drafter_logits in zip(budgets, logits(config, params, sparsities)):
          overlap, stats = path_statistics(verifier_logits, drafter_logits, greedy, gamma,
                                           max_new_tokens)
          total_overlap, total_stats = totals.get((label, budget),
                                                  (0.0, RoundStats.of_rounds([], gamma)))
          totals[(label, budget)] = (total_overlap + overlap, total_stats + stats)
          if answers:
            agree = np.asarray(jnp.argmax(drafter_logits[:span], -1)) == greedy[1:span + 1]
            answer_matches.setdefault((label, budget), []).extend(agree.tolist())
      logging.info("context %d prompt %d/%d measured in %.0f s", context, prompt_index + 1,
                   len(windows), time.time() - started)
    for (label, budget), (overlap, stats) in totals.items():
      rows.append({"context": context, "drafter": label, "budget": budget or "full",
                   "greedy acceptance": stats.acceptance_rate,
                   "tokens/call": stats.tokens_per_call,
                   "sum min(p,q) T=1": overlap / len(windows)})
      if answers:
        rows[-1]["verifier retrieved"] = f"{hits}/{len(windows)}"
        rows[-1]["answer match"] = float(np.mean(answer_matches[(label, budget)]))
  return rows


def plot(rows: list[dict], path: str) -> None:
  """Tokens per verifier call vs budget, one panel per context, one line per drafter."""
  panels = {}
  for row in rows:
    series = panels.setdefault(f"{row['context'] // 1024}K context", {})
    series.setdefault(row["drafter"], []).append((row["budget"], row["tokens/call"]))
  results.plot_lines(path, panels, "drafter KV budget (kept prompt keys per layer and head)",
                     "tokens per verifier call (greedy)")
