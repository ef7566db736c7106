"""Autoregressive decoding: one jitted `lax.while_loop` over a static-shape `DecodeState`.

`generate` runs the model in the decoding layout (`transformer.unroll`); the jitted pieces run
whichever layout their config and params are in.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp

from budgetdraft import parallel
from budgetdraft.decoding import sampling as sampling_lib
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.prefill import check_request, check_token_id, pad_prompts, prefill
from budgetdraft.models.transformer import Transformer, unroll


@flax.struct.dataclass
class DecodeState:
  """tokens: [B, max_new] emitted tokens (pad after EOS); num_emitted: [B]; step: scalar."""

  cache: FullKVCache
  tokens: jax.Array
  num_emitted: jax.Array
  done: jax.Array
  step: jax.Array
  last_token: jax.Array  # [B] the token whose logits come next
  rng: jax.Array


def _emit(state: DecodeState, logits, sampling, eos_id, pad_id) -> DecodeState:
  """Samples one token per row and records it; rows past EOS record pad_id."""
  rng, step_rng = jax.random.split(state.rng)
  token = sampling_lib.sample(step_rng, sampling_lib.probabilities(logits, sampling), sampling)
  token = jnp.where(state.done, pad_id, token)
  tokens = state.tokens.at[:, state.step].set(token)
  num_emitted = state.num_emitted + (~state.done).astype(jnp.int32)
  done = state.done | (token == eos_id) if eos_id is not None else state.done
  return state.replace(tokens=tokens, num_emitted=num_emitted, done=done, step=state.step + 1,
                       last_token=token, rng=rng)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "sampling", "eos_id", "pad_id"))
def begin(logits, cache: FullKVCache, rng, *, max_new_tokens: int,
          sampling: sampling_lib.SamplingConfig, eos_id, pad_id: int) -> DecodeState:
  """Emits the first token from a prefilled cache and the logits after the prompt [B, V]."""
  batch = logits.shape[0]
  state = DecodeState(cache=cache, tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                      num_emitted=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool),
                      step=jnp.zeros((), jnp.int32), last_token=jnp.zeros((batch,), jnp.int32),
                      rng=rng)
  return _emit(state, logits, sampling, eos_id, pad_id)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "eos_id",
                                             "pad_id", "prefill_chunk"))
def start(params, prompt, prompt_lengths, rng, *, config: ModelConfig, max_new_tokens: int,
          sampling: sampling_lib.SamplingConfig, eos_id, pad_id: int, prefill_chunk: int):
  """Prefills the prompt and emits the first token."""
  batch, prompt_len = prompt.shape
  capacity = check_request(config, prompt_len, max_new_tokens, prefill_chunk)
  logits, cache = prefill(Transformer(config), params, prompt, prompt_lengths,
                          FullKVCache.init(config, batch, capacity), prefill_chunk)
  return begin(logits, cache, rng, max_new_tokens=max_new_tokens, sampling=sampling,
               eos_id=eos_id, pad_id=pad_id)


def _running(state: DecodeState):
  return (state.step < state.tokens.shape[1]) & ~jnp.all(state.done)


def _step(params, state: DecodeState, config: ModelConfig, sampling, eos_id, pad_id):
  """Feeds the last token and emits the next one."""
  model = Transformer(config)
  hidden, cache = model.apply({"params": params}, state.last_token[:, None],
                              state.cache.length[:, None], state.cache)
  logits = model.apply({"params": params}, hidden[:, 0], method=Transformer.logits)
  return _emit(state.replace(cache=cache), logits, sampling, eos_id, pad_id)


_STATIC = ("config", "sampling", "eos_id", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode(params, state: DecodeState, *, config: ModelConfig,
           sampling: sampling_lib.SamplingConfig, eos_id, pad_id: int) -> DecodeState:
  """Runs one-token steps until every row hit EOS or max_new_tokens were emitted."""
  return jax.lax.while_loop(
      _running, lambda s: _step(params, s, config, sampling, eos_id, pad_id), state)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def step(params, state: DecodeState, *, config: ModelConfig,
         sampling: sampling_lib.SamplingConfig, eos_id, pad_id: int) -> DecodeState:
  """One token of `decode`, for callers that stream; call it only while not `finished`. The state
  is donated (updated in place, as in the loop's carry)."""
  return _step(params, state, config, sampling, eos_id, pad_id)


def finished(state: DecodeState) -> bool:
  """Whether every row hit EOS or max_new_tokens were emitted (host-side)."""
  return not bool(_running(state))


def generate(params, prompts: list[list[int]], rng, *, config: ModelConfig, max_new_tokens: int,
             sampling=sampling_lib.SamplingConfig(), eos_id=None, pad_id: int = 0,
             prefill_chunk: int = 512, mesh=None) -> list[list[int]]:
  """Generates up to max_new_tokens after each prompt (a batch of token lists, any lengths).

  mesh: a `parallel.make_mesh` mesh to run on (params tensor-parallel, rows data-parallel).
  The model runs in the decoding layout (`transformer.unroll`).
  """
  prompt, lengths = pad_prompts(prompts, pad_id, config.vocab_size)
  check_token_id("eos_id", eos_id, config.vocab_size)
  config, params = unroll(config, params)
  kwargs = dict(config=config, sampling=sampling, eos_id=eos_id, pad_id=pad_id)
  (params,), prompt, lengths = parallel.place(mesh, (params,), prompt, lengths)
  with parallel.running_on(mesh):
    state = start(params, prompt, lengths, rng, max_new_tokens=max_new_tokens,
                  prefill_chunk=prefill_chunk, **kwargs)
    state = decode(params, parallel.place_state(mesh, state, len(prompts)), **kwargs)
  tokens, counts = parallel.to_host(state.tokens), parallel.to_host(state.num_emitted)
  return [row[:n].tolist() for row, n in zip(tokens, counts)]
