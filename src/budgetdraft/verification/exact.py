"""Exact laws of verification rules on Markov target/draft pairs over tiny vocabularies.

Every draft outcome is enumerated with its probability, and every random branch of a rule through
its outcome law, so the emitted-sequence distribution is computed exactly, never sampled. This is
the proof of losslessness (tests) and the source of exact block efficiencies (tables).
"""

import dataclasses
import itertools

import jax
import numpy as np

from budgetdraft.verification import block, greedy, multipath, tokenwise


@dataclasses.dataclass(frozen=True)
class MarkovPair:
  """Target and draft next-token laws that depend on the previous token only."""

  target: np.ndarray  # [V, V], row = previous token
  draft: np.ndarray   # [V, V]
  context: int        # the token before the block

  @property
  def vocab_size(self) -> int:
    return self.target.shape[0]


def random_markov_pair(seed: int, vocab_size: int, mix: float, sharpness: float = 2.0,
                       greedy_target: bool = False) -> MarkovPair:
  """Draft = (1 - mix) * target + mix * an independent random model; mix sets the divergence."""
  rng = np.random.default_rng(seed)
  softmax = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  target = softmax(sharpness * rng.normal(size=(vocab_size, vocab_size)))
  other = softmax(sharpness * rng.normal(size=(vocab_size, vocab_size)))
  draft = (1 - mix) * target + mix * other
  if greedy_target:
    target = np.eye(vocab_size)[target.argmax(-1)]
  return MarkovPair(target, draft, int(rng.integers(vocab_size)))


def path_rows(model: np.ndarray, context: int, tokens) -> np.ndarray:
  """[len(tokens) + 1, V]: the model's next-token law after each prefix of tokens."""
  return model[np.concatenate([[context], np.asarray(tokens, int)])]


def all_drafts(pair: MarkovPair, gamma: int, num_paths: int):
  """Every K-path draft: (draft_tokens [N, K, gamma], prob [N], q [N, K, gamma, V], p [N, K, gamma+1, V])."""
  vocab = pair.vocab_size
  paths = np.array(list(itertools.product(range(vocab), repeat=gamma)), int)  # [V^gamma, gamma]
  q_rows = np.stack([path_rows(pair.draft, pair.context, t)[:gamma] for t in paths])
  p_rows = np.stack([path_rows(pair.target, pair.context, t) for t in paths])
  path_prob = np.prod(np.take_along_axis(q_rows, paths[..., None], -1)[..., 0], axis=-1)
  combos = np.array(list(itertools.product(range(len(paths)), repeat=num_paths)), int)
  return (paths[combos], np.prod(path_prob[combos], axis=-1), q_rows[combos], p_rows[combos])


def _single_path(law):
  batched = jax.jit(jax.vmap(law))

  def outcomes(drafts, q, p):
    stop_probs, next_dists = map(np.asarray, batched(drafts[:, 0], q[:, 0], p[:, 0]))
    return [{(0, k): (s[k], d[k]) for k in range(len(s)) if s[k] > 0}
            for s, d in zip(stop_probs, next_dists)]
  return outcomes


def _greedy_outcomes(drafts, q, p):
  verify = jax.jit(jax.vmap(greedy.verify_greedy))
  num_accepted, token, path = map(np.asarray, verify(drafts, q, p, np.zeros(len(drafts))))
  vocab = p.shape[-1]
  return [{(int(j), int(k)): (1.0, np.eye(vocab)[t])} for k, t, j in zip(num_accepted, token, path)]


def _specinfer_outcomes(drafts, q, p):
  law = jax.jit(jax.vmap(multipath.specinfer_law))
  stop_probs, next_dists = map(np.asarray, law(drafts, q, p))
  return [{(j, k): (s[j, k], d[j, k]) for j in range(s.shape[0]) for k in range(s.shape[1])
           if s[j, k] > 0} for s, d in zip(stop_probs, next_dists)]


def _gbv_outcomes(drafts, q, p):
  return [multipath.gbv_outcomes(x, qq, pp) for x, qq, pp in zip(drafts, q, p)]


# name -> (outcome laws of a batch of drafts, paths the rule uses (None = any K)).
OUTCOMES = {
    "tokenwise": (_single_path(tokenwise.tokenwise_law), 1),
    "block": (_single_path(block.block_law), 1),
    "specinfer": (_specinfer_outcomes, None),
    "gbv": (_gbv_outcomes, None),
    "greedy": (_greedy_outcomes, None),
}


def _continue_with_target(pair: MarkovPair, prefix: tuple, prob: float, length: int, out: dict):
  """Adds prob * P_target(completion | prefix) for every completion of prefix to `length` tokens."""
  if len(prefix) == length:
    out[prefix] = out.get(prefix, 0.0) + prob
    return
  previous = prefix[-1] if prefix else pair.context
  for token, next_prob in enumerate(pair.target[previous]):
    if next_prob > 0:
      _continue_with_target(pair, prefix + (token,), prob * next_prob, length, out)


def target_law(pair: MarkovPair, length: int) -> dict:
  out = {}
  _continue_with_target(pair, (), 1.0, length, out)
  return out


def emitted_law(pair: MarkovPair, method: str, gamma: int, num_paths: int = 1):
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
