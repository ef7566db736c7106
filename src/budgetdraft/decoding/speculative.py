"""Speculative decoding: a (sparse-cache) drafter proposes, the full-cache verifier checks, losslessly.

One round, all inside one jitted `lax.while_loop` over a static-shape `SpecState`:
  draft:   the drafter proposes K paths x gamma tokens (K rows per batch row), keeping q per token;
  verify:  the verifier scores [last token, all drafted tokens] in ONE forward with a tree mask;
  accept:  a verification rule (verification.RULES) picks the path, the accepted prefix and a token
           (under greedy sampling: `greedy`, which every lossless rule equals there);
  commit:  the verifier keeps the accepted path (a length change; for K > 1 the <= gamma accepted
           entries are first moved next to the prefix), the drafter rows copy the winning row.
The drafter re-feeds the last two emitted tokens each round ([previous, last] at their positions),
which rewrites identical entries when the previous token is already cached, so no per-case shapes
are needed after a fully accepted block. An EAGLE-style drafter (`feature_dim`) re-feeds them with
the verifier's hidden states one position earlier (`SpecState.features`, taken from the verify
forward), and each draft step feeds it its own last hidden state. `draft_step` and `verify_step`
expose one phase of a round on its own, for timing.
"""

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft import parallel, verification
from budgetdraft.decoding import sampling as sampling_lib
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache, SparseKVCache
from budgetdraft.models.prefill import (check_request, check_token_id, feature_inputs,
                                        pad_prompts, prefill, request_capacity)
from budgetdraft.models.transformer import Transformer, unroll
from budgetdraft.sparsity import selection


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """Static settings of a speculative run (hashable: a jit static argument)."""

  gamma: int = 4
  num_paths: int = 1
  rule: str = "block"
  sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig()
  max_new_tokens: int = 64
  eos_id: int | None = None
  pad_id: int = 0
  prefill_chunk: int = 512
  sparsity: selection.SparsityConfig | None = None  # None: the drafter keeps a full cache

  def __post_init__(self):
    if self.rule not in verification.RULES:
      raise ValueError(f"unknown rule {self.rule!r}; valid: {sorted(verification.RULES)}")
    for name in ("gamma", "num_paths", "max_new_tokens", "prefill_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.num_paths > 1 and self.rule in verification.SINGLE_PATH_RULES:
      multi = sorted(set(verification.RULES) - verification.SINGLE_PATH_RULES)
      raise ValueError(f"rule {self.rule!r} verifies one path; use one of {multi} for "
                       f"num_paths={self.num_paths}")

  @property
  def loop_rule(self) -> str:
    """The rule the loop runs. Under greedy sampling every lossless rule accepts exactly the
    longest drafted prefix that matches the verifier's argmax, which `greedy` finds without the
    sampling rules' passes over the vocabulary (~1 ms a round at V = 49152 on a 2-core CPU)."""
    return "greedy" if self.sampling.greedy else self.rule


@dataclasses.dataclass(frozen=True)
class RoundStats:
  """The verifier calls of speculative runs: counts[k] = rounds that accepted k drafted tokens
  (k = 0..gamma). Runs add with +."""

  counts: tuple[int, ...]

  @classmethod
  def of_rounds(cls, accepted_per_round, gamma: int) -> "RoundStats":
    return cls(tuple(np.bincount(np.asarray(accepted_per_round, int), minlength=gamma + 1)
                     .tolist()))

  def __add__(self, other: "RoundStats") -> "RoundStats":
    if len(other.counts) != len(self.counts):
      raise ValueError(f"cannot add runs with gamma {self.gamma} and {other.gamma}")
    return RoundStats(tuple(a + b for a, b in zip(self.counts, other.counts)))

  @property
  def gamma(self) -> int:
    return len(self.counts) - 1

  @property
  def rounds(self) -> int:
    return sum(self.counts)

  @property
  def accepted(self) -> int:
    return sum(k * n for k, n in enumerate(self.counts))

  @property
  def acceptance_rate(self) -> float:
    """Accepted drafted tokens / drafted tokens."""
    return self.accepted / max(1, self.rounds * self.gamma)

  @property
  def tokens_per_call(self) -> float:
    """Block efficiency: tokens emitted per verifier call."""
    return (self.accepted + self.rounds) / max(1, self.rounds)

  @property
  def tokens_per_call_stderr(self) -> float:
    """Standard error of `tokens_per_call`, treating rounds as independent draws."""
    if self.rounds < 2:
      return float("nan")
    counts = np.asarray(self.counts)
    deviation = np.arange(len(counts)) + 1 - self.tokens_per_call
    return float(np.sqrt((counts * deviation ** 2).sum() / (self.rounds - 1) / self.rounds))


@flax.struct.dataclass
class SpecState:
  verifier_cache: FullKVCache            # [B]; length = position of `last_two[:, 1]`
  drafter_cache: FullKVCache | SparseKVCache  # [B * K]
  tokens: jax.Array                      # [B, max_new + gamma + 1] emitted tokens
  num_emitted: jax.Array                 # [B]
  last_two: jax.Array                    # [B, 2] (previous, last) emitted or prompt tokens
  features: jax.Array                    # [B, 2, F] the drafter's feature inputs of last_two
                                         # (verifier hidden states; F = 0 without a feature input)
  done: jax.Array                        # [B] hit EOS
  rng: jax.Array
  accepted_counts: jax.Array             # [B, gamma + 1] the row's rounds that accepted k drafts

  @property
  def active_rounds(self):
    """[B] rounds in which the row was still generating."""
    return self.accepted_counts.sum(-1)

  @property
  def accepted(self):
    """[B] drafted tokens accepted."""
    return self.accepted_counts @ jnp.arange(self.accepted_counts.shape[-1])


def tree_mask(num_paths: int, gamma: int) -> np.ndarray:
  """[1 + K gamma, 1 + K gamma]: the last token, then K paths; a token sees the root and its path."""
  size = 1 + num_paths * gamma
  mask = np.zeros((size, size), bool)
  mask[:, 0] = True
  for path in range(num_paths):
    start = 1 + path * gamma
    mask[start:start + gamma, start:start + gamma] = np.tril(np.ones((gamma, gamma), bool))
  return mask


def tree_positions(num_paths: int, gamma: int) -> np.ndarray:
  return np.concatenate([[0]] + [np.arange(1, gamma + 1)] * num_paths)


_STATIC = ("verifier_config", "drafter_config", "spec")


def _logits(model, params, hidden):
  return model.apply({"params": params}, hidden, method=Transformer.logits)


@functools.partial(jax.jit, static_argnames=("verifier_config", "drafter_config", "capacity",
                                             "prefill_chunk"))
def prefill_caches(verifier_params, drafter_params, prompt, prompt_lengths, *,
                   verifier_config: ModelConfig, drafter_config: ModelConfig, capacity: int,
                   prefill_chunk: int):
  """(verifier logits [B, V] after the prompt, verifier cache, drafter's full cache, the verifier's
  hidden states [B, T, dim] over the prompt if the drafter takes them as features, else None)."""
  batch = prompt.shape[0]
  keep_hidden = bool(drafter_config.feature_dim)
  logits, verifier_cache, *hidden = prefill(
      Transformer(verifier_config), verifier_params, prompt, prompt_lengths,
      FullKVCache.init(verifier_config, batch, capacity), prefill_chunk, keep_hidden=keep_hidden)
  hidden = hidden[0] if keep_hidden else None
  _, drafter_cache = prefill(Transformer(drafter_config), drafter_params, prompt, prompt_lengths,
                             FullKVCache.init(drafter_config, batch, capacity), prefill_chunk,
                             features=None if hidden is None else feature_inputs(hidden))
  return logits, verifier_cache, drafter_cache, hidden


def _last_two_features(hidden, prompt_lengths, feature_dim: int):
  """[B, 2, F]: the feature inputs of the last prompt token and the first emitted one, i.e. the
  verifier's hidden states at positions P - 2 and P - 1 (zeros before the prompt)."""
  if not feature_dim:
    return jnp.zeros((prompt_lengths.shape[0], 2, 0), jnp.float32)
  positions = prompt_lengths[:, None] + jnp.array([[-2, -1]])
  rows = jnp.take_along_axis(hidden, jnp.maximum(positions, 0)[..., None], axis=1)
  return jnp.where((positions >= 0)[..., None], rows, 0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("drafter_config", "spec"))
def begin(drafter_params, logits, verifier_cache: FullKVCache, drafter_cache: FullKVCache, prompt,
          prompt_lengths, rng, verifier_hidden=None, kv_scores=None, *,
          drafter_config: ModelConfig, spec: SpeculativeConfig):
  """From prefilled caches (`prefill_caches`, or a speculative prefill: `specprefill`):
  compresses the drafter's cache by the policy (kv_scores: the policy's scores if already
  computed) and emits the first token. verifier_hidden: the verifier's hidden states [B, T, dim]
  over the prompt, required by a drafter with a feature input. The caches are not changed, so one
  prefill serves several specs."""
  batch = prompt.shape[0]
  if drafter_config.feature_dim and verifier_hidden is None:
    raise ValueError("this drafter takes the verifier's hidden states: pass verifier_hidden")
  needed = request_capacity(prompt.shape[1], positions_after_prompt(spec), spec.prefill_chunk)
  if verifier_cache.capacity < needed:
    raise ValueError(f"prefilled caches hold {verifier_cache.capacity} positions; this spec "
                     f"needs {needed}")
  rng, first_rng, policy_rng = jax.random.split(rng, 3)
  first = sampling_lib.sample(first_rng, sampling_lib.probabilities(logits, spec.sampling),
                               spec.sampling)
  if spec.sparsity is not None:
    features = None if not drafter_config.feature_dim else feature_inputs(verifier_hidden)
    drafter_cache = selection.sparse_cache(drafter_config, drafter_params, drafter_cache, prompt,
                                           prompt_lengths, spec.sparsity, spec.gamma, policy_rng,
                                           kv_scores, features)
  drafter_cache = drafter_cache.gather_rows(jnp.repeat(jnp.arange(batch), spec.num_paths))

  previous = jnp.take_along_axis(prompt, (prompt_lengths - 1)[:, None], axis=1)[:, 0]
  tokens = jnp.full((batch, spec.max_new_tokens + spec.gamma + 1), spec.pad_id, jnp.int32)
  done = first == spec.eos_id if spec.eos_id is not None else jnp.zeros((batch,), bool)
  return SpecState(verifier_cache=verifier_cache, drafter_cache=drafter_cache,
                   tokens=tokens.at[:, 0].set(first), num_emitted=jnp.ones((batch,), jnp.int32),
                   last_two=jnp.stack([previous, first], axis=1),
                   features=_last_two_features(verifier_hidden, prompt_lengths,
                                               drafter_config.feature_dim),
                   done=done, rng=rng,
                   accepted_counts=jnp.zeros((batch, spec.gamma + 1), jnp.int32))


@functools.partial(jax.jit, static_argnames=_STATIC)
def start(verifier_params, drafter_params, prompt, prompt_lengths, rng, *,
          verifier_config: ModelConfig, drafter_config: ModelConfig, spec: SpeculativeConfig):
  """Prefills both models (compressing the drafter cache) and emits the first token."""
  caches = prefill_caches(verifier_params, drafter_params, prompt, prompt_lengths,
                          verifier_config=verifier_config, drafter_config=drafter_config,
                          capacity=check_request(verifier_config, prompt.shape[1],
                                                 positions_after_prompt(spec), spec.prefill_chunk),
                          prefill_chunk=spec.prefill_chunk)
  logits, verifier_cache, drafter_cache, hidden = caches
  return begin(drafter_params, logits, verifier_cache, drafter_cache, prompt, prompt_lengths, rng,
               hidden, drafter_config=drafter_config, spec=spec)


def _draft(drafter_config: ModelConfig, drafter_params, cache, last_two, features, root, rng,
           spec: SpeculativeConfig):
  """gamma draft tokens on each of K paths and their laws q: ([B, K, gamma], [B, K, gamma, V], cache).

  cache: the drafter's [B * K] rows; last_two: [B, 2] tokens at positions root - 1, root [B],
  re-fed by each batch row's K drafter rows; features: their feature inputs [B, 2, F] (used
  only by a drafter with a feature input, which then feeds each draft its own last hidden state).
  """
  drafter = Transformer(drafter_config)
  batch, num_paths = last_two.shape[0], spec.num_paths
  with_features = bool(drafter_config.feature_dim)
  feed = lambda f: f if with_features else None
  root = jnp.repeat(root, num_paths)
  positions = root[:, None] + jnp.array([[-1, 0]])
  hidden, cache = drafter.apply({"params": drafter_params}, jnp.repeat(last_two, num_paths, 0),
                                positions, cache.truncate(root - 1),
                                features=feed(jnp.repeat(features, num_paths, 0)))
  logits = _logits(drafter, drafter_params, hidden[:, -1])
  rngs = jax.random.split(rng, spec.gamma)

  def step(carry, i):
    cache, logits, last_hidden = carry
    q = sampling_lib.probabilities(logits, spec.sampling)
    token = sampling_lib.sample(rngs[i], q, spec.sampling)
    hidden, cache = drafter.apply({"params": drafter_params}, token[:, None],
                                  (root + 1 + i)[:, None], cache,
                                  features=feed(last_hidden[:, None]))
    return (cache, _logits(drafter, drafter_params, hidden[:, 0]), hidden[:, 0]), (token, q)

  (cache, logits, _), (tokens, q) = jax.lax.scan(step, (cache, logits, hidden[:, -1]),
                                                 jnp.arange(spec.gamma - 1))
  q_last = sampling_lib.probabilities(logits, spec.sampling)
  last = sampling_lib.sample(rngs[-1], q_last, spec.sampling)
  tokens = jnp.concatenate([tokens, last[None]], axis=0)
  q = jnp.concatenate([q, q_last[None]], axis=0)
  return (tokens.T.reshape(batch, num_paths, spec.gamma),
          q.transpose(1, 0, 2).reshape(batch, num_paths, spec.gamma, -1), cache)


def _path_sources(num_paths: int, gamma: int) -> np.ndarray:
  """[K, gamma + 1] tree index of path k at depth i: the root (i = 0), then path token i - 1."""
  return np.array([[0] + [1 + k * gamma + i for i in range(gamma)] for k in range(num_paths)])


def _verify(verifier_config: ModelConfig, verifier_params, cache: FullKVCache, last, drafts,
            spec: SpeculativeConfig):
  """One verifier forward over the draft tree: (p [B, K, gamma + 1, V], cache with the tree,
  hidden states [B, K, gamma + 1, dim] along each path).

  The tree is the newest emitted token last [B] (at position cache.length) and the K paths
  drafts [B, K, gamma].
  """
  verifier = Transformer(verifier_config)
  batch, num_paths, gamma = drafts.shape
  mask = jnp.asarray(tree_mask(num_paths, gamma))
  positions = cache.length[:, None] + jnp.asarray(tree_positions(num_paths, gamma))[None, :]
  tree = jnp.concatenate([last[:, None], drafts.reshape(batch, -1)], axis=1)
  hidden, cache = verifier.apply({"params": verifier_params}, tree, positions, cache,
                                 jnp.broadcast_to(mask, (batch,) + mask.shape))
  logits = _logits(verifier, verifier_params, hidden)                   # [B, 1 + K gamma, V]
  # p for path k at depth i comes from the token before it: the root (i = 0) or path token i-1.
  source = _path_sources(num_paths, gamma)
  return sampling_lib.probabilities(logits[:, source], spec.sampling), cache, hidden[:, source]


@functools.partial(jax.jit, static_argnames=("drafter_config", "spec"),
                   donate_argnames=("drafter_cache",))
def draft_step(drafter_params, drafter_cache, last_two, features, root, rng, *,
               drafter_config: ModelConfig, spec: SpeculativeConfig):
  """The draft phase of a round on its own (for timing): (drafts [B, K, gamma], q, cache).

  Arguments are the `SpecState` fields the phase reads (root = verifier_cache.length); the cache
  is donated and returned, so it is updated in place as in the loop's carry.
  """
  return _draft(drafter_config, drafter_params, drafter_cache, last_two, features, root, rng,
                spec)


@functools.partial(jax.jit, static_argnames=("verifier_config", "spec"),
                   donate_argnames=("verifier_cache",))
def verify_step(verifier_params, verifier_cache, last, drafts, *, verifier_config: ModelConfig,
                spec: SpeculativeConfig):
  """The verify phase of a round on its own (for timing): (p [B, K, gamma + 1, V], cache, hidden).

  last = last_two[:, 1] of the `SpecState`; the cache is donated and returned as in the loop.
  """
  return _verify(verifier_config, verifier_params, verifier_cache, last, drafts, spec)


def _keep_path(cache: FullKVCache, root, path, gamma: int) -> FullKVCache:
  """Moves the gamma tree entries of `path` right after the root, where the prefix continues."""
  target = (root - cache.skipped)[:, None] + 1 + jnp.arange(gamma)[None, :]  # [B, gamma] slots
  source = target + (path * gamma)[:, None]
  rows = jnp.arange(target.shape[0])[:, None]

  def move(x):  # [..., B, Hkv, S, D]
    return x.at[..., rows, :, target, :].set(x[..., rows, :, source, :])

  return cache.map_slots(move)


def _emitted(chosen, num_accepted, next_token, running, done, spec):
  """This round's tokens per row: the accepted drafts then the verifier's token, cut after EOS.

  Returns (emitted [B, gamma + 1] padded with pad_id, count [B] (0 for finished rows), done [B]).
  """
  gamma = chosen.shape[1]
  index = jnp.arange(gamma + 1)[None, :]
  emitted = jnp.where(index < num_accepted[:, None], jnp.pad(chosen, ((0, 0), (0, 1))),
                      next_token[:, None])
  count = num_accepted + 1
  if spec.eos_id is not None:
    is_eos = (emitted == spec.eos_id) & (index < count[:, None])
    hit = is_eos.any(axis=1)
    count = jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, count)
    done = done | (hit & running)
  count = jnp.where(running, count, 0)
  return jnp.where(index < count[:, None], emitted, spec.pad_id), count, done


def _active(state: SpecState, spec: SpeculativeConfig):
  """[B] rows still generating."""
  return ~state.done & (state.num_emitted < spec.max_new_tokens)


def _round(verifier_params, drafter_params, state: SpecState, verifier_config: ModelConfig,
           drafter_config: ModelConfig, spec: SpeculativeConfig) -> SpecState:
  """One round: draft, verify, accept, commit. Rows already finished keep their tokens."""
  batch = state.num_emitted.shape[0]
  num_paths, gamma = spec.num_paths, spec.gamma
  rng, draft_rng, verify_rng = jax.random.split(state.rng, 3)
  root = state.verifier_cache.length                                     # [B]
  drafts, q, drafter_cache = _draft(drafter_config, drafter_params, state.drafter_cache,
                                    state.last_two, state.features, root, draft_rng, spec)
  p, verifier_cache, hidden = _verify(verifier_config, verifier_params, state.verifier_cache,
                                      state.last_two[:, 1], drafts, spec)
  num_accepted, next_token, path = jax.vmap(verification.RULES[spec.loop_rule])(
      drafts, q, p, jax.random.split(verify_rng, batch))

  running = _active(state, spec)
  num_accepted = jnp.where(running, num_accepted, 0)
  if num_paths > 1:
    verifier_cache = _keep_path(verifier_cache, root, path, gamma)
    winners = jnp.repeat(jnp.arange(batch) * num_paths + path, num_paths)
    drafter_cache = drafter_cache.gather_rows(winners)
  verifier_cache = verifier_cache.truncate(root + jnp.where(running, 1 + num_accepted, 0))

  chosen = jnp.take_along_axis(drafts, path[:, None, None], axis=1)[:, 0]   # [B, gamma]
  emitted, count, done = _emitted(chosen, num_accepted, next_token, running, state.done, spec)
  write = lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (at,))
  tokens = jnp.where(running[:, None],
                     jax.vmap(write)(state.tokens, emitted, state.num_emitted), state.tokens)
  previous = jnp.where(num_accepted > 0,
                       jnp.take_along_axis(chosen, jnp.maximum(num_accepted - 1, 0)[:, None],
                                           axis=1)[:, 0], state.last_two[:, 1])
  last_two = jnp.where(running[:, None], jnp.stack([previous, next_token], axis=1),
                       state.last_two)
  features = state.features
  if drafter_config.feature_dim:
    # The hidden states that predicted `previous` and `next_token`: path depths accepted - 1 and
    # accepted (depth -1 is the root's feature, kept from the previous round).
    along = jnp.take_along_axis(hidden, path[:, None, None, None], axis=1)[:, 0]  # [B, g + 1, d]
    at = lambda depth: jnp.take_along_axis(along, depth[:, None, None], axis=1)[:, 0]
    previous_feature = jnp.where((num_accepted > 0)[:, None],
                                 at(jnp.maximum(num_accepted - 1, 0)), state.features[:, 1])
    features = jnp.where(running[:, None, None],
                         jnp.stack([previous_feature, at(num_accepted)], axis=1).astype(
                             features.dtype), state.features)
  return state.replace(
      verifier_cache=verifier_cache, drafter_cache=drafter_cache, tokens=tokens,
      num_emitted=state.num_emitted + count, last_two=last_two, features=features, done=done,
      rng=rng,
      accepted_counts=state.accepted_counts + running[:, None] * jax.nn.one_hot(
          num_accepted, gamma + 1, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode(verifier_params, drafter_params, state: SpecState, *, verifier_config: ModelConfig,
           drafter_config: ModelConfig, spec: SpeculativeConfig) -> SpecState:
  """Speculative rounds until every row hit EOS or emitted max_new_tokens."""
  one_round = lambda s: _round(verifier_params, drafter_params, s, verifier_config,
                               drafter_config, spec)
  return jax.lax.while_loop(lambda s: jnp.any(_active(s, spec)), one_round, state)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def step(verifier_params, drafter_params, state: SpecState, *, verifier_config: ModelConfig,
         drafter_config: ModelConfig, spec: SpeculativeConfig) -> SpecState:
  """One round of `decode`, for callers that stream tokens as rounds decide them. The state is
  donated (updated in place, as in the loop's carry)."""
  return _round(verifier_params, drafter_params, state, verifier_config, drafter_config, spec)


def finished(state: SpecState, spec: SpeculativeConfig) -> bool:
  """Whether every row hit EOS or emitted max_new_tokens (host-side)."""
  return not bool(jnp.any(_active(state, spec)))


def positions_after_prompt(spec: SpeculativeConfig) -> int:
  """Cache positions past the prompt: max_new_tokens and a last round's whole draft tree."""
  return spec.max_new_tokens + spec.num_paths * spec.gamma + 1


def generate(verifier_params, drafter_params, prompts: list[list[int]], rng, *,
             verifier_config: ModelConfig, drafter_config: ModelConfig, spec: SpeculativeConfig,
             mesh=None):
  """(token lists, `RoundStats`) for a batch of prompts.

  mesh: a `parallel.make_mesh` mesh to run on (both models tensor-parallel, rows data-parallel).
  The verifier runs in the decoding layout (`transformer.unroll`); the drafter as given.
  """
  if drafter_config.vocab_size != verifier_config.vocab_size:
    raise ValueError(f"drafter vocab {drafter_config.vocab_size} != verifier vocab "
                     f"{verifier_config.vocab_size}: they must share the tokenizer")
  prompt, lengths = pad_prompts(prompts, spec.pad_id, verifier_config.vocab_size)
  check_token_id("eos_id", spec.eos_id, verifier_config.vocab_size)
  if spec.sparsity is not None and spec.sparsity.window > int(lengths.min()):
    raise ValueError(f"sparsity window {spec.sparsity.window} exceeds the shortest prompt "
                     f"({int(lengths.min())} tokens)")
  verifier_config, verifier_params = unroll(verifier_config, verifier_params)
  static = dict(verifier_config=verifier_config, drafter_config=drafter_config, spec=spec)
  (verifier_params, drafter_params), prompt, lengths = parallel.place(
      mesh, (verifier_params, drafter_params), prompt, lengths)
  with parallel.running_on(mesh):
    state = start(verifier_params, drafter_params, prompt, lengths, rng, **static)
    state = decode(verifier_params, drafter_params,
                   parallel.place_state(mesh, state, len(prompts)), **static)
  return outputs_and_stats(state, spec)


def outputs_and_stats(state: SpecState, spec: SpeculativeConfig):
  """(emitted token lists, `RoundStats` summed over the batch) of a finished run."""
  tokens, counts = parallel.to_host(state.tokens), parallel.to_host(state.num_emitted)
  counts = np.minimum(counts, spec.max_new_tokens)
  stats = RoundStats(tuple(parallel.to_host(state.accepted_counts).sum(0).tolist()))
  return [row[:n].tolist() for row, n in zip(tokens, counts)], stats
