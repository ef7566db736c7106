"""Verification rules inside the speculative engine on a real model, teacher-free.

For each rule and number of paths K: tokens per verifier call (with its standard error over
rounds), acceptance, and wall time per emitted token of the decode loop, beside AR decoding of the
same prompts. For each prompt and K the engine prefills once; every rule then decodes from that
same state (same random stream), so rules differ only in verification.
"""

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp

from budgetdraft.decoding import speculative
from budgetdraft.evaluation import speedup, timing
from budgetdraft.models.checkpoint_io import Checkpoint


def rule_efficiency(verifier: Checkpoint, drafter, prompts, rules: list[tuple[str, int]],
                    spec: speculative.SpeculativeConfig) -> list[dict]:
  """One row per (rule, K) in `rules`, measured on prompts [N, P] with the settings of `spec`
  (its rule and num_paths are replaced per row); drafter = (config, params)."""
  drafter_config, drafter_params = drafter
  ar_decode_s = sum(speedup.measure_ar(verifier, jnp.asarray(p[None]), spec)[1] for p in prompts)
  ar_tokens = len(prompts) * (spec.max_new_tokens - 1)  # the first token comes from the prefill
  totals, compiled = {}, {}
  for num_paths in sorted({k for _, k in rules}):
    specs = {rule: dataclasses.replace(spec, rule=rule, num_paths=k) for rule, k in rules
             if k == num_paths}
    for index, window in enumerate(prompts):
      prompt, lengths = jnp.asarray(window[None]), jnp.array([len(window)], jnp.int32)
      first = next(iter(specs.values()))
      static = dict(verifier_config=verifier.config, drafter_config=drafter_config, spec=first)
      state = speculative.start(verifier.params, drafter_params, prompt, lengths,
                                jax.random.key(index), **static)
      for rule, rule_spec in specs.items():
        if rule_spec not in compiled:  # every prompt has the same shapes: compile once
          compiled[rule_spec] = timing.compiled(speculative.decode, verifier.params,
                                                drafter_params, state,
                                                **{**static, "spec": rule_spec})
        final, decode_s = timing.timed(compiled[rule_spec], verifier.params, drafter_params,
                                       state)
        _, stats = speculative.outputs_and_stats(final, rule_spec)
        emitted = int(final.num_emitted[0]) - 1
        stats_so_far, seconds, tokens = totals.get((rule, num_paths), (None, 0.0, 0))
        totals[(rule, num_paths)] = (stats if stats_so_far is None else stats_so_far + stats,
                                     seconds + decode_s, tokens + emitted)
        logging.info("prompt %d %s K=%d: %.2f tokens/call, %.1f s", index, rule, num_paths,
                     stats.tokens_per_call, decode_s)
  rows = []
  for (rule, num_paths), (stats, seconds, tokens) in totals.items():
    ms_per_token = 1e3 * seconds / tokens
    ar_ms_per_token = 1e3 * ar_decode_s / ar_tokens
    rows.append({"rule": rule, "K": num_paths, "rounds": stats.rounds,
                 "tokens/call": stats.tokens_per_call,
                 "tokens/call SE": stats.tokens_per_call_stderr,
                 "acceptance": stats.acceptance_rate, "ms/token": ms_per_token,
                 "AR ms/token": ar_ms_per_token, "decode speedup": ar_ms_per_token / ms_per_token})
  return rows
