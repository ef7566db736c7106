"""Which positions of the verifier's greedy path a drafter loses over a sparse KV cache, and why.

On a retrieval prompt only the inserted text holds the answer. Feeding the verifier's greedy path
teacher-forced (as `acceptance` does) tells, position by position, whether a greedy draft there is
accepted; the drafter's sparse cache tells which of the inserted text's keys it kept. Together
they say whether acceptance is lost on the answer, and whether it went with the answer's keys.
"""

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.data import retrieval
from budgetdraft.evaluation import acceptance, results
from budgetdraft.models import prefill
from budgetdraft.models.checkpoint_io import Checkpoint
from budgetdraft.models.config import ModelConfig

HEAD = 8  # the answer's first drafted tokens, reported apart: nearest the question's cue


def span_kept(cache, span: tuple[int, int]) -> np.ndarray:
  """[L]: the share of prompt positions [start, end) that a sparse cache (row 0) keeps in each
  layer, mean over KV heads."""
  start, end = span
  positions = np.asarray(cache.positions[:, 0, :, :cache.budget])
  inside = (positions >= start) & (positions < end)
  return inside.sum(-1).mean(-1) / (end - start)


def position_matches(verifier: Checkpoint, config: ModelConfig, params, window, span, sparsities,
                     *, gamma: int, max_new_tokens: int, prefill_chunk: int) -> dict:
  """Where a drafter loses the verifier's greedy path on one prompt [P], position by position.

  Returns {"greedy": the verifier's greedy tokens [max_new_tokens + gamma], "drafted": per entry
  of `sparsities`, the drafter's argmax [max_new_tokens + gamma - 1] after each greedy token but the
  last (teacher-forced: a draft at i is accepted iff it equals greedy[i + 1]), "kept": per entry,
  `span_kept` of the prompt span [start, end) (None for the full cache)}.
  """
  greedy = acceptance.greedy_path(verifier, window, length=max_new_tokens + gamma,
                                  prefill_chunk=prefill_chunk)
  fed = jnp.asarray(greedy[None, :-1])
  caches = acceptance.drafter_caches(config, params, jnp.asarray(np.asarray(window)[None]),
                                     sparsities, continuation_length=fed.shape[1], gamma=gamma,
                                     prefill_chunk=prefill_chunk, rng=jax.random.key(0))
  drafted = [np.asarray(jnp.argmax(prefill.continuation_logits(params, cache, fed,
                                                               config=config)[0], -1))
             for cache in caches]
  kept = [None if sparsity is None else span_kept(cache, span)
          for sparsity, cache in zip(sparsities, caches)]
  return {"greedy": greedy, "drafted": drafted, "kept": kept}


def label(sparsity) -> str:
  return "full KV" if sparsity is None else f"{sparsity.policy} {sparsity.budget}"


def marked(tokenizer, greedy, drafted) -> str:
  """The greedy path as text, each lost token as [verifier's -> drafter's]."""
  show = lambda token: tokenizer.decode([int(token)]).replace("\n", "\\n")
  pieces = [show(greedy[0])]
  for token, draft in zip(greedy[1:], drafted):
    pieces.append(show(token) if token == draft else f"[{show(token)} -> {show(draft)}]")
  return "".join(pieces)


def lost_positions(verifier: Checkpoint, config: ModelConfig, params, prompts: dict, sparsities:
                   dict, *, gamma: int, max_new_tokens: int, prefill_chunk: int,
                   example: int = -1) -> tuple[list[dict], list[dict], list[str]]:
  """(rows per context and drafter cache, rows per prompt, one marked path per context).

  prompts: {context: [retrieval.TaskPrompt]}; sparsities: {context: drafter caches to measure
  (None = the full cache)}. A row gives the share of the answer's drafted tokens that match (its
  first token is the verifier's own; split at HEAD), of the path after the answer, and of the
  inserted text the cache kept. example: the prompt whose path is marked (-1: the first whose
  greedy output holds the answer).
  """
  if any(example >= len(items) for items in prompts.values()):
    raise ValueError(f"example={example}: only {min(map(len, prompts.values()))} prompts")
  rows, per_prompt, examples = [], [], []
  for context, items in prompts.items():
    measured = []
    for index, prompt in enumerate(items):
      measured.append(position_matches(verifier, config, params, np.array(prompt.tokens),
                                       prompt.inserted, sparsities[context], gamma=gamma,
                                       max_new_tokens=max_new_tokens,
                                       prefill_chunk=prefill_chunk))
      logging.info("context %d prompt %d/%d measured", context, index + 1, len(items))
    retrieved = [retrieval.retrieved(verifier.tokenizer.decode(
        m["greedy"][:max_new_tokens].tolist()), p.answer) for p, m in zip(items, measured)]
    spans = [max(1, min(len(verifier.tokenizer.encode(p.answer)), max_new_tokens) - 1)
             for p in items]
    for s, sparsity in enumerate(sparsities[context]):
      answer, rest, head, tail, kept, lowest, highest, calls = ([] for _ in range(8))
      for p, m, span, hit in zip(items, measured, spans, retrieved):
        matches = m["drafted"][s] == m["greedy"][1:]
        answer.append(float(matches[:span].mean()))
        rest.append(float(matches[span:max_new_tokens - 1].mean()))
        head.extend(matches[:min(span, HEAD)].tolist())
        tail.extend(matches[HEAD:span].tolist())
        layers = m["kept"][s] if sparsity is not None else np.ones(1)
        kept.append(float(layers.mean()))
        lowest.append(layers.min())
        highest.append(layers.max())
        calls.append(acceptance.greedy_rounds(matches, gamma, max_new_tokens))
        per_prompt.append({"context": context, "drafter cache": label(sparsity),
                           "depth": p.depth, "verifier retrieved": hit,
                           "answer matched": answer[-1], "rest matched": rest[-1],
                           "inserted text kept": kept[-1],
                           "tokens/call": calls[-1].tokens_per_call})
      (answer_mean, answer_error), (rest_mean, rest_error), (kept_mean, kept_error) = (
          results.mean_and_error(values) for values in (answer, rest, kept))
      rows.append({"context": context, "drafter cache": label(sparsity),
                   "verifier retrieved": f"{sum(retrieved)}/{len(items)}",
                   "answer matched": answer_mean, "answer s.e.": answer_error,
                   f"answer tokens 1-{HEAD}": float(np.mean(head)),
                   f"answer tokens {HEAD + 1}+": float(np.mean(tail)) if tail else float("nan"),
                   "rest matched": rest_mean, "rest s.e.": rest_error,
                   "inserted text kept": kept_mean, "kept s.e.": kept_error,
                   "kept, fewest-most layer": f"{np.mean(lowest):.2f}-{np.mean(highest):.2f}",
                   "tokens/call": sum(calls[1:], calls[0]).tokens_per_call})
    shown = example if example >= 0 else next((i for i, hit in enumerate(retrieved) if hit), 0)
    path = measured[shown]["greedy"][:max_new_tokens]
    lines = [f"{label(sparsity)}: {marked(verifier.tokenizer, path, drafted)}"
             for sparsity, drafted in zip(sparsities[context], measured[shown]["drafted"])]
    examples.append(f"{context} tokens, prompt {shown} (depth {items[shown].depth}, answer "
                    f"{items[shown].answer!r}):\n\n```\n" + "\n\n".join(lines) + "\n```")
  return rows, per_prompt, examples
