"""Retrieval-style long prompts: a needle hidden at a chosen depth of long filler text.

The prompt asks for the needle at its end, so a model answers only if what it kept of the prompt
still holds it; pruning the prompt (speculative prefill, KV selection) or drafting over a sparse
KV cache can lose it. `passkey_prompts` hides 5-digit keys in given filler tokens; `task_prompts`
assembles the `long_retrieval` dataset's tasks (pass key, key-value retrieval, passage
continuation) at any token length. Everything is seeded, so a table is reproducible.
"""

import dataclasses

import numpy as np

from budgetdraft.data.long_retrieval import TASKS, LongRetrieval

INTRO = ("There is a pass key hidden in the long text below. Find it and remember it: you will be "
         "asked for it at the end.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
  tokens: list[int]   # exactly the requested length
  answer: str         # the key, e.g. "40913"
  depth: float        # where the needle sits, as a fraction of the filler


def assemble(intro: list[int], filler, needle: list[int], question: list[int], length: int,
             depth: float) -> tuple[list[int], int]:
  """(a `length`-token prompt: intro, filler tokens with the needle at `depth`, question; the
  needle's first position)."""
  if not 0 <= depth <= 1:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  room = length - len(intro) - len(needle) - len(question)
  if room < 1 or len(filler) < room:
    raise ValueError(f"a {length}-token retrieval prompt needs {max(room, 1)} filler tokens "
                     f"(got {len(filler)}); raise the length or pass longer filler")
  filler = list(np.asarray(filler[:room]).tolist())
  at = int(round(depth * room))
  return intro + filler[:at] + needle + filler[at:] + question, len(intro) + at


def passkey_prompt(tokenizer, filler, length: int, depth: float, key: str) -> PasskeyPrompt:
  """A `length`-token prompt: intro, filler tokens with the needle at `depth`, question."""
  tokens, _ = assemble(tokenizer.encode(INTRO), filler,
                       tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(QUESTION),
                       length, depth)
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


def retrieved(text: str, answer: str, words: int = 8) -> bool:
  """Whether generated `text` holds a task answer's first `words` words (quotes and a final
  period aside; spacing free): the model found the needle."""
  core = " ".join(answer.strip().rstrip('."').split()[:words])
  return core in " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class TaskPrompt:
  tokens: list[int]   # exactly the requested length
  answer: str         # the text that correctly continues the prompt
  task: str
  depth: float        # where the inserted text sits, as a fraction of the filler
  inserted: tuple[int, int]  # its token span [start, end) in the prompt: what only it holds


def task_prompts(data_dir: str, task: str, tokenizer, length: int, count: int) -> list[TaskPrompt]:
  """`count` `length`-token prompts of a `long_retrieval` task, depths cycling over its depths
  (0.1, 0.3, ..., 0.9) before the next instance of each."""
  if task not in TASKS:
    raise ValueError(f"unknown retrieval task {task!r}; valid: {TASKS}")
  builder = LongRetrieval(data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f"long_retrieval is not prepared under {data_dir}; run `make data` "
                            f"(or experiments/prepare_data.py --data_dir={data_dir})")
  source = builder.as_data_source(split="validation")
  text = lambda value: value.decode("utf-8") if isinstance(value, bytes) else str(value)
  examples = [source[i] for i in range(len(source))]
  examples = sorted((e for e in examples if text(e["task"]) == task),
                    key=lambda e: (int(text(e["id"]).rsplit("/", 1)[1]), float(e["depth"])))
  if count > len(examples):
    raise ValueError(f"{count} {task} prompts asked for; long_retrieval holds {len(examples)}")
  prompts = []
  for e in examples[:count]:
    filler = tokenizer.encode(text(e["filler"]))
    insert = tokenizer.encode(text(e["insert"]))
    tokens, start = assemble(tokenizer.encode(text(e["intro"])), filler, insert,
                             tokenizer.encode(text(e["question"])), length, float(e["depth"]))
    prompts.append(TaskPrompt(tokens, text(e["answer"]), task, round(float(e["depth"]), 3),
                              (start, start + len(insert))))
  return prompts
