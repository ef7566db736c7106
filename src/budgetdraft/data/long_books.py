"""`long_books`: the fetched public-domain texts as a TFDS array_record dataset (no TensorFlow).

One example per document; documents are split into train/validation by a stable hash of their id,
so a passage never appears in both splits.
"""

import glob
import os
import zlib

import tensorflow_datasets as tfds

VALIDATION_FRACTION_PERCENT = 10


def is_validation(doc_id: str) -> bool:
  return zlib.crc32(doc_id.encode()) % 100 < VALIDATION_FRACTION_PERCENT


class LongBooks(tfds.core.GeneratorBasedBuilder):
  """Documents from `raw_dir/<source>/<name>.txt` (see `budgetdraft.data.sources`)."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, raw_dir: str | None = None, **kwargs):
    self._raw_dir = raw_dir
    super().__init__(**kwargs)

  def _info(self):
    # Not dataset_info_from_configs(): it looks for README/CITATIONS beside the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Public-domain books (Shakespeare, Milton, Austen, KJV) from package registries.",
        features=tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                             "source": tfds.features.Text(),
                                             "text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    if self._raw_dir is None:
      raise ValueError("LongBooks needs raw_dir to be prepared (see budgetdraft.data.sources)")
    files = sorted(glob.glob(os.path.join(self._raw_dir, "*", "*.txt")))
    if not files:
      raise ValueError(f"no texts under {self._raw_dir}/<source>/*.txt; run experiments/prepare_data.py")
    doc_id = lambda f: f"{os.path.basename(os.path.dirname(f))}/{os.path.basename(f)[:-4]}"
    return {
        "train": self._generate_examples([f for f in files if not is_validation(doc_id(f))]),
        "validation": self._generate_examples([f for f in files if is_validation(doc_id(f))]),
    }

  def _generate_examples(self, files):
    for path in files:
      source, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)[:-4]
      with open(path, encoding="utf-8") as f:
        yield f"{source}/{name}", {"id": f"{source}/{name}", "source": source, "text": f.read()}


def prepare(raw_dir: str, data_dir: str) -> LongBooks:
  builder = LongBooks(raw_dir=raw_dir, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
