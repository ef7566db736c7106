"""How repetitive a generated continuation is, to read beside its acceptance.

A drafter that ignores the distant context is accepted often on text that repeats itself (greedy
continuations of a small model loop), so a high acceptance says little until the repetition of
the text it was measured on is known (issue 19; BUDGETDRAFT_SETUP.md, "What to weigh").
- `distinct_ratio`: distinct n-grams / n-grams of the continuation (1 = no n-gram repeats);
- `copy_share`: the share of continuation tokens that complete an n-gram already seen earlier in
  the context or the continuation, i.e. tokens that copying could have predicted.
"""

from collections.abc import Sequence


def _ngrams(tokens: Sequence[int], n: int):
  return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_ratio(continuation: Sequence[int], n: int) -> float:
  """Distinct n-grams / n-grams of `continuation` (nan if it is shorter than n)."""
  grams = _ngrams(list(continuation), n)
  return len(set(grams)) / len(grams) if grams else float("nan")


def copy_share(context: Sequence[int], continuation: Sequence[int], n: int = 4) -> float:
  """Share of continuation tokens whose n-gram (the token and the n - 1 before it) occurred
  earlier in context + continuation (nan for an empty continuation)."""
  if not continuation:
    return float("nan")
  tokens = list(context) + list(continuation)
  seen = set(_ngrams(list(context), n))
  copied = 0
  for end in range(len(context), len(tokens)):
    gram = tuple(tokens[end - n + 1:end + 1]) if end >= n - 1 else None
    copied += gram in seen
    if gram is not None:
      seen.add(gram)
  return copied / len(continuation)
