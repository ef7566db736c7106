"""Exact laws of verification rules on tiny vocabularies, for any target/draft pair.

A pair gives the target's and the drafter's next-token laws after every prefix (`ModelPair`):
Markov chains, laws that depend on the whole prefix, and sparse rows (zeros in p or q, as after
top-k / top-p). Every draft outcome is enumerated with its probability, and every random branch of
a rule through its outcome law, so the emitted-sequence distribution is computed exactly, never
sampled. This is the proof of losslessness (tests) and the source of exact block efficiencies
(tables).
"""

import dataclasses
import functools
import itertools
from typing import Protocol

import jax
import numpy as np

from budgetdraft.verification import block, gbv, greedy, multipath, tokenwise


class ModelPair(Protocol):
  vocab_size: int

  def p(self, prefix: tuple[int, ...]) -> np.ndarray:
    """The target's next-token law [V] after `prefix` (the tokens following a fixed context)."""

  def q(self, prefix: tuple[int, ...]) -> np.ndarray:
    """The drafter's next-token law [V] after `prefix`."""


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovPair:
  """Target and draft next-token laws that depend on the previous token only."""

  target: np.ndarray  # [V, V], row = previous token
  draft: np.ndarray   # [V, V]
  context: int        # the token before the block

  @property
  def vocab_size(self) -> int:
    return self.target.shape[0]

  def p(self, prefix):
    return self.target[prefix[-1] if prefix else self.context]

  def q(self, prefix):
    return self.draft[prefix[-1] if prefix else self.context]


def _softmax(x):
  return np.exp(x) / np.exp(x).sum(-1, keepdims=True)


def random_markov_pair(seed: int, vocab_size: int, mix: float, sharpness: float = 2.0,
                       greedy_target: bool = False) -> MarkovPair:
  """Draft = (1 - mix) * target + mix * an independent random model; mix sets the divergence."""
  rng = np.random.default_rng(seed)
  target = _softmax(sharpness * rng.normal(size=(vocab_size, vocab_size)))
  other = _softmax(sharpness * rng.normal(size=(vocab_size, vocab_size)))
  draft = (1 - mix) * target + mix * other
  if greedy_target:
    target = np.eye(vocab_size)[target.argmax(-1)]
  return MarkovPair(target, draft, int(rng.integers(vocab_size)))


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixPair:
  """Laws that depend on the whole prefix: every prefix draws its own random rows.

  Draft = (1 - mix) * target + mix * other, as in `random_markov_pair`. With `support`, each row
  of p and of q keeps only `support` random tokens (independently, so supports differ), like
  rows after top-k.
  """

  seed: int
  vocab_size: int
  mix: float
  sharpness: float = 2.0
  support: int | None = None

  @functools.cache
  def _rows(self, prefix: tuple[int, ...]):
    rng = np.random.default_rng([self.seed, len(prefix), *prefix])
    logits = self.sharpness * rng.normal(size=(2, self.vocab_size))
    if self.support is not None:
      dropped = np.argsort(rng.random((2, self.vocab_size)), axis=-1)[:, self.support:]
      np.put_along_axis(logits, dropped, -np.inf, axis=-1)
    target, other = _softmax(logits)
    draft = (1 - self.mix) * target + self.mix * other
    if self.support is not None:  # the mix would refill the draft's support: cut it again
      draft = np.where(np.isfinite(logits[1]), draft, 0.0)
      draft = draft / draft.sum()
    return target, draft

  def p(self, prefix):
    return self._rows(tuple(prefix))[0]

  def q(self, prefix):
    return self._rows(tuple(prefix))[1]


def iid_pair(p: np.ndarray, q: np.ndarray) -> MarkovPair:
  """Positions independent and identically distributed (the BV paper's toy example)."""
  return MarkovPair(np.stack([p] * len(p)), np.stack([q] * len(q)), 0)


def path_rows(pair: ModelPair, tokens) -> tuple[np.ndarray, np.ndarray]:
  """(q rows [len, V], p rows [len + 1, V]): the laws after each prefix of `tokens`."""
  prefixes = [tuple(int(t) for t in tokens[:i]) for i in range(len(tokens) + 1)]
  return (np.stack([pair.q(x) for x in prefixes[:-1]]), np.stack([pair.p(x) for x in prefixes]))


def all_drafts(pair: ModelPair, gamma: int, num_paths: int):
  """Every K-path draft of nonzero probability: (draft_tokens [N, K, gamma], prob [N],
  q [N, K, gamma, V], p [N, K, gamma + 1, V])."""
  paths = np.array(list(itertools.product(range(pair.vocab_size), repeat=gamma)), int)
  q_rows, p_rows = map(np.stack, zip(*(path_rows(pair, t) for t in paths)))
  path_prob = np.prod(np.take_along_axis(q_rows, paths[..., None], -1)[..., 0], axis=-1)
  possible = np.flatnonzero(path_prob > 0)
  combos = np.array(list(itertools.product(possible, repeat=num_paths)), int)
  return (paths[combos], np.prod(path_prob[combos], axis=-1), q_rows[combos], p_rows[combos])


def mean_total_variation(pair: ModelPair, depth: int) -> float:
  """TV(q, p) averaged over every prefix shorter than `depth` (the nodes a draft can reach)."""
  prefixes = [x for n in range(depth) for x in itertools.product(range(pair.vocab_size), repeat=n)]
  return float(np.mean([0.5 * np.abs(pair.q(x) - pair.p(x)).sum() for x in prefixes]))


def _single_path(law):
  batched = jax.jit(jax.vmap(law))

  def outcomes(drafts, q, p):
    stop_probs, next_dists = map(np.asarray, batched(drafts[:, 0], q[:, 0], p[:, 0]))
    return [{(0, k): (s[k], d[k]) for k in range(len(s)) if s[k] > 0}
            for s, d in zip(stop_probs, next_dists)]
  return outcomes


def _multi_path(law):
  """Outcomes of a law in the (stop_probs [K, gamma + 1], next_dists [K, gamma + 1, V]) form."""
  batched = jax.jit(jax.vmap(law))

  def outcomes(drafts, q, p):
    stop_probs, next_dists = map(np.asarray, batched(drafts, q, p))
    return [{(j, k): (s[j, k], d[j, k]) for j, k in zip(*np.nonzero(s > 0))}
            for s, d in zip(stop_probs, next_dists)]
  return outcomes


def _greedy_outcomes(drafts, q, p):
  verify = jax.jit(jax.vmap(greedy.verify_greedy))
  num_accepted, token, path = map(np.asarray, verify(drafts, q, p, np.zeros(len(drafts))))
  vocab = p.shape[-1]
  return [{(int(j), int(k)): (1.0, np.eye(vocab)[t])} for k, t, j in zip(num_accepted, token, path)]


def _residual_bv_outcomes(drafts, q, p):
  return [multipath.residual_bv_outcomes(x, qq, pp) for x, qq, pp in zip(drafts, q, p)]


# name -> (outcome laws of a batch of drafts, paths the rule uses (None = any K)).
OUTCOMES = {
    "tokenwise": (_single_path(tokenwise.tokenwise_law), 1),
    "block": (_single_path(block.block_law), 1),
    "specinfer": (_multi_path(multipath.specinfer_law), None),
    "residual_bv": (_residual_bv_outcomes, None),
    "gbv": (_multi_path(gbv.gbv_law), None),
    "greedy": (_greedy_outcomes, None),
}


def _continue_with_target(pair: ModelPair, prefix: tuple, prob: float, length: int, out: dict):
  """Adds prob * P_target(completion | prefix) for every completion of prefix to `length` tokens."""
  if len(prefix) == length:
    out[prefix] = out.get(prefix, 0.0) + prob
    return
  for token, next_prob in enumerate(pair.p(prefix)):
    if next_prob > 0:
      _continue_with_target(pair, prefix + (token,), prob * next_prob, length, out)


def target_law(pair: ModelPair, length: int) -> dict:
  out = {}
  _continue_with_target(pair, (), 1.0, length, out)
  return out


def emitted_law(pair: ModelPair, method: str, gamma: int, num_paths: int = 1):
  """(law of the first gamma + 1 output tokens {sequence: prob}, expected accepted drafted tokens).

  The output is the rule's emitted tokens followed by target sampling, as in the decoding loop.
  """
  outcomes_fn, required_paths = OUTCOMES[method]
  if required_paths is not None and num_paths != required_paths:
    raise ValueError(f"{method} verifies {required_paths} path(s), got num_paths={num_paths}")
  drafts, draft_probs, q, p = all_drafts(pair, gamma, num_paths)
  emitted, expected_accepted = {}, 0.0
  for draft, draft_prob, outcomes in zip(drafts, draft_probs, outcomes_fn(drafts, q, p)):
    for (path, accepted), (stop_prob, next_law) in outcomes.items():
      expected_accepted += draft_prob * stop_prob * accepted
      prefix = tuple(int(t) for t in draft[path, :accepted])
      for token, token_prob in enumerate(next_law):
        mass = draft_prob * stop_prob * token_prob
        if mass > 0:
          emitted[prefix + (token,)] = emitted.get(prefix + (token,), 0.0) + mass
  law = {}
  for prefix, mass in emitted.items():
    _continue_with_target(pair, prefix, mass, gamma + 1, law)
  return law, expected_accepted


def total_variation(law_a: dict, law_b: dict) -> float:
  keys = set(law_a) | set(law_b)
  return 0.5 * sum(abs(law_a.get(k, 0.0) - law_b.get(k, 0.0)) for k in keys)
