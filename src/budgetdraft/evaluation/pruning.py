"""Pruned verifiers as drafters: quality, acceptance and the cost of one draft step.

`pruning_table` puts, per drafter, held-out perplexity, its tokens per verifier call along the
verifier's greedy path (`acceptance`, full cache and sparse budgets) and the wall time of one
decode step over the sparse cache, next to the verifier's own step over its full cache.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.evaluation import acceptance, decode_speed, timing
from budgetdraft.models import prefill
from budgetdraft.models.checkpoint_io import Checkpoint
from budgetdraft.models.config import ModelConfig
from budgetdraft.sparsity import selection


def step_seconds(config: ModelConfig, params, prompt, sparsity, *, gamma: int, prefill_chunk: int,
                 repeats: int = 7, steps: int = 16) -> float:
  """Median wall seconds of one decode step (one new token, logits included) after the prompt
  [1, P], over the sparse cache that `sparsity` builds (None: the full cache). Timed as decoding
  pays it: a compiled loop writing the cache in place (`decode_speed.forward_loop`)."""
  cache = prefill.prefill_cache(params, prompt, config=config, capacity=prompt.shape[1] + 64,
                                prefill_chunk=prefill_chunk)
  if sparsity is not None:
    cache = acceptance.sparse_cache(config, params, cache, prompt, cache.length, sparsity, gamma,
                                     jax.random.key(0))
  token = prompt[:, -1:]
  loop = timing.compiled(decode_speed.forward_loop, params, cache, token, config=config,
                         steps=steps)
  _, seconds = timing.timed_with_fresh_args(loop, lambda: (params, cache, token), repeats)
  return seconds / steps


def pruning_table(verifier: Checkpoint, drafters: dict, prompts: dict, held_out, budgets: list,
                  sparsity: selection.SparsityConfig, *, gamma: int, max_new_tokens: int,
                  prefill_chunk: int, perplexity_chunk: int) -> list[dict]:
  """One row per drafter (and one for the verifier).

  drafters: {label: (config, params)}; prompts: {context: [N, P]}; held_out: [B, T] tokens for
  perplexity; budgets: sparse budgets (None = the full cache), all timed at the first sparse one.
  """
  nll = lambda config, params: float(prefill.negative_log_likelihood(
      params, jnp.asarray(held_out), config=config, chunk_size=perplexity_chunk))
  sparsities = [None if b is None else dataclasses.replace(sparsity, budget=b) for b in budgets]
  accepted = acceptance.acceptance_vs_budget(verifier, drafters, prompts, sparsities, gamma=gamma,
                                             max_new_tokens=max_new_tokens,
                                             prefill_chunk=prefill_chunk)
  context = max(prompts)
  prompt = jnp.asarray(prompts[context][:1])
  timed_budget = next(b for b in budgets if b is not None)
  verifier_step = step_seconds(verifier.config, verifier.params, prompt, None, gamma=gamma,
                               prefill_chunk=prefill_chunk)
  total = verifier.config.decoder_params()
  rows = [{"drafter": "verifier (reference)", "decoder params M": total / 1e6,
           "kept": 1.0, "perplexity": float(np.exp(nll(verifier.config, verifier.params))),
           **{f"tokens/call {b or 'full'}": float("nan") for b in budgets},
           **{f"sum min(p,q) {b or 'full'}": float("nan") for b in budgets},
           "step ms": verifier_step * 1e3, "step / verifier step": 1.0}]
  for label, (config, params) in drafters.items():
    row = {"drafter": label, "decoder params M": config.decoder_params() / 1e6,
           "kept": config.decoder_params() / total,
           "perplexity": float(np.exp(nll(config, params)))}
    for measured in accepted:
      if measured["drafter"] == label and measured["context"] == context:
        row[f"tokens/call {measured['budget']}"] = measured["tokens/call"]
        row[f"sum min(p,q) {measured['budget']}"] = measured["sum min(p,q) T=1"]
    drafter_step = step_seconds(config, params, prompt,
                                dataclasses.replace(sparsity, budget=timed_budget), gamma=gamma,
                                prefill_chunk=prefill_chunk)
    rows.append({**row, "step ms": drafter_step * 1e3,
                 "step / verifier step": drafter_step / verifier_step})
  return rows
