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

An EAGLE-style drafter (`feature_dim`) is the exception: within a round it feeds its own hidden
states, so its law at a position depends on where the round began. It is measured by the greedy
engine itself (`engine_statistics`: one prefill, then the rounds, per budget), whose output is
checked against the verifier's greedy path; its sum min(p, q) is not given by one pass: nan.
"""

import dataclasses
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.data import retrieval
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.decoding.speculative import RoundStats
from budgetdraft.evaluation import results
from budgetdraft.models import prefill
from budgetdraft.models.checkpoint_io import Checkpoint
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.transformer import unroll
from budgetdraft.sparsity import policies, selection

# The drafter's sparse cache after its prefill, as decoding builds it (jitted once per shape).
sparse_cache = jax.jit(selection.sparse_cache, static_argnames=("config", "sparsity", "gamma"))
policy_scores = jax.jit(policies.policy_scores, static_argnames=("config", "sparsity"))


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


def drafter_caches(config: ModelConfig, params, prompt, sparsities, *, continuation_length: int,
                   gamma: int, prefill_chunk: int, rng) -> list:
  """The drafter's cache after its prefill of the prompt [1, P], one per entry of `sparsities`:
  None = the full cache (room for continuation_length more tokens), else the sparse cache as
  decoding builds it (`selection.sparse_cache`). The prompt is prefilled once for all of them, and
  each policy scores it once for all its budgets (H2O's scores cost a second prefill)."""
  for sparsity in sparsities:
    if sparsity is not None and continuation_length > sparsity.ring_size(gamma):
      raise ValueError(f"continuation of {continuation_length} tokens overflows the ring of "
                       f"{sparsity.ring_size(gamma)}: teacher forcing would differ from decoding")
  cache = prefill.prefill_cache(params, prompt, config=config,
                                capacity=prompt.shape[1] + continuation_length,
                                prefill_chunk=prefill_chunk)
  lengths = cache.length
  scores, caches = {}, []
  for sparsity in sparsities:
    if sparsity is None:
      caches.append(cache)
      continue
    unbudgeted = dataclasses.replace(sparsity, budget=None)  # scores do not depend on it
    if unbudgeted not in scores:
      scores[unbudgeted] = policy_scores(config, params, cache, prompt, lengths, unbudgeted, rng)
    caches.append(sparse_cache(config, params, cache, prompt, lengths, sparsity, gamma, rng,
                               scores=scores[unbudgeted]))
  return caches


def teacher_forced_logits(config: ModelConfig, params, prompt, continuation, sparsities, *,
                          gamma: int, prefill_chunk: int, rng) -> list:
  """Logits [C, V] of the continuation [1, C] after the prompt [1, P] over each of the drafter's
  caches (`drafter_caches`, one per entry of `sparsities`)."""
  caches = drafter_caches(config, params, prompt, sparsities,
                          continuation_length=continuation.shape[1], gamma=gamma,
                          prefill_chunk=prefill_chunk, rng=rng)
  return [prefill.continuation_logits(params, cache, continuation, config=config)[0]
          for cache in caches]


def greedy_path(verifier: Checkpoint, window, *, length: int, prefill_chunk: int) -> np.ndarray:
  """The verifier's greedy continuation [length] of one prompt [P] (AR decoding)."""
  return np.array(autoregressive.generate(
      verifier.params, [np.asarray(window).tolist()], jax.random.key(0), config=verifier.config,
      max_new_tokens=length, prefill_chunk=prefill_chunk)[0])


def engine_statistics(verifier_config: ModelConfig, verifier_params, config: ModelConfig,
                      params, prompt, sparsities, *, gamma: int, max_new_tokens: int,
                      prefill_chunk: int) -> list[tuple[list[int], RoundStats]]:
  """(emitted tokens, greedy `RoundStats`) of the speculative engine for each entry of
  `sparsities` (None = the drafter's full cache), both models prefilled once for all of them.
  The verifier runs as given (pass it in the decoding layout: `transformer.unroll`)."""
  specs = [speculative.SpeculativeConfig(gamma=gamma, rule="greedy",
                                         max_new_tokens=max_new_tokens,
                                         prefill_chunk=prefill_chunk, sparsity=sparsity)
           for sparsity in sparsities]
  lengths = jnp.array([prompt.shape[1]], jnp.int32)
  capacity = prefill.check_request(verifier_config, prompt.shape[1],
                                   speculative.positions_after_prompt(specs[0]), prefill_chunk)
  logits, verifier_cache, drafter_cache, hidden = speculative.prefill_caches(
      verifier_params, params, prompt, lengths, verifier_config=verifier_config,
      drafter_config=config, capacity=capacity, prefill_chunk=prefill_chunk)
  measured = []
  for spec in specs:
    state = speculative.begin(params, logits, verifier_cache, drafter_cache, prompt, lengths,
                              jax.random.key(0), hidden, drafter_config=config, spec=spec)
    state = speculative.decode(verifier_params, params, state, verifier_config=verifier_config,
                               drafter_config=config, spec=spec)
    (tokens,), stats = speculative.outputs_and_stats(state, spec)
    measured.append((tokens, stats))
  return measured


def positions_after_prompt(drafters: dict, *, gamma: int, max_new_tokens: int) -> int:
  """Positions a table's prompts must leave free: the greedy path runs gamma tokens past
  max_new_tokens, and the engine, which measures EAGLE-style drafters, reserves one more."""
  if any(config.feature_dim for config, _ in drafters.values()):
    return speculative.positions_after_prompt(speculative.SpeculativeConfig(
        gamma=gamma, max_new_tokens=max_new_tokens))
  return max_new_tokens + gamma


PER_PROMPT = "tokens/call per prompt"
PER_PROMPT_OVERLAP = "sum min(p,q) per prompt"
FULL_BUDGET = "full"  # the budget of a full-cache row


def acceptance_vs_budget(verifier: Checkpoint, drafters: dict, prompts: dict, sparsities: list,
                         *, gamma: int, max_new_tokens: int, prefill_chunk: int,
                         answers: dict | None = None) -> list[dict]:
  """Rows (context, drafter, policy, budget, greedy acceptance, tokens/call and sum min(p,q) at
  T=1, each with its standard error over prompts; `PER_PROMPT` and `PER_PROMPT_OVERLAP` list each
  prompt's tokens/call and sum min(p,q), in prompt order, so that two drafters can be compared
  prompt by prompt).

  drafters: {label: (config, params)}; prompts: {context: [N, P] prompt tokens}; sparsities: the
  drafter caches to measure (`SparsityConfig`s; None = the full cache). answers: {context: [text
  that correctly continues each prompt]} for retrieval tasks; the rows then count the verifier's
  greedy continuations that hold it (`verifier retrieved`), and give the drafter's agreement with
  the verifier on the answer's drafted tokens (`answer match`: its tokens after the first, which
  the verifier emits itself): what only distant context holds. A drafter given as the
  verifier's own params object shares the verifier's prefill. An EAGLE-style drafter's rows come
  from the engine (`engine_statistics`), with sum min(p,q) and answer match nan.
  """
  rows = []
  decoding_layout = (unroll(verifier.config, verifier.params)
                     if any(config.feature_dim for config, _ in drafters.values()) else None)
  # The verifier drafting for itself: one prefill gives its own logits and its drafts'.
  itself = next((label for label, (_, params) in drafters.items() if params is verifier.params),
                None)
  for context, windows in prompts.items():
    per_prompt, hits, answer_matches = {}, 0, {}  # per_prompt[(label, i)]: [(overlap, stats)]
    for prompt_index, window in enumerate(windows):
      started = time.time()
      prompt = jnp.asarray(window[None])
      greedy = greedy_path(verifier, window, length=max_new_tokens + gamma,
                           prefill_chunk=prefill_chunk)
      fed = jnp.asarray(greedy[None, :-1])
      if answers:
        answer = answers[context][prompt_index]
        hits += retrieval.retrieved(verifier.tokenizer.decode(greedy[:max_new_tokens].tolist()),
                                    answer)
        span = max(0, min(len(verifier.tokenizer.encode(answer)), max_new_tokens) - 1)
      logits = lambda config, params, sparsities: teacher_forced_logits(
          config, params, prompt, fed, sparsities, gamma=gamma, prefill_chunk=prefill_chunk,
          rng=jax.random.key(0))
      verifier_logits, *own = logits(verifier.config, verifier.params,
                                     [None] + (sparsities if itself else []))
      for label, (config, params) in drafters.items():
        if config.feature_dim:
          for index, (tokens, stats) in enumerate(engine_statistics(
              *decoding_layout, config, params, prompt, sparsities, gamma=gamma,
              max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk)):
            if tokens != greedy[:max_new_tokens].tolist():
              logging.warning("%s at %s: the engine's output left the greedy AR path (a near "
                              "tie?); its rounds are still the engine's", label,
                              sparsities[index])
            per_prompt.setdefault((label, index), []).append((float("nan"), stats))
            if answers:
              answer_matches.setdefault((label, index), []).append(float("nan"))
          continue
        measured = own if label == itself else logits(config, params, sparsities)
        for index, drafter_logits in enumerate(measured):
          per_prompt.setdefault((label, index), []).append(path_statistics(
              verifier_logits, drafter_logits, greedy, gamma, max_new_tokens))
          if answers:
            agree = np.asarray(jnp.argmax(drafter_logits[:span], -1)) == greedy[1:span + 1]
            answer_matches.setdefault((label, index), []).extend(agree.tolist())
      logging.info("context %d prompt %d/%d measured in %.0f s", context, prompt_index + 1,
                   len(windows), time.time() - started)
    for (label, index), measured in per_prompt.items():
      sparsity = sparsities[index]
      overlaps = [overlap for overlap, _ in measured]
      stats = sum((s for _, s in measured[1:]), measured[0][1])
      rows.append({"context": context, "drafter": label,
                   "policy": sparsity.policy if sparsity else "full KV",
                   "budget": sparsity.budget if sparsity else FULL_BUDGET,
                   "greedy acceptance": stats.acceptance_rate,
                   "tokens/call": stats.tokens_per_call,
                   "tokens/call s.e.": results.mean_and_error(
                       [s.tokens_per_call for _, s in measured])[1],
                   PER_PROMPT: [round(s.tokens_per_call, 4) for _, s in measured],
                   "sum min(p,q) T=1": float(np.mean(overlaps)),
                   "sum min(p,q) s.e.": results.mean_and_error(overlaps)[1],
                   PER_PROMPT_OVERLAP: [round(overlap, 5) for overlap in overlaps]})
      if answers:
        rows[-1]["verifier retrieved"] = f"{hits}/{len(windows)}"
        rows[-1]["answer match"] = float(np.mean(answer_matches[(label, index)]))
  return rows


def paired_gaps(rows: list[dict], drafter: str, baseline: str) -> list[dict]:
  """Per (context, policy, budget) of `drafter`: its tokens/call and its sum min(p,q) at T=1 minus
  `baseline`'s, prompt by prompt (paired, so each prompt's own difficulty cancels), and its share
  of its own full-cache tokens/call, prompt by prompt; each a mean with its standard error over
  prompts (nan for an EAGLE drafter's sum min(p,q), which the engine does not give)."""
  cell = lambda row: (row["context"], row["policy"], row["budget"])
  theirs = {cell(row): row for row in rows if row["drafter"] == baseline}
  mine = [row for row in rows if row["drafter"] == drafter]
  full = {row["context"]: row[PER_PROMPT] for row in mine if row["budget"] == FULL_BUDGET}
  gaps = []
  for row in mine:
    if cell(row) not in theirs:
      raise ValueError(f"{baseline!r} has no row at {cell(row)}")
    gap, overlap_gap = (results.mean_and_error(np.subtract(row[key], theirs[cell(row)][key]))
                        for key in (PER_PROMPT, PER_PROMPT_OVERLAP))
    share = results.mean_and_error(np.divide(row[PER_PROMPT], full[row["context"]]))
    gaps.append({"context": row["context"], "policy": row["policy"], "budget": row["budget"],
                 "drafter": drafter, "baseline": baseline, "gap": gap[0], "gap s.e.": gap[1],
                 "share of own full": share[0], "share s.e.": share[1],
                 "T=1 gap": overlap_gap[0], "T=1 gap s.e.": overlap_gap[1]})
  return gaps


def plot(rows: list[dict], path: str) -> None:
  """Tokens per verifier call vs budget, one panel per context, one line per drafter and policy,
  each ending at its drafter's full-cache value."""
  full = {(r["context"], r["drafter"]): r["tokens/call"] for r in rows if r["policy"] == "full KV"}
  lines = {}
  for row in rows:
    if row["policy"] != "full KV":
      lines.setdefault((row["context"], row["drafter"], row["policy"]), []).append(
          (row["budget"], row["tokens/call"]))
  panels = {}
  for (context, drafter, policy), points in lines.items():
    if (context, drafter) in full:
      points = points + [(FULL_BUDGET, full[(context, drafter)])]
    panels.setdefault(f"{context // 1024}K context", {})[f"{drafter}, {policy}"] = points
  results.plot_lines(path, panels, "drafter KV budget (kept prompt keys per layer and head)",
                     "tokens per verifier call (greedy)")
