"""Data: packing without cross-document leakage, readers for every dataset, the prepared long_books."""

import io
import json
import os

import numpy as np
import pytest

from budgetdraft.data import long_books, packing, readers, retrieval, sources


def test_sequences_never_cross_documents():
  rng = np.random.default_rng(0)
  # Document i holds tokens from its own range [1000 i, 1000 i + 999], so any mix would show.
  docs = [rng.integers(1000 * i, 1000 * i + 1000, size=rng.integers(10, 300)).tolist()
          for i in range(20)]
  sequences, doc_index, starts = packing.pack_sequences(docs, length=64)
  assert sequences.shape == (sum(len(d) // 64 for d in docs), 64)
  for sequence, i, start in zip(sequences, doc_index, starts):
    np.testing.assert_array_equal(sequence, docs[i][start:start + 64])
    assert np.all(sequence // 1000 == i)
  limited, _, _ = packing.pack_sequences(docs, length=64, max_sequences=3)
  np.testing.assert_array_equal(limited, sequences[:3])


def test_first_sequences_raises_when_documents_are_too_short():
  class CharTokenizer:
    encode = staticmethod(lambda text: [ord(c) for c in text])

  docs = [readers.Document("a", "x" * 50), readers.Document("b", "y" * 130)]
  sequences = packing.first_sequences(docs, CharTokenizer(), length=40, count=3)
  assert [chr(w[0]) for w in sequences] == ["x", "y", "y"]
  with pytest.raises(ValueError, match="only 4 sequences of 40 tokens, 5 needed"):
    packing.first_sequences(docs, CharTokenizer(), length=40, count=5)


def test_long_books_builder_splits_by_document(tmp_path):
  raw = tmp_path / "raw"
  for source, count in (("a", 12), ("b", 9)):
    os.makedirs(raw / source)
    for i in range(count):
      (raw / source / f"doc{i}.txt").write_text(f"{source} document {i} " * 50)
  builder = long_books.prepare(str(raw), str(tmp_path / "tfds"))
  ids = {split: [d.id for d in readers.documents("long_books", str(tmp_path / "tfds"), split)]
         for split in ("train", "validation")}
  assert sorted(ids["train"] + ids["validation"]) == sorted(
      f"{s}/doc{i}" for s, n in (("a", 12), ("b", 9)) for i in range(n))
  assert all(long_books.is_validation(i) for i in ids["validation"])
  assert not any(long_books.is_validation(i) for i in ids["train"])
  assert builder.info.splits["train"].num_examples == len(ids["train"])


def test_pg19_text_layout_and_longbench_jsonl(tmp_path):
  os.makedirs(tmp_path / "pg19" / "test")
  (tmp_path / "pg19" / "test" / "123.txt").write_text("A long book.")
  assert [(d.id, d.text) for d in readers.documents("pg19", str(tmp_path), "test")] == [
      ("123", "A long book.")]
  os.makedirs(tmp_path / "longbench")
  with open(tmp_path / "longbench" / "narrativeqa.jsonl", "w") as f:
    f.write(json.dumps({"_id": "x1", "context": "Once upon a time.", "input": "Who?"}) + "\n")
  (doc,) = readers.documents("longbench", str(tmp_path), "test")
  assert doc.id == "narrativeqa/x1" and doc.text == "Once upon a time.\n\nWho?"


def test_missing_datasets_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="run `make data`"):
    readers.documents("long_books", str(tmp_path), "train")
  with pytest.raises(FileNotFoundError, match="longbench"):
    list(readers.documents("longbench", str(tmp_path), "test"))
  with pytest.raises(ValueError, match="unknown dataset"):
    readers.documents("c4", str(tmp_path), "train")
  os.makedirs(tmp_path / "long_books")  # an interrupted preparation: the folder, no dataset
  with pytest.raises(FileNotFoundError, match="long_books is not prepared under .*make data"):
    list(readers.documents("long_books", str(tmp_path), "train"))
  with pytest.raises(FileNotFoundError, match="pg19 is not prepared under .*tfds build pg19"):
    list(readers.documents("pg19", str(tmp_path), "train"))


def test_a_corrupted_dataset_file_is_named(tmp_path):
  raw = tmp_path / "raw" / "a"
  os.makedirs(raw)
  for i in range(12):  # enough that both splits get documents
    (raw / f"doc{i}.txt").write_text("word " * 500)
  long_books.prepare(str(tmp_path / "raw"), str(tmp_path))
  for path in (tmp_path / "long_books").rglob("*array_record*"):
    path.write_bytes(path.read_bytes()[:64])
  with pytest.raises(ValueError, match="long_books under .* is unreadable.*make data"):
    list(readers.documents("long_books", str(tmp_path), "train"))


def test_source_archives_are_refused_unless_their_hash_is_the_pinned_one(tmp_path, monkeypatch):
  class FakeResponse(io.BytesIO):
    def __enter__(self):
      return self

    def __exit__(self, *args):
      return False

  monkeypatch.setattr(sources.urllib.request, "urlopen",
                      lambda url, timeout: FakeResponse(b"not the archive"))
  with pytest.raises(ValueError, match="SHA-256 .* is not the pinned"):
    sources.fetch_shakespeare(str(tmp_path))
  assert not os.listdir(tmp_path)


def test_prepared_long_books_has_long_held_out_documents(data_dir):
  validation = list(readers.documents("long_books", data_dir, "validation"))
  train_ids = {d.id for d in readers.documents("long_books", data_dir, "train")}
  assert validation and not train_ids & {d.id for d in validation}
  assert any(d.id.startswith("shakespeare/") for d in validation)
  assert max(len(d.text) for d in validation) > 16_000 * 4  # at least one ~16K-token document


class _ByteTokenizer:
  def encode(self, text):
    return list(text.encode())


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompts_hide_the_key_at_the_asked_depth(depth):
  filler = np.arange(1000) % 50 + 200  # byte values no piece of the template uses
  prompt = retrieval.passkey_prompt(_ByteTokenizer(), filler, 600, depth, "40913")
  assert len(prompt.tokens) == 600
  text = bytes(t for t in prompt.tokens if t < 200).decode()
  assert text.startswith(retrieval.INTRO) and text.endswith(retrieval.QUESTION)
  assert text.count("40913") == 2
  needle_at = prompt.tokens.index(ord("\n"), len(retrieval.INTRO))
  fillers = [i for i, t in enumerate(prompt.tokens) if t >= 200]
  before = sum(i < needle_at for i in fillers)
  assert abs(before - depth * len(fillers)) <= 1
  assert retrieval.answered(" 4 0913 is it", prompt) and not retrieval.answered("4091", prompt)


def test_passkey_prompts_refuse_short_filler_and_bad_depth():
  with pytest.raises(ValueError, match="needs .* filler tokens"):
    retrieval.passkey_prompt(_ByteTokenizer(), np.zeros(10, int), 600, 0.5, "12345")
  with pytest.raises(ValueError, match="depth=1.5"):
    retrieval.passkey_prompt(_ByteTokenizer(), np.zeros(1000, int), 600, 1.5, "12345")
  keys = [p.answer for p in retrieval.passkey_prompts(_ByteTokenizer(), [np.zeros(1000, int)],
                                                      600, 3)]
  assert len(set(keys)) == 3 and all(len(k) == 5 for k in keys)
