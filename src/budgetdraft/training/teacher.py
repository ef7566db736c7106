"""The shared teacher target: the verifier's full-cache next-token law at every continuation position.

Targets are the verifier's top-k probabilities renormalized (softmax over the k largest logits), so
one representation serves the two sources the config chooses between:
- on the fly: the verifier runs inside the training loop;
- cached: computed once into an array_record file (one record per training sequence) and reused by
  every run over the same sequences (naive, single-budget and multi-view baselines share it).
"""

import functools
import json
import os

from absl import logging
import array_record.python.array_record_module as array_record
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.models import prefill
from budgetdraft.models.config import ModelConfig


@functools.partial(jax.jit, static_argnames=("config", "prompt_len", "top_k", "prefill_chunk"))
def teacher_targets(params, tokens, *, config: ModelConfig, prompt_len: int, top_k: int,
                    prefill_chunk: int = 512):
  """(token ids [B, C, k] int32, probs [B, C, k] float32) at continuation positions tokens[:, P:]."""
  cache = prefill.prefill_cache(params, tokens[:, :prompt_len], config=config,
                                capacity=tokens.shape[1] + prefill_chunk,
                                prefill_chunk=prefill_chunk)
  logits = prefill.continuation_logits(params, cache, tokens[:, prompt_len:], config=config)
  top_logits, ids = jax.lax.top_k(logits, top_k)
  return ids.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1)


def dense_probs(ids, probs, vocab_size: int):
  """[..., V] teacher law from its top-k (ids, probs) [..., k]."""
  dense = jnp.zeros(ids.shape[:-1] + (vocab_size,), jnp.float32)
  return jnp.put_along_axis(dense, ids, probs, axis=-1, inplace=False)


class TeacherCache:
  """Top-k targets of sequences 0..N-1 in one array_record file, with a manifest that must match.

  The manifest records what the targets depend on (verifier, sequence split, k, data identity); a
  cache built for different settings is an error, never silently reused.
  """

  def __init__(self, directory: str, manifest: dict):
    self.directory = directory
    self.manifest = manifest
    self._records = os.path.join(directory, "targets.array_record")
    self._manifest_path = os.path.join(directory, "manifest.json")

  def num_cached(self) -> int:
    """Sequences already cached (0 if the cache does not exist yet)."""
    if not os.path.exists(self._manifest_path):
      return 0
    try:
      with open(self._manifest_path) as f:
        stored = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"teacher cache manifest {self._manifest_path} is unreadable ({e}); "
                       f"delete {self.directory} to rebuild the cache") from e
    settings = {k: v for k, v in stored.items() if k != "num_sequences"}
    if settings != self.manifest:
      raise ValueError(f"teacher cache {self.directory} was built for {settings}, not "
                       f"{self.manifest}; point teacher.cache_dir elsewhere or delete it")
    return stored["num_sequences"]

  def build(self, compute, sequences: np.ndarray) -> None:
    """Computes targets for sequences [N, S] with `compute(tokens [1, S])` unless already cached."""
    if self.num_cached() >= len(sequences):
      return
    os.makedirs(self.directory, exist_ok=True)
    writer = array_record.ArrayRecordWriter(self._records, "group_size:1")
    for i, sequence in enumerate(sequences):
      ids, probs = jax.device_get(compute(sequence[None]))
      writer.write(np.asarray(ids[0], np.int32).tobytes() + np.asarray(probs[0], np.float32).tobytes())
      if (i + 1) % 10 == 0 or i + 1 == len(sequences):
        logging.info("teacher targets: %d / %d sequences", i + 1, len(sequences))
    writer.close()
    with open(self._manifest_path, "w") as f:
      json.dump({**self.manifest, "num_sequences": len(sequences)}, f, indent=1)

  def read(self, indices, continuation: int, top_k: int):
    """(ids [B, C, k], probs [B, C, k]) of the cached sequences `indices`."""
    size = continuation * top_k * 8  # int32 ids then float32 probs
    try:
      reader = array_record.ArrayRecordReader(self._records)
      records = reader.read(list(map(int, indices)))
      reader.close()
    except Exception as e:  # Riegeli errors on truncated or corrupted files, often without text
      raise ValueError(f"teacher cache {self._records} is unreadable ({type(e).__name__}: {e}); "
                       f"delete {self.directory} to rebuild it") from e
    if any(len(r) != size for r in records):
      raise ValueError(f"teacher cache {self._records} holds records of another size than "
                       f"{size} bytes; delete {self.directory} to rebuild it")
    split = continuation * top_k * 4
    ids = [np.frombuffer(r[:split], np.int32).reshape(continuation, top_k) for r in records]
    probs = [np.frombuffer(r[split:], np.float32).reshape(continuation, top_k) for r in records]
    return np.stack(ids), np.stack(probs)
