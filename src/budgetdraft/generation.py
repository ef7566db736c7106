"""Text in, text out: one prompt through AR or speculative decoding, streamed as it is decided.

`Generation` runs the decoding loop one verifier round (or one AR token) at a time and yields the
new text after each, detokenized incrementally so that a multi-byte character is never split:
the text is decoded from all tokens so far and held back while it ends in an incomplete UTF-8
sequence. Stop strings end the output where they first appear. `stats` is filled when the
iteration ends; its times are of ahead-of-time compiled calls, compilation reported apart.
"""

import dataclasses
import time
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft import specprefill
from budgetdraft.decoding import autoregressive
from budgetdraft.decoding import speculative as speculative_lib
from budgetdraft.decoding.speculative import SpeculativeConfig
from budgetdraft.models.checkpoint_io import Checkpoint
from budgetdraft.models.prefill import check_request

_INCOMPLETE = "\ufffd"  # what byte-level decoding gives for a cut multi-byte character


def generation_room(spec: SpeculativeConfig, speculative: bool) -> int:
  """Cache positions decoding writes past the prompt (a last round's whole draft tree, or
  max_new_tokens autoregressively)."""
  return speculative_lib.positions_after_prompt(spec) if speculative else spec.max_new_tokens


def prompt_tokens(model: Checkpoint, text: str, *, chat: bool, spec: SpeculativeConfig,
                  speculative: bool, truncate: bool) -> list[int]:
  """The prompt's tokens, leaving the context room that decoding with `spec` writes.

  An empty prompt is an error; a long one is an error naming the lengths, or with `truncate`
  keeps its last tokens (with a warning).
  """
  if not text.strip():
    raise ValueError("the prompt is empty")
  room = generation_room(spec, speculative)
  tokens = model.tokenizer.encode(model.tokenizer.chat_prompt(text) if chat else text)
  limit = model.config.max_context - room
  if len(tokens) > limit:
    if not truncate:
      raise ValueError(f"the prompt has {len(tokens)} tokens; with {room} positions for "
                       f"generation the model's context of {model.config.max_context} allows "
                       f"{limit} (--truncate=left keeps the last {limit})")
    logging.warning("prompt of %d tokens cut to its last %d", len(tokens), limit)
    tokens = tokens[-limit:]
  return tokens


@dataclasses.dataclass
class Stats:
  prompt_tokens: int
  compile_s: float = 0.0
  prefill_s: float = 0.0
  decode_s: float = 0.0
  emitted_tokens: int = 0
  verifier_calls: int = 0
  tokens_per_call: float = 1.0
  acceptance: float | None = None  # None: autoregressive decoding
  verifier_kv_bytes: int = 0
  drafter_kv_bytes: int = 0
  prefilled_tokens: int = 0  # prompt tokens the verifier prefilled (fewer with speculative prefill)

  @property
  def decode_tokens_per_s(self) -> float:
    return (self.emitted_tokens - 1) / self.decode_s if self.decode_s else float("nan")

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}


class Generation:
  """Iterate for the text pieces; afterwards `text` and `stats` hold the result.

  drafter: (config, params), or None for autoregressive decoding with the sampling and lengths of
  `spec`. selection: a speculative prefill (`specprefill`) instead of the full one, scored by
  `scorer` ((config, params)) for AR decoding and by the drafter itself for speculative decoding.
  The verifier decodes in the decoding layout (`transformer.unroll`).
  """

  def __init__(self, verifier: Checkpoint, drafter, prompt: list[int], spec: SpeculativeConfig,
               *, stop: tuple[str, ...] = (), seed: int = 0,
               selection: specprefill.SpecPrefillConfig | None = None, scorer=None):
    if selection is not None and (scorer is None) == (drafter is None):
      raise ValueError("a speculative prefill is scored by the drafter when there is one, and "
                       "needs a scorer model only for autoregressive decoding")
    # A prompt shorter than a prefill chunk is prefilled in one chunk of (about) its own length.
    chunk = min(spec.prefill_chunk, -(-len(prompt) // 64) * 64)
    spec = dataclasses.replace(spec, prefill_chunk=chunk)
    self.verifier, self.drafter, self.prompt, self.spec = (verifier.unrolled(), drafter, prompt,
                                                           spec)
    self.stop, self.seed = tuple(s for s in stop if s), seed
    self.selection, self.scorer = selection, scorer if drafter is None else drafter
    if selection is not None and self.scorer[0].feature_dim:
      raise ValueError("a speculative prefill scores the prompt with the drafter alone, before "
                       "the verifier runs; an EAGLE-style drafter needs the verifier's hidden "
                       "states: use a layers:<k> scorer or no keep_rate")
    self.text = ""
    self.stats = Stats(prompt_tokens=len(prompt), prefilled_tokens=len(prompt))

  def _start_pruned(self, verifier_params, scorer_params, prompt, lengths, rng):
    """A speculative prefill, then the first token (AR or speculative)."""
    capacity = check_request(self.verifier.config, prompt.shape[1],
                             generation_room(self.spec, self.drafter is not None),
                             self.spec.prefill_chunk)
    logits, cache, scores, num_kept = specprefill.prefill_caches(
        verifier_params, scorer_params, prompt, lengths, verifier_config=self.verifier.config,
        scorer_config=self.scorer[0], settings=self.selection, capacity=capacity,
        prefill_chunk=self.spec.prefill_chunk)
    if self.drafter is None:
      state = autoregressive.begin(logits, cache, rng, max_new_tokens=self.spec.max_new_tokens,
                                   sampling=self.spec.sampling, eos_id=self.spec.eos_id,
                                   pad_id=self.spec.pad_id)
    else:
      shared = scores.kv_scores if self.selection.shares_kv_scores(self.spec.sparsity) else None
      state = speculative_lib.begin(scorer_params, logits, cache, scores.cache, prompt, lengths,
                                    rng, kv_scores=shared, drafter_config=self.drafter[0], spec=self.spec)
    return state, num_kept

  def _compile(self):
    """(start, step) compiled ahead of time, each a function of the arrays only. start returns
    (state, prompt tokens the verifier prefilled)."""
    prompt, lengths = jnp.asarray([self.prompt], jnp.int32), jnp.array([len(self.prompt)])
    rng = jax.random.key(self.seed)
    if self.drafter is None:
      static = dict(config=self.verifier.config, sampling=self.spec.sampling,
                    eos_id=self.spec.eos_id, pad_id=self.spec.pad_id)
      step_fn, step_params = autoregressive.step, (self.verifier.params,)
    else:
      static = dict(verifier_config=self.verifier.config, drafter_config=self.drafter[0],
                    spec=self.spec)
      step_fn, step_params = speculative_lib.step, (self.verifier.params, self.drafter[1])
    if self.selection is not None:
      start_args = (self.verifier.params, self.scorer[1], prompt, lengths, rng)
      start = jax.jit(self._start_pruned).lower(*start_args).compile()
      state_shape = start.out_info[0]
      run_start = lambda: start(*start_args)
    else:
      if self.drafter is None:
        start_args = (self.verifier.params, prompt, lengths, rng)
        start = autoregressive.start.lower(*start_args, max_new_tokens=self.spec.max_new_tokens,
                                           prefill_chunk=self.spec.prefill_chunk,
                                           **static).compile()
      else:
        start_args = (self.verifier.params, self.drafter[1], prompt, lengths, rng)
        start = speculative_lib.start.lower(*start_args, **static).compile()
      state_shape = start.out_info
      run_start = lambda: (start(*start_args), lengths)
    step = step_fn.lower(*step_params, state_shape, **static).compile()
    return run_start, lambda state: step(*step_params, state)

  def _finished(self, state) -> bool:
    if self.drafter is None:
      return autoregressive.finished(state)
    return speculative_lib.finished(state, self.spec)

  def _tokens(self, state) -> list[int]:
    count = min(int(state.num_emitted[0]), self.spec.max_new_tokens)
    tokens = np.asarray(state.tokens)[0, :count].tolist()  # sliced on the host: no recompiles
    if self.spec.eos_id is not None and self.spec.eos_id in tokens:
      tokens = tokens[:tokens.index(self.spec.eos_id)]  # the model's end marker is not text
    return tokens

  def _decided(self, tokens: list[int], final: bool) -> tuple[str, bool]:
    """(the text that can be shown, whether a stop string ended it)."""
    text = self.verifier.tokenizer.decode(tokens)
    hits = [text.index(s) for s in self.stop if s in text]
    if hits:
      return text[:min(hits)], True
    if not final:
      # Hold back an incomplete character and any tail that may still grow into a stop string.
      text = text.rstrip(_INCOMPLETE)
      hold = max((len(s) - 1 for s in self.stop), default=0)
      text = text[:max(len(self.text), len(text) - hold)]
    return text, False

  def __iter__(self) -> Iterator[str]:
    started = time.perf_counter()
    start, step = self._compile()
    self.stats.compile_s = time.perf_counter() - started
    started = time.perf_counter()
    state, prefilled = jax.block_until_ready(start())
    self.stats.prefill_s = time.perf_counter() - started
    self.stats.prefilled_tokens = int(prefilled[0])
    started, stopped = time.perf_counter(), False
    while True:
      finished = self._finished(state)
      text, stopped = self._decided(self._tokens(state), final=finished)
      if len(text) > len(self.text):
        yield text[len(self.text):]
        self.text = text
      if finished or stopped:
        break
      state = jax.block_until_ready(step(state))
    self.stats.decode_s = time.perf_counter() - started
    self._record(state)

  def _record(self, state):
    stats = self.stats
    stats.emitted_tokens = min(int(state.num_emitted[0]), self.spec.max_new_tokens)
    if self.drafter is None:
      stats.verifier_calls = stats.emitted_tokens - 1  # decode steps (the prefill gave one)
      stats.verifier_kv_bytes = state.cache.nbytes()
      return
    _, rounds = speculative_lib.outputs_and_stats(state, self.spec)
    stats.verifier_calls, stats.tokens_per_call = rounds.rounds, rounds.tokens_per_call
    stats.acceptance = rounds.acceptance_rate
    stats.verifier_kv_bytes = state.verifier_cache.nbytes()
    stats.drafter_kv_bytes = state.drafter_cache.nbytes()
