"""Fetches the public-domain texts and builds the `long_books` and `long_retrieval` TFDS datasets.

  python experiments/prepare_data.py --data_dir=data
"""

from absl import app, flags, logging

from budgetdraft.data import long_books, long_retrieval, sources

_DATA_DIR = flags.DEFINE_string("data_dir", "data", "Where raw texts and TFDS data go.")
_SOURCES = flags.DEFINE_list("sources", list(sources.FETCHERS), "Text sources to fetch.")


def main(argv):
  del argv
  raw_dir = f"{_DATA_DIR.value}/raw"
  counts = sources.fetch_all(raw_dir, _SOURCES.value)
  logging.info("documents per source: %s", counts)
  builder = long_books.prepare(raw_dir, _DATA_DIR.value)
  for split, info in builder.info.splits.items():
    print(f"long_books/{split}: {info.num_examples} documents")
  tasks = long_retrieval.prepare(_DATA_DIR.value)
  print(f"long_retrieval/validation: {tasks.info.splits['validation'].num_examples} task instances")


if __name__ == "__main__":
  app.run(main)
