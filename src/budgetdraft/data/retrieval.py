"""Retrieval-style long prompts: a pass key hidden at a chosen depth of long filler text.

The prompt asks for the key at its end, so a model answers only if what it kept of the prompt still
holds the needle; pruning the prompt (speculative prefill, KV selection) can lose it. Keys are
random 5-digit numbers drawn from a seeded generator, so a table is reproducible.
"""

import dataclasses

import numpy as np

INTRO = ("There is a pass key hidden in the long text below. Find it and remember it: you will be "
         "asked for it at the end.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
  tokens: list[int]   # exactly the requested length
  answer: str         # the key, e.g. "40913"
  depth: float        # where the needle sits, as a fraction of the filler


def passkey_prompt(tokenizer, filler, length: int, depth: float, key: str) -> PasskeyPrompt:
  """A `length`-token prompt: intro, filler tokens with the needle at `depth`, question."""
  if not 0 <= depth <= 1:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  intro, question = tokenizer.encode(INTRO), tokenizer.encode(QUESTION)
  needle = tokenizer.encode(NEEDLE.format(key=key))
  room = length - len(intro) - len(needle) - len(question)
  if room < 1 or len(filler) < room:
    raise ValueError(f"a {length}-token pass-key prompt needs {max(room, 1)} filler tokens "
                     f"(got {len(filler)}); raise the length or pass longer filler")
  filler = list(np.asarray(filler[:room]).tolist())
  at = int(round(depth * room))
  tokens = intro + filler[:at] + needle + filler[at:] + question
  return PasskeyPrompt(tokens=tokens, answer=key, depth=depth)


def passkey_prompts(tokenizer, fillers, length: int, count: int, seed: int = 0):
  """`count` prompts, depths spread evenly over [0.1, 0.9], filler i from fillers[i % N]."""
  rng = np.random.default_rng(seed)
  depths = np.linspace(0.1, 0.9, count) if count > 1 else np.array([0.5])
  return [passkey_prompt(tokenizer, fillers[i % len(fillers)], length, float(depth),
                         str(rng.integers(10000, 100000)))
          for i, depth in enumerate(depths)]


def answered(text: str, prompt: PasskeyPrompt) -> bool:
  """Whether generated `text` states the key."""
  return prompt.answer in text.replace(" ", "")
