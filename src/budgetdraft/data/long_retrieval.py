"""`long_retrieval`: LongBench-style synthetic tasks over our books, as a TFDS array_record dataset.

Each example is one task instance whose answer only a distant part of the prompt holds:
  passkey       a 5-digit key stated once in book filler, asked for at the end;
  kv_retrieval  a block of 16 random key-value pairs (8 hex digits each), one value asked for;
  copy          a 48-word passage of another book quoted once, the prompt ends with its first
                8 words and asks to continue it (the answer is the other 40).
The inserted text sits at a depth of the filler (0.1-0.9). Examples hold text, not tokens: filler,
inserted text, question and answer, so that one dataset serves any tokenizer and any prompt length
(4K, 8K, 16K); `retrieval.task_prompts` assembles prompts of an exact token length. Everything comes
from the validation split of `long_books`, so no text a drafter trained on appears in it.
"""

import numpy as np
import tensorflow_datasets as tfds

from budgetdraft.data.long_books import LongBooks

TASKS = ("passkey", "kv_retrieval", "copy")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
INSTANCES = 4          # per (task, depth)
FILLER_CHARS = 80_000  # ~20K tokens of English for most tokenizers: room for 16K prompts
PASSAGE_WORDS, CUE_WORDS = 48, 8

INTROS = {
    "passkey": ("There is a pass key hidden in the long text below. Find it and remember it: you "
                "will be asked for it at the end.\n\n"),
    "kv_retrieval": ("A list of keys and their values is hidden in the long text below. Remember "
                     "it: you will be asked for one value at the end.\n\n"),
    "copy": ("A passage is quoted somewhere in the long text below. Remember it word for word: you "
             "will be asked to continue it at the end.\n\n"),
}


def _instance(task: str, rng: np.random.Generator, quoted: str) -> tuple[str, str, str]:
  """(inserted text, question, answer) of one instance; `quoted`: text a passage comes from."""
  if task == "passkey":
    key = str(rng.integers(10000, 100000))
    return (f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n",
            "\n\nWhat is the pass key? The pass key is", f" {key}.")
  if task == "kv_retrieval":
    pairs = [(f"{rng.integers(16 ** 8):08x}", f"{rng.integers(16 ** 8):08x}") for _ in range(16)]
    key, value = pairs[rng.integers(len(pairs))]
    listing = "\n".join(f"{k}: {v}" for k, v in pairs)
    return (f"\n\nKeys and values:\n{listing}\n\n",
            f"\n\nWhat is the value of key {key}? The value of key {key} is", f" {value}.")
  words = quoted.split()
  start = int(rng.integers(len(words) - PASSAGE_WORDS))
  passage = words[start:start + PASSAGE_WORDS]
  return (f"\n\nHere is the passage to remember: \"{' '.join(passage)}\"\n\n",
          f"\n\nContinue the passage quoted above, word for word: \"{' '.join(passage[:CUE_WORDS])}",
          " " + " ".join(passage[CUE_WORDS:]) + "\"")


def _filler(texts: list[str], first: int, rng: np.random.Generator) -> str:
  """FILLER_CHARS of book text from texts[first] on (the next ones appended if it is short),
  starting at a random line of the first."""
  text = texts[first]
  start = text.find("\n", int(rng.integers(max(1, len(text) - FILLER_CHARS)))) + 1
  filler, i = text[start:], first
  while len(filler) < FILLER_CHARS:
    i = (i + 1) % len(texts)
    filler += "\n\n" + texts[i]
  return filler[:FILLER_CHARS]


class LongRetrieval(tfds.core.GeneratorBasedBuilder):
  """Task instances from the prepared `long_books` validation split under the same data_dir."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Pass-key, key-value and passage-continuation retrieval over public-domain "
                    "books (LongBench-style, synthetic).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "task": tfds.features.Text(),
            "depth": tfds.features.Scalar(np.float32), "intro": tfds.features.Text(),
            "filler": tfds.features.Text(), "insert": tfds.features.Text(),
            "question": tfds.features.Text(), "answer": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    books = LongBooks(data_dir=self.data_dir_root)
    if not books.is_prepared():
      raise ValueError(f"long_retrieval is built from long_books, which is not prepared under "
                       f"{self.data_dir_root}; run experiments/prepare_data.py first")
    source = books.as_data_source(split="validation")
    texts = [source[i]["text"] for i in range(len(source))]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    return {"validation": self._generate_examples(texts)}

  def _generate_examples(self, texts):
    rng = np.random.default_rng(0)
    for task in TASKS:
      for depth in DEPTHS:
        for i in range(INSTANCES):
          first = int(rng.integers(len(texts)))
          other = (first + 1 + int(rng.integers(max(1, len(texts) - 1)))) % len(texts)
          insert, question, answer = _instance(task, rng, _filler(texts, other, rng))
          key = f"{task}/{depth}/{i}"
          yield key, {"id": key, "task": task, "depth": depth, "intro": INTROS[task],
                      "filler": _filler(texts, first, rng), "insert": insert,
                      "question": question, "answer": answer}


def prepare(data_dir: str) -> LongRetrieval:
  """Builds the dataset under data_dir (long_books must be prepared there)."""
  builder = LongRetrieval(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
