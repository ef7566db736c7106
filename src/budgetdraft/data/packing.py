"""Packing tokenized documents into fixed-length token sequences that never cross a document boundary."""

from typing import Iterable

import numpy as np

from budgetdraft.data import readers


def pack_sequences(token_docs: Iterable[list[int]], length: int, max_sequences: int | None = None):
  """Non-overlapping `length`-token slices of each document; a document's tail shorter than that
  is dropped rather than joined to the next document.

  Returns (sequences [N, length] int32, doc_index [N] int32 (position of the source document in
  `token_docs`), starts [N] int32 (token offset of each sequence in its document)).
  """
  if length < 1:
    raise ValueError(f"sequence length {length} must be >= 1")
  sequences, doc_index, starts = [], [], []
  for i, tokens in enumerate(token_docs):
    tokens = np.asarray(tokens, np.int32)
    for start in range(0, len(tokens) - length + 1, length):
      sequences.append(tokens[start:start + length])
      doc_index.append(i)
      starts.append(start)
      if max_sequences is not None and len(sequences) == max_sequences:
        return np.stack(sequences), np.array(doc_index, np.int32), np.array(starts, np.int32)
  if not sequences:
    return (np.zeros((0, length), np.int32), np.zeros((0,), np.int32), np.zeros((0,), np.int32))
  return np.stack(sequences), np.array(doc_index, np.int32), np.array(starts, np.int32)


def document_sequences(documents, tokenizer, length: int, max_sequences: int | None = None):
  """Tokenizes documents lazily (stopping once `max_sequences` are packed) and packs them."""
  token_docs = (tokenizer.encode(doc.text) for doc in documents)
  return pack_sequences(token_docs, length, max_sequences)


def first_sequences(documents, tokenizer, length: int, count: int) -> np.ndarray:
  """The first `count` sequences [count, length] of the documents (evaluation prompts).

  Raises ValueError when the documents hold fewer, naming what would work.
  """
  sequences, _, _ = document_sequences(documents, tokenizer, length, max_sequences=count)
  if len(sequences) < count:
    raise ValueError(f"only {len(sequences)} sequences of {length} tokens, {count} needed: "
                     "shorten the context, ask for fewer prompts or use a dataset with longer "
                     "documents")
  return sequences


def dataset_sequences(dataset: str, data_dir: str, split: str, tokenizer, length: int,
                      count: int | None = None) -> np.ndarray:
  """[N, length] sequences of a dataset split: the first `count` (exactly), or all of them."""
  documents = readers.documents(dataset, data_dir, split)
  if count is not None:
    return first_sequences(documents, tokenizer, length, count)
  sequences, _, _ = document_sequences(documents, tokenizer, length)
  if not len(sequences):
    raise ValueError(f"{dataset}/{split} has no document of {length} tokens")
  return sequences
