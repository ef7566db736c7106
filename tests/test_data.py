"""Data: packing without cross-document leakage, readers for every dataset, the prepared long_books,
and the long_retrieval tasks assembled at exact lengths with their needle at its depth."""

import io
import json
import os

import numpy as np
import pytest

from budgetdraft.data import long_books, long_retrieval, packing, readers, retrieval, sources


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


@pytest.fixture(scope="module")
def tiny_retrieval(tmp_path_factory):
  """long_retrieval built from a few made-up books (validation: the ids long_books holds out)."""
  tmp = tmp_path_factory.mktemp("retrieval")
  os.makedirs(tmp / "raw" / "a")
  words = [f"w{i}" for i in range(400)]
  for i in range(40):
    (tmp / "raw" / "a" / f"doc{i}.txt").write_text(
        "\n".join(" ".join(words[(7 * i + j) % 400] for j in range(k, k + 12))
                   for k in range(0, 400, 12)))
  long_books.prepare(str(tmp / "raw"), str(tmp))
  builder = long_retrieval.prepare(str(tmp))
  return str(tmp), builder


def test_long_retrieval_holds_every_task_at_every_depth(tiny_retrieval):
  _, builder = tiny_retrieval
  source = builder.as_data_source(split="validation")
  examples = [source[i] for i in range(len(source))]
  as_str = lambda value: value.decode() if isinstance(value, bytes) else value
  counts = {}
  for e in examples:
    key = (as_str(e["task"]), round(float(e["depth"]), 3))
    counts[key] = counts.get(key, 0) + 1
    assert len(as_str(e["filler"])) == long_retrieval.FILLER_CHARS
  assert counts == {(task, depth): long_retrieval.INSTANCES
                    for task in long_retrieval.TASKS for depth in long_retrieval.DEPTHS}


@pytest.mark.parametrize("task", long_retrieval.TASKS)
def test_task_prompts_put_the_answer_only_at_their_depth(tiny_retrieval, task):
  """The answer's text is in the inserted block at the asked depth of the filler, and the prompt
  ends with the question: only distant context lets a model continue it."""
  data_dir, _ = tiny_retrieval
  prompts = retrieval.task_prompts(data_dir, task, _ByteTokenizer(), 6000, 6)
  assert [p.depth for p in prompts] == [0.1, 0.3, 0.5, 0.7, 0.9, 0.1]
  for prompt in prompts:
    assert len(prompt.tokens) == 6000
    text = bytes(prompt.tokens).decode()
    answer = prompt.answer.strip().rstrip('."')
    question = text.rindex("\n\n")
    assert answer in text and text.rindex(answer) < question  # in the block, not the question
    header = {"passkey": f"The pass key is {answer}", "kv_retrieval": "Keys and values:",
              "copy": "Here is the passage"}[task]
    intro = len(long_retrieval.INTROS[task])
    assert text.count(header) == 1 and text.index(header) <= text.index(answer)
    assert abs((text.index(header) - intro) / (question - intro) - prompt.depth) < 0.1
    start, end = prompt.inserted  # the span holds the inserted block, header and answer
    inserted = text[start:end]
    assert inserted.startswith("\n\n") and inserted.endswith("\n\n")
    assert header in inserted and answer in inserted and text.count(inserted) == 1
    if task == "copy":  # the question quotes the passage's first words, the answer its rest
      cue = text[text.rindex('"') + 1:]
      assert text.index(cue + prompt.answer.rstrip('"')) < question


def test_a_continuation_retrieves_an_answer_by_its_first_words():
  assert retrieval.retrieved(" 58731. The pass", " 58731.")
  assert not retrieval.retrieved(" 5873", " 58731.")
  passage = ' the porters, the singers,\nthe Nethinims, and all they that had separated themselves"'
  assert retrieval.retrieved("the porters, the singers, the  Nethinims, and all they that", passage)
  assert not retrieval.retrieved("the porters, the singers, and all", passage)


def test_task_prompts_refuse_unknown_tasks_and_unprepared_data(tiny_retrieval, tmp_path):
  data_dir, _ = tiny_retrieval
  with pytest.raises(ValueError, match="unknown retrieval task 'needle'"):
    retrieval.task_prompts(data_dir, "needle", _ByteTokenizer(), 3000, 1)
  with pytest.raises(ValueError, match="21 passkey prompts asked for; long_retrieval holds 20"):
    retrieval.task_prompts(data_dir, "passkey", _ByteTokenizer(), 3000, 21)
  with pytest.raises(FileNotFoundError, match="long_retrieval is not prepared .*make data"):
    retrieval.task_prompts(str(tmp_path), "passkey", _ByteTokenizer(), 3000, 1)


def test_prepared_long_retrieval_gives_8k_prompts_for_the_verifier(data_dir, smollm2):
  tokenizer = smollm2[2]
  for task in long_retrieval.TASKS:
    prompts = retrieval.task_prompts(data_dir, task, tokenizer, 8000, 5)
    assert [len(p.tokens) for p in prompts] == [8000] * 5
    for prompt in prompts:
      text = tokenizer.decode(prompt.tokens)
      assert text.startswith(long_retrieval.INTROS[task])
      assert prompt.answer.strip().rstrip('."') in text[:text.rindex("\n\n")]
