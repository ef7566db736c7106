"""Autoregressive prefill time and decode speed of a model, against the memory-bandwidth floor.

A decode step must read every weight and the valid part of the KV cache once, so
floor = (weight bytes + KV bytes) / measured read bandwidth; `x floor` is how far a step is from it.
The verify step of speculative decoding (gamma + 1 tokens in one forward) reads the same bytes at
batch 1; `verify / AR` is its time over an AR step's, both timed inside a compiled loop.
`forward_cost` puts a forward of T tokens against max(bytes / bandwidth, FLOPs / matmul peak),
with its FLOPs split into weights, attention and head: why a verify step costs more than an AR
step that reads the same bytes.
"""

import functools

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.evaluation import timing
from budgetdraft.models.checkpoint_io import Checkpoint
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.transformer import Transformer


@functools.partial(jax.jit, static_argnames=("config", "spec", "steps"))
def verify_loop(params, cache, last, drafts, *, config, spec, steps: int):
  """`steps` verify forwards of the draft tree (last [B], drafts [B, K, gamma]) after the cache's
  prefix, in one compiled loop (each rolls the cache back): the verify step's cost as the
  speculative loop pays it."""
  root = cache.length

  def body(_, carry):
    cache, total = carry
    p, cache, _ = speculative.verify_step(params, cache.truncate(root), last, drafts,
                                          verifier_config=config, spec=spec)
    return cache, total + p[:, 0, :, 0].sum()

  return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros(())))[1]


@functools.partial(jax.jit, static_argnames=("drafter_config", "spec", "steps"))
def draft_loop(params, cache, last_two, features, root, rng, *, drafter_config, spec, steps: int):
  """`steps` draft phases from one `SpecState`'s fields in one compiled loop (each rewrites the
  same cache slots): the draft phase's cost as the speculative loop pays it."""

  def body(_, carry):
    cache, total = carry
    drafts, q, cache = speculative.draft_step(params, cache, last_two, features, root, rng,
                                              drafter_config=drafter_config, spec=spec)
    return cache, total + drafts.sum() + q[..., 0].sum()

  return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros(())))[1]


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def forward_loop(params, cache, tokens, *, config: ModelConfig, steps: int):
  """`steps` forwards (logits included) of tokens [B, T] after the cache's prefix in one compiled
  loop, each rolled back (the cache is written in place, as decoding writes it). Returns a
  checksum of every row's logits, so that nothing is left uncomputed."""
  model = Transformer(config)
  root = cache.length
  positions = root[:, None] + jnp.arange(tokens.shape[1])[None, :]

  def body(_, carry):
    cache, total = carry
    hidden, cache = model.apply({"params": params}, tokens, positions, cache.truncate(root))
    logits = model.apply({"params": params}, hidden, method=Transformer.logits)
    return cache, total + logits.max(-1).sum()

  return jax.lax.fori_loop(0, steps, body, (cache, jnp.zeros(())))[1]


def forward_cost(model: Checkpoint, cache: FullKVCache, token, context: int, num_tokens: int,
                 *, bandwidth: float, peak: float, steps: int = 16, repeats: int = 5) -> dict:
  """A forward of `num_tokens` tokens after `cache` (`context` positions) against its floor.

  The forward (logits included) is timed in `forward_loop` (median of `repeats` runs of `steps`).
  Its FLOPs are split into the weight matmuls, the attention over the cache and the head; its
  floor is max(bytes read / bandwidth, FLOPs / peak): one AR step is bound by the bytes, a verify
  step at long context could be by the FLOPs, and GFLOP/s says how far either runs from `peak`.
  """
  config, params = model.config, model.params
  tokens = jnp.broadcast_to(token[:, None], (token.shape[0], num_tokens))
  loop = timing.compiled(forward_loop, params, cache, tokens, config=config, steps=steps)
  _, times = timing.repeated(loop, lambda: (params, cache, tokens), repeats)
  seconds = times[len(times) // 2] / steps
  head_rows = config.draft_vocab or config.vocab_size
  flops = {"weights": 2 * num_tokens * config.decoder_params(),
           "attention": 4 * num_tokens * context * config.num_heads * config.head_dim
                        * config.num_layers,
           "head": 2 * num_tokens * head_rows * config.dim}
  num_bytes, total_flops = step_bytes(config, params, context), sum(flops.values())
  floor = max(num_bytes / bandwidth, total_flops / peak)
  row = {"layers": layout(config), "context": context, "tokens T": num_tokens,
         "forward ms": 1e3 * seconds,
         **{f"GFLOP {name}": value / 1e9 for name, value in flops.items()},
         "MB read": num_bytes / 1e6, "bytes floor ms": 1e3 * num_bytes / bandwidth,
         "FLOPs floor ms": 1e3 * total_flops / peak, "x floor": seconds / floor,
         "GFLOP/s": total_flops / seconds / 1e9}
  logging.info("%s", row)
  return row


def decode_speed(model: Checkpoint, prompt_tokens, contexts: list[int], *, max_new_tokens: int,
                 prefill_chunk: int, bandwidth: float, repeats: int = 5, gamma: int = 4,
                 peak: float | None = None) -> list[dict]:
  """One row per context; prompt_tokens [1, >= max(contexts) - max_new_tokens] are cut per row.

  The model runs in the layout it comes in (`transformer.unroll`), which the system name says.

  The decode loop runs `repeats` times: ms/step is the median, with the spread beside it. Each row
  holds the greedy `tokens` (to compare with a peer's) and, given the matmul `peak` (FLOP/s),
  `forwards`: `forward_cost` rows for 1 and gamma + 1 tokens.
  """
  config, params = model.config, model.params
  static = dict(config=config, sampling=SamplingConfig(), eos_id=None, pad_id=0)
  rows = []
  for context in contexts:
    prompt_len = context - max_new_tokens
    prompt = jnp.asarray(prompt_tokens[:1, :prompt_len])
    lengths = jnp.array([prompt_len], jnp.int32)
    logging.info("context %d: compiling prefill", context)
    start = timing.compiled(autoregressive.start, params, prompt, lengths, jax.random.key(0),
                            max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk, **static)
    state, prefill_s = timing.timed(start, params, prompt, lengths, jax.random.key(0))
    decode = timing.compiled(autoregressive.decode, params, state, **static)
    final, decode_times = timing.repeated(decode, lambda: (params, state), repeats)
    row = speed_row(
        f"budgetdraft, {layout(config)} layers (jax {jax.__version__}, "
        f"{jax.devices()[0].platform})", context=context,
        prompt_len=prompt_len, prefill_s=prefill_s, decode_times=decode_times,
        steps=int(final.step) - 1,  # the first token came from prefill
        floor_bytes=step_bytes(config, params, context),
        bandwidth=bandwidth, tokens=[int(t) for t in final.tokens[0]])
    spec = speculative.SpeculativeConfig(gamma=gamma, max_new_tokens=1)
    last = state.last_token
    drafts = jnp.broadcast_to(last[:, None, None], (last.shape[0], 1, gamma))
    verify_args = (params, state.cache, last, drafts)
    verify = timing.compiled(verify_loop, *verify_args, config=config, spec=spec,
                             steps=max_new_tokens)
    _, verify_times = timing.repeated(verify, lambda: verify_args, repeats)
    verify_ms = 1e3 * verify_times[len(verify_times) // 2] / max_new_tokens
    row = {**row, f"verify({gamma + 1}) ms": verify_ms, "verify / AR": verify_ms / row["ms/step"]}
    if peak is not None:
      row["forwards"] = [forward_cost(model, state.cache, state.last_token, context, t,
                                      bandwidth=bandwidth, peak=peak, repeats=repeats)
                         for t in (1, gamma + 1)]
    rows.append(row)
  return rows


def layout(config: ModelConfig) -> str:
  """The layer layout's name: "packed" (unrolled, weights packed for the CPU kernels),
  "unrolled" (XLA's ops on per-layer arrays) or "scanned" (the stack)."""
  if config.packed_weights:
    return "packed"
  return "unrolled" if config.unrolled else "scanned"


def step_bytes(config, params, context: int) -> int:
  """Bytes a decode step at `context` tokens reads at least: every weight and the KV cache. The
  embedding table counts only where it is the head (tied, unpacked): a lookup reads one row."""
  weights = timing.tree_bytes(params)
  if config.packed_weights or not config.tie_embeddings:
    weights -= timing.tree_bytes(params["embed"])
  return weights + kv_bytes(config, context, config.dtype.itemsize)


def kv_bytes(config, context: int, itemsize: int) -> int:
  """Bytes of keys and values a decode step reads at `context` tokens."""
  return 2 * config.num_layers * config.num_kv_heads * context * config.head_dim * itemsize


def speed_row(system: str, *, context: int, prompt_len: int, prefill_s: float, decode_times,
              steps: int, floor_bytes: int, bandwidth: float, tokens: list[int]) -> dict:
  """A table row of one system at one context: decode_times (sorted seconds of each decode run of
  `steps` steps) give the median and the spread; floor = floor_bytes / bandwidth per step."""
  step_s = decode_times[len(decode_times) // 2] / steps
  floor_s = floor_bytes / bandwidth
  row = {"system": system, "context": context, "prompt tokens": prompt_len,
         "prefill s": prefill_s, "prefill tok/s": prompt_len / prefill_s,
         "decode tok/s": 1 / step_s, "ms/step": 1e3 * step_s,
         "ms/step min-max": f"{1e3 * decode_times[0] / steps:.1f}-"
                            f"{1e3 * decode_times[-1] / steps:.1f}",
         "floor ms/step": 1e3 * floor_s, "x floor": step_s / floor_s, "tokens": tokens}
  logging.info("%s", {k: v for k, v in row.items() if k != "tokens"})
  return row


def same_prefix(tokens, reference) -> int:
  """How many leading tokens two greedy runs agree on."""
  n = min(len(tokens), len(reference))
  same = np.asarray(tokens[:n]) == np.asarray(reference[:n])
  return int(np.argmin(np.append(same, False)))
