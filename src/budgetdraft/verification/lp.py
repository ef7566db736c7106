"""LP oracle: the best expected accepted length of any lossless verifier (scipy HiGHS).

Variables pi(x, j, k, y) >= 0: the probability that the K-path draft is x and the verifier keeps the
first k tokens of path j and then emits y. Constraints:
  - sum_{j,k,y} pi(x, j, k, y) = Q(x)                    (a verifier only splits each draft's mass);
  - for every z in V^(gamma+1):  sum_{x,j,k : x_j[:k] = z[:k]} pi(x, j, k, z_{k+1}) *
        P(z_{k+2:} | z_{<=k+1}) = P(z)                    (emitted + target continuation = target).
Objective: maximize sum k * pi. Both sides of the second family sum to 1, so it is posed as "<=",
which is equivalent and keeps HiGHS from declaring round-off (~1e-9) infeasible. The LP sees every probability (on- and off-path), so its optimum
bounds every verification rule; block verification attains it for K = 1.
"""

import functools
import itertools

import numpy as np
import scipy.optimize
import scipy.sparse

from budgetdraft.verification.exact import ModelPair, all_drafts, target_law


def _continuation_prob(pair: ModelPair, sequence: tuple, start: int) -> float:
  """P_target(sequence[start:] | sequence[:start])."""
  prob = 1.0
  for i in range(start, len(sequence)):
    prob *= pair.p(sequence[:i])[sequence[i]]
  return prob


def optimal_expected_accepted(pair: ModelPair, gamma: int, num_paths: int = 1) -> float:
  """LP optimum of E[accepted drafted tokens] over all lossless K-path verifiers."""
  vocab = pair.vocab_size
  drafts, draft_probs, _, _ = all_drafts(pair, gamma, num_paths)
  sequences = list(itertools.product(range(vocab), repeat=gamma + 1))
  sequence_index = {z: i for i, z in enumerate(sequences)}
  target = target_law(pair, gamma + 1)

  @functools.cache
  def completions(emitted: tuple) -> tuple:
    """(row of z, P_target(z after emitted)) for every z of gamma + 1 tokens extending emitted."""
    out = []
    for completion in itertools.product(range(vocab), repeat=gamma + 1 - len(emitted)):
      z = emitted + completion
      weight = _continuation_prob(pair, z, len(emitted))
      if weight > 0:
        out.append((sequence_index[z], weight))
    return tuple(out)

  law_rows, law_cols, law_values, objective = [], [], [], []
  column = 0
  for draft in drafts:
    for j, k, y in itertools.product(range(num_paths), range(gamma + 1), range(vocab)):
      for row, weight in completions(tuple(int(t) for t in draft[j, :k]) + (y,)):
        law_rows.append(row)
        law_cols.append(column)
        law_values.append(weight)
      objective.append(-float(k))
      column += 1
  per_draft = num_paths * (gamma + 1) * vocab
  draft_mass = scipy.sparse.kron(scipy.sparse.eye(len(drafts)), np.ones((1, per_draft)))
  emitted_law = scipy.sparse.csr_matrix((law_values, (law_rows, law_cols)),
                                        shape=(len(sequences), column))
  target_probs = np.array([target.get(z, 0.0) for z in sequences])
  result = scipy.optimize.linprog(np.array(objective), A_eq=draft_mass, b_eq=draft_probs,
                                  A_ub=emitted_law, b_ub=target_probs, bounds=(0, None),
                                  method="highs")
  if not result.success:
    raise RuntimeError(f"LP failed: {result.message}")
  return -result.fun
