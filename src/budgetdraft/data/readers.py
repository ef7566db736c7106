"""One interface over long-document datasets: `documents(dataset, data_dir, split)`.

- long_books: prepared by `experiments/prepare_data.py` (TFDS array_record, read without TensorFlow);
- pg19: TFDS `pg19` built as array_record under data_dir (`tfds build pg19 --file_format=array_record`),
  or the DeepMind release layout `data_dir/pg19/<split>/*.txt`;
- longbench: `data_dir/longbench/*.jsonl` (one sample per line: context + input).
"""

import dataclasses
import glob
import json
import os
from typing import Iterator

import tensorflow_datasets as tfds

from budgetdraft.data.long_books import LongBooks

DATASETS = ("long_books", "pg19", "longbench")


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  text: str


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_documents(builder, split: str, text_key: str, id_key: str,
                    fix: str) -> Iterator[Document]:
  """Documents of a prepared TFDS array_record dataset; `fix` says how to (re)build it."""
  if not builder.is_prepared():
    raise FileNotFoundError(f"{builder.name} is not prepared under {builder.data_dir}: {fix}")
  try:
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      example = source[i]
      yield Document(_as_str(example[id_key]), _as_str(example[text_key]))
  except (RuntimeError, OSError, ValueError) as e:  # Riegeli / array_record errors
    raise ValueError(f"{builder.name} under {builder.data_dir} is unreadable "
                     f"({type(e).__name__}: {e}); {fix}") from e


def _pg19(data_dir: str, split: str) -> Iterator[Document]:
  text_dir = os.path.join(data_dir, "pg19", split)
  if os.path.isdir(text_dir):
    for path in sorted(glob.glob(os.path.join(text_dir, "*.txt"))):
      with open(path, encoding="utf-8") as f:
        yield Document(os.path.basename(path)[:-4], f.read())
    return
  fix = (f"expected {text_dir}/*.txt or a TFDS pg19 build (`tfds build pg19 "
         f"--data_dir={data_dir} --file_format=array_record`)")
  try:
    builder = tfds.builder("pg19", data_dir=data_dir)
  except Exception as e:
    raise FileNotFoundError(f"no PG-19 under {data_dir}: {fix} ({e})") from e
  yield from _tfds_documents(builder, split, "book_text", "book_title", fix)


def _longbench(data_dir: str, split: str) -> Iterator[Document]:
  files = sorted(glob.glob(os.path.join(data_dir, "longbench", "*.jsonl")))
  if not files:
    raise FileNotFoundError(f"no LongBench files: expected {data_dir}/longbench/*.jsonl")
  for path in files:
    task = os.path.basename(path)[:-len(".jsonl")]
    with open(path, encoding="utf-8") as f:
      for line_number, line in enumerate(f):
        if line.strip():
          sample = json.loads(line)
          sample_id = sample.get("_id", line_number)
          yield Document(f"{task}/{sample_id}", f"{sample['context']}\n\n{sample.get('input', '')}")


def documents(dataset: str, data_dir: str, split: str) -> Iterator[Document]:
  """Documents of a split (LongBench has only its test data, returned for any split)."""
  if dataset == "long_books":
    path = os.path.join(data_dir, "long_books")
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no long_books dataset under {data_dir}; run `make data` or "
                              f"experiments/prepare_data.py --data_dir={data_dir}")
    fix = (f"rebuild it with `make data` (or experiments/prepare_data.py "
           f"--data_dir={data_dir}) after deleting {path}")
    return _tfds_documents(LongBooks(data_dir=data_dir), split, "text", "id", fix)
  if dataset == "pg19":
    return _pg19(data_dir, split)
  if dataset == "longbench":
    return _longbench(data_dir, split)
  raise ValueError(f"unknown dataset {dataset!r}; valid: {DATASETS}")
