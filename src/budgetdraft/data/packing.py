"""Packing tokenized documents into fixed-length windows that never cross a document boundary."""

from typing import Iterable

import numpy as np


def pack_windows(token_docs: Iterable[list[int]], window: int, max_windows: int | None = None):
  """Non-overlapping `window`-token slices of each document; a document's tail shorter than a window
  is dropped rather than joined to the next document.

  Returns (windows [N, window] int32, doc_index [N] int32 (position of the source document in
  `token_docs`), starts [N] int32 (token offset of each window in its document)).
  """
  if window < 1:
    raise ValueError(f"window={window} must be >= 1")
  windows, doc_index, starts = [], [], []
  for i, tokens in enumerate(token_docs):
    tokens = np.asarray(tokens, np.int32)
    for start in range(0, len(tokens) - window + 1, window):
      windows.append(tokens[start:start + window])
      doc_index.append(i)
      starts.append(start)
      if max_windows is not None and len(windows) == max_windows:
        return np.stack(windows), np.array(doc_index, np.int32), np.array(starts, np.int32)
  if not windows:
    return (np.zeros((0, window), np.int32), np.zeros((0,), np.int32), np.zeros((0,), np.int32))
  return np.stack(windows), np.array(doc_index, np.int32), np.array(starts, np.int32)


def document_windows(documents, tokenizer, window: int, max_windows: int | None = None):
  """Tokenizes documents lazily (stopping once `max_windows` are packed) and packs them."""
  token_docs = (tokenizer.encode(doc.text) for doc in documents)
  return pack_windows(token_docs, window, max_windows)


def first_windows(documents, tokenizer, window: int, count: int) -> np.ndarray:
  """The first `count` windows [count, window] of the documents (evaluation prompts).

  Raises ValueError when the documents hold fewer, naming what would work.
  """
  windows, _, _ = document_windows(documents, tokenizer, window, max_windows=count)
  if len(windows) < count:
    raise ValueError(f"only {len(windows)} windows of {window} tokens, {count} needed: shorten "
                     "the context, ask for fewer prompts or use a dataset with longer documents")
  return windows
