"""The shared teacher target: the verifier's full-cache next-token law at every continuation position.

Targets are the verifier's top-k probabilities renormalized (softmax over the k largest logits), or
with top_k = 0 its whole law (no ids: the probabilities are dense), so one representation serves
the two sources the config chooses between:
- on the fly: the verifier runs inside the training loop;
- cached: computed once into an array_record file (one record per training sequence) and reused by
  every run over the same sequences (naive, single-budget and multi-view baselines share it).
An EAGLE-style drafter (a feature input) also needs the verifier's hidden state at every position
of the sequence: its inputs and its regression target. They are stored as float16.
"""

import functools
import hashlib
import json
import os

from absl import logging
import array_record.python.array_record_module as array_record
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.models import prefill
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.transformer import Transformer


@functools.partial(jax.jit, static_argnames=("config", "prompt_len", "top_k", "prefill_chunk",
                                             "with_features"))
def teacher_targets(params, tokens, *, config: ModelConfig, prompt_len: int, top_k: int,
                    prefill_chunk: int = 512, with_features: bool = False):
  """(token ids [B, C, k] int32, probs [B, C, k] float32) at continuation positions tokens[:, P:]
  (top_k = 0: (None, the whole law [B, C, V])), and with_features: the verifier's hidden states
  [B, S, dim] (float16) at every position."""
  if with_features:
    model = Transformer(config)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    capacity = -(-tokens.shape[1] // prefill_chunk) * prefill_chunk
    _, _, hidden = prefill.prefill(model, params, tokens, lengths,
                                   FullKVCache.init(config, tokens.shape[0], capacity),
                                   prefill_chunk, keep_hidden=True)
    logits = model.apply({"params": params}, hidden[:, prompt_len:], method=Transformer.logits)
  else:
    cache = prefill.prefill_cache(params, tokens[:, :prompt_len], config=config,
                                  capacity=tokens.shape[1] + prefill_chunk,
                                  prefill_chunk=prefill_chunk)
    logits = prefill.continuation_logits(params, cache, tokens[:, prompt_len:], config=config)
  if top_k:
    top_logits, ids = jax.lax.top_k(logits, top_k)
    targets = ids.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1)
  else:
    targets = None, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return targets + (hidden.astype(jnp.float16),) if with_features else targets


def dense_probs(ids, probs, vocab_size: int):
  """[..., V] teacher law from its top-k (ids, probs) [..., k]; ids None: probs is the law."""
  if ids is None:
    return probs
  dense = jnp.zeros(ids.shape[:-1] + (vocab_size,), jnp.float32)
  return jnp.put_along_axis(dense, ids, probs, axis=-1, inplace=False)


def sequence_hashes(sequences: np.ndarray) -> list[str]:
  """16 hex digits per sequence [N, S]: what a cache record was computed from."""
  return [hashlib.sha256(np.asarray(row, np.int32).tobytes()).hexdigest()[:16]
          for row in sequences]


class TeacherCache:
  """Top-k targets of sequences 0..N-1 in one array_record file, with a manifest that must match.

  The manifest records what the targets depend on (verifier, sequence split, k, the feature
  width) and a hash per cached sequence; a cache built for different settings or other sequences
  is an error, never silently reused. A run that needs more sequences extends the cache (a longer
  run reuses what a shorter one computed) and a run that needs fewer reads its prefix.
  """

  def __init__(self, directory: str, manifest: dict):
    self.directory = directory
    self.manifest = manifest
    self._records = os.path.join(directory, "targets.array_record")
    self._manifest_path = os.path.join(directory, "manifest.json")

  def num_cached(self, sequences: np.ndarray) -> int:
    """How many leading sequences of `sequences` [N, S] are cached (0 if there is no cache)."""
    if not os.path.exists(self._manifest_path):
      return 0
    try:
      with open(self._manifest_path) as f:
        stored = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"teacher cache manifest {self._manifest_path} is unreadable ({e}); "
                       f"delete {self.directory} to rebuild the cache") from e
    settings = {k: v for k, v in stored.items() if k != "sequences"}
    if settings != self.manifest:
      raise ValueError(f"teacher cache {self.directory} was built for {settings}, not "
                       f"{self.manifest}; point teacher.cache_dir elsewhere or delete it")
    count = min(len(stored["sequences"]), len(sequences))
    if stored["sequences"][:count] != sequence_hashes(sequences[:count]):
      raise ValueError(f"teacher cache {self.directory} holds other training sequences (another "
                       "dataset, split, seed or length); point teacher.cache_dir elsewhere or "
                       "delete it")
    return count

  def build(self, compute, sequences: np.ndarray) -> None:
    """Computes targets for sequences [N, S] with `compute(tokens [1, S])` unless already cached;
    a cache of a prefix is extended (rewritten into place with the new records after the old)."""
    cached = self.num_cached(sequences)
    if cached >= len(sequences):
      return
    os.makedirs(self.directory, exist_ok=True)
    old = self._read_records(range(cached)) if cached else []
    staging = self._records + ".partial"
    writer = array_record.ArrayRecordWriter(staging, "group_size:1")
    for record in old:
      writer.write(record)
    for i in range(cached, len(sequences)):
      arrays = jax.device_get(compute(sequences[i][None]))
      dtypes = (np.int32, np.float32, np.float16)
      writer.write(b"".join(np.asarray(a[0], d).tobytes() for a, d in zip(arrays, dtypes)))
      if (i + 1) % 10 == 0 or i + 1 == len(sequences):
        logging.info("teacher targets: %d / %d sequences", i + 1, len(sequences))
    writer.close()
    os.replace(staging, self._records)
    with open(self._manifest_path + ".partial", "w") as f:
      json.dump({**self.manifest, "sequences": sequence_hashes(sequences)}, f)
    os.replace(self._manifest_path + ".partial", self._manifest_path)

  def _read_records(self, indices) -> list[bytes]:
    try:
      reader = array_record.ArrayRecordReader(self._records)
      records = reader.read(list(map(int, indices)))
      reader.close()
    except Exception as e:  # Riegeli errors on truncated or corrupted files, often without text
      raise ValueError(f"teacher cache {self._records} is unreadable ({type(e).__name__}: {e}); "
                       f"delete {self.directory} to rebuild it") from e
    return records

  def read(self, indices, continuation: int, top_k: int, features: tuple[int, int] | None = None):
    """(ids [B, C, k], probs [B, C, k]) of the cached sequences `indices`, and their hidden states
    [B, S, dim] float32 if `features` = (S, dim)."""
    feature_size = 2 * int(np.prod(features)) if features else 0
    size = continuation * top_k * 8 + feature_size  # int32 ids, float32 probs, float16 features
    records = self._read_records(indices)
    if any(len(r) != size for r in records):
      raise ValueError(f"teacher cache {self._records} holds records of another size than "
                       f"{size} bytes; delete {self.directory} to rebuild it")
    split = continuation * top_k * 4
    ids = [np.frombuffer(r[:split], np.int32).reshape(continuation, top_k) for r in records]
    probs = [np.frombuffer(r[split:2 * split], np.float32).reshape(continuation, top_k)
             for r in records]
    if not features:
      return np.stack(ids), np.stack(probs)
    hidden = [np.frombuffer(r[2 * split:], np.float16).reshape(features) for r in records]
    return np.stack(ids), np.stack(probs), np.stack(hidden).astype(np.float32)
