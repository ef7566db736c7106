"""Decode throughput against batch size: AR and speculative decoding of B rows at one context.

This is where the KV cache dominates the bytes a step moves and a sparse-cache drafter pays most
(MagicDec): at batch B a verifier step reads its weights once and B full caches. The table gives,
per system and batch size, decode tokens/s (median and spread of repeated runs), the speedup over
AR at the same batch, tokens per verifier call, and the KV share of the bytes a verifier step
reads.

Prefill is not measured here, and at 4K on a CPU it would dominate (~20 s a prompt): each system
prefills `D` distinct prompts once, and the batch-B state is that post-prefill state with row i
continuing prompt i mod D (`take_rows`). Greedy rows check that the speculative tokens equal AR's
row for row.
"""

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft import parallel
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.evaluation import decode_speed, timing
from budgetdraft.evaluation.speedup import Variant
from budgetdraft.models.checkpoint_io import Checkpoint


def take_rows(state, rows):
  """A decode state (AR or speculative, one path) whose row i is row `rows[i]` of `state`: caches
  by their `gather_rows`, every array with a leading batch dimension along it; the step counter
  and the rng stay as they are."""
  batch_size = state.num_emitted.shape[0]
  rows = jnp.asarray(rows)
  is_cache = lambda leaf: type(leaf) in parallel.CACHE_AXES

  def take(leaf):
    if is_cache(leaf):
      return leaf.gather_rows(rows)
    shape = getattr(leaf, "shape", ())
    return jnp.take(leaf, rows, axis=0) if shape and shape[0] == batch_size else leaf
  return jax.tree.map(take, state, is_leaf=is_cache)


def batch_throughput(verifier: Checkpoint, drafters: dict, variants: list[Variant], prompts,
                     batch_sizes: list[int], *, repeats: int = 3, mesh=None) -> list[dict]:
  """One row per (system, batch size): AR under the variants' sampling and lengths, then each
  variant (its drafter from `drafters`, {source: (config, params)}). prompts: [D, P]. The
  verifier decodes in the decoding layout (`transformer.unroll`)."""
  verifier = verifier.unrolled()
  spec = variants[0].spec
  for variant in variants:  # one AR reference serves every row
    if (variant.spec.sampling, variant.spec.max_new_tokens) != (spec.sampling, spec.max_new_tokens):
      raise ValueError("every variant of the batch table needs the same sampling and "
                       "max_new_tokens")
  with parallel.running_on(mesh):
    ar_static = dict(config=verifier.config, sampling=spec.sampling, eos_id=None, pad_id=0)
    systems = [("AR", None, ar_static, _prefilled(verifier, None, prompts, spec))]
    for variant in variants:
      drafter = drafters[variant.drafter]
      static = dict(verifier_config=verifier.config, drafter_config=drafter[0],
                    spec=variant.spec)
      systems.append((variant, drafter[1], static,
                      _prefilled(verifier, drafter, prompts, variant.spec)))
    rows, ar_runs = [], {}
    for system, drafter_params, static, prefilled in systems:
      for batch in batch_sizes:
        state = parallel.place_state(
            mesh, take_rows(prefilled, np.arange(batch) % len(prompts)), batch)
        if system == "AR":
          decode = timing.compiled(autoregressive.decode, verifier.params, state, **static)
          final, times = timing.repeated(decode, lambda: (verifier.params, state), repeats)
          tokens = [row.tolist() for row in parallel.to_host(final.tokens)]
          ar_runs[batch] = (times[len(times) // 2], tokens)
        else:
          decode = timing.compiled(speculative.decode, verifier.params, drafter_params, state,
                                   **static)
          final, times = timing.repeated(
              decode, lambda: (verifier.params, drafter_params, state), repeats)
          tokens, stats = speculative.outputs_and_stats(final, system.spec)
        rows.append(_row(verifier, system, batch, times, prompts.shape[1] + spec.max_new_tokens,
                         ar_runs[batch], tokens, None if system == "AR" else stats))
        logging.info("%s", rows[-1])
  return rows


def _prefilled(verifier: Checkpoint, drafter, prompts, spec: speculative.SpeculativeConfig):
  """The post-prefill state of AR (drafter None) or speculative decoding over prompts [D, P]."""
  prompts = jnp.asarray(prompts)
  lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
  if drafter is None:
    return autoregressive.start(verifier.params, prompts, lengths, jax.random.key(0),
                                max_new_tokens=spec.max_new_tokens,
                                prefill_chunk=spec.prefill_chunk, config=verifier.config,
                                sampling=spec.sampling, eos_id=None, pad_id=0)
  return speculative.start(verifier.params, drafter[1], prompts, lengths, jax.random.key(1),
                           verifier_config=verifier.config, drafter_config=drafter[0], spec=spec)


def _row(verifier: Checkpoint, system, batch: int, times: list[float], context: int, ar_run,
         tokens, stats) -> dict:
  """A table row from a system's sorted decode times at one batch size and AR's (median, tokens)
  at the same batch."""
  new_tokens = len(ar_run[1][0])
  median = times[len(times) // 2]
  itemsize = jnp.dtype(verifier.config.compute_dtype).itemsize
  kv = batch * decode_speed.kv_bytes(verifier.config, context, itemsize)
  if stats is None:
    same = "-"
  elif not system.spec.sampling.greedy:
    same = "sampled"
  else:
    same = "yes" if tokens == ar_run[1] else "NO"
  return {"system": "AR" if stats is None else _label(system), "batch": batch,
          "decode tok/s": batch * new_tokens / median,
          "tok/s min": batch * new_tokens / times[-1],
          "tok/s max": batch * new_tokens / times[0],
          "speedup vs AR": ar_run[0] / median,
          "tokens/call": 1.0 if stats is None else stats.tokens_per_call, "= AR": same,
          "KV share of step bytes": kv / (kv + timing.tree_bytes(verifier.params))}


def _label(variant: Variant) -> str:
  sparsity = variant.spec.sparsity
  cache = "full KV" if sparsity is None else f"{sparsity.policy} {sparsity.budget}"
  return f"{variant.drafter} ({cache}, gamma {variant.spec.gamma})"
