"""Where a drafter comes from, named by one source string everywhere (`load`):

  self              the verifier itself (isolates the effect of the sparse cache on acceptance);
  layers:<k>        the verifier's first k layers + final norm + its embedding and head;
  trained:<workdir> a drafter trained by experiments/train_drafter.py;
  checkpoint:<path> any Llama-family GGUF / HF folder sharing the verifier's tokenizer;
  pruned:<dir>      the verifier pruned by experiments/prune.py (Bonsai or a baseline).
A trained drafter is one of three kinds (`initialize`):
  layers  the verifier's first k blocks, trained further;
  eagle   k fresh blocks fed [token embedding, the verifier's hidden state one position earlier]
          (EAGLE), so a single block can predict what the verifier's 30 would;
  pruned  a pruned verifier (`pruned:<dir>`), trained further.
Either may score only the `draft_vocab` most frequent token ids of its training data
(`frequent_ids`), whose head rows are the verifier's. A trained drafter saves only its own params:
the embedding and head (for SmolLM2 half of a small drafter's weights) are shared with the
verifier, frozen, and re-attached at load.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import ModelConfig
from budgetdraft.models.transformer import init_params
from budgetdraft.pruning import checkpoint as pruned_checkpoint

SHARED = ("embed", "lm_head", "draft_head")
KINDS = ("layers", "eagle", "pruned")
# The workdir of the drafter committed with the repository for the embedded SmolLM2.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "drafters",
                           "smollm2-eagle")


def shipped_for(verifier_config: ModelConfig, verifier_params: dict) -> str | None:
  """The shipped drafter's source string if this checkout has it and it was trained for this
  verifier (same fingerprint), else None."""
  try:
    meta = read_metadata(os.path.join(SHIPPED_DIR, "drafter"))
  except (FileNotFoundError, ValueError):
    return None
  if meta.get("verifier_fingerprint") != checkpoint_io.fingerprint(verifier_config,
                                                                   verifier_params):
    return None
  return f"trained:{os.path.normpath(SHIPPED_DIR)}"


def split_params(params: dict) -> tuple[dict, dict]:
  """(trainable, shared) halves of a drafter's params tree."""
  shared = {k: v for k, v in params.items() if k in SHARED}
  return {k: v for k, v in params.items() if k not in SHARED}, shared


def frequent_ids(sequences: np.ndarray, count: int, vocab_size: int) -> np.ndarray:
  """The `count` most frequent token ids of sequences (ties: the lower id), ascending."""
  if not 1 <= count <= vocab_size:
    raise ValueError(f"draft_vocab={count} must be in [1, {vocab_size}]")
  frequency = np.bincount(np.asarray(sequences).reshape(-1), minlength=vocab_size)
  return np.sort(np.argsort(-frequency, kind="stable")[:count]).astype(np.int32)


def _head_rows(verifier_config: ModelConfig, verifier_params: dict, ids) -> dict:
  """The verifier's output head restricted to `ids`: the `draft_head` params."""
  ids = np.asarray(ids, np.int32)
  if verifier_config.tie_embeddings:
    kernel = verifier_params["embed"]["embedding"][ids].T
  else:
    kernel = verifier_params["lm_head"]["kernel"][:, ids]
  return {"kernel": kernel, "ids": jnp.asarray(ids, jnp.int32)}


def initialize(kind: str, verifier_config: ModelConfig, verifier_params: dict, num_layers: int,
               draft_ids=None, seed: int = 0, pruned_from: str = ""):
  """(drafter config, trainable params, shared params) of a drafter of `kind` (see KINDS).

  draft_ids: the token ids a reduced head scores (None: the verifier's whole head);
  pruned_from: the pruned model's directory (kind "pruned"; num_layers is then its own).
  """
  if kind not in KINDS:
    raise ValueError(f"drafter kind {kind!r}; valid: {KINDS}")
  if kind == "layers":
    config, params = checkpoint_io.take_layers(verifier_config, verifier_params, num_layers)
  elif kind == "pruned":
    config, params = pruned_checkpoint.load(pruned_from, verifier_config, verifier_params)
  else:
    config = dataclasses.replace(verifier_config, num_layers=num_layers,
                                 feature_dim=verifier_config.dim)
    params = jax.tree.map(lambda x: x.astype(config.weight_dtype),
                          init_params(config, jax.random.key(seed)))
    # The fused state is read by the verifier's head: start from its final norm and embedding.
    params = {**params, "embed": verifier_params["embed"],
              "final_norm": verifier_params["final_norm"]}
    if not verifier_config.tie_embeddings:
      params["lm_head"] = verifier_params["lm_head"]
  if draft_ids is not None:
    config = dataclasses.replace(config, draft_vocab=len(draft_ids))
    params = {k: v for k, v in params.items() if k != "lm_head"}
    params["draft_head"] = _head_rows(verifier_config, verifier_params, draft_ids)
  return (config, *split_params(params))


def read_metadata(directory: str) -> dict:
  """drafter.json of a saved drafter (num_layers, verifier name and fingerprint, steps)."""
  path = os.path.join(directory, "drafter.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} holds no trained drafter (no drafter.json); train one "
                            "with experiments/train_drafter.py")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is unreadable ({e}); rerun the training command to export the "
                     "drafter again from its checkpoints") from e


def save(directory: str, trainable: dict, *, kind: str, num_layers: int, verifier: dict,
         steps: int, draft_ids=None, pruned_from: str = "") -> None:
  """Writes a drafter atomically: into `<directory>.partial`, then renamed into place. A drafter
  already at `directory` is kept as `<directory>-step<its steps>`.

  verifier: {"name", "fingerprint"} of the verifier whose embedding and head it borrows.
  """
  staging = directory + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  checkpoint_io.save_params(os.path.join(staging, "params"), trainable)
  ids = None if draft_ids is None else np.asarray(draft_ids).tolist()
  with open(os.path.join(staging, "drafter.json"), "w") as f:
    json.dump({"kind": kind, "num_layers": num_layers, "verifier": verifier["name"],
               "verifier_fingerprint": verifier["fingerprint"], "steps": steps,
               "draft_ids": ids, "pruned_from": pruned_from}, f)
  if os.path.exists(directory):
    try:
      previous = read_metadata(directory).get("steps", "unknown")
    except ValueError:
      previous = "unreadable"
    kept, suffix = f"{directory}-step{previous}", 1
    while os.path.exists(kept):
      kept, suffix = f"{directory}-step{previous}.{suffix}", suffix + 1
    os.rename(directory, kept)
  os.rename(staging, directory)


def _load_trained(directory: str, verifier_config: ModelConfig, verifier_params: dict):
  """(config, params) of a saved drafter, re-attached to its verifier's embedding and head."""
  meta = read_metadata(directory)
  expected = meta.get("verifier_fingerprint")
  actual = checkpoint_io.fingerprint(verifier_config, verifier_params)
  if expected != actual:
    raise ValueError(f"the drafter in {directory} was trained for verifier "
                     f"{meta.get('verifier')!r} (fingerprint {expected}), not for the given one "
                     f"(fingerprint {actual}); load the verifier it was trained with")
  config, _, shared = initialize(meta.get("kind", "layers"), verifier_config, verifier_params,
                                 meta["num_layers"], meta.get("draft_ids"),
                                 pruned_from=meta.get("pruned_from", ""))
  try:
    trainable = checkpoint_io.restore_params(os.path.join(directory, "params"))
  except Exception as e:  # orbax / tensorstore errors name neither the drafter nor the fix
    raise ValueError(f"the drafter params in {directory}/params are unreadable "
                     f"({type(e).__name__}); rerun the training command to export them again "
                     "from its checkpoints") from e
  return config, {**shared, **trainable}


def check(source: str) -> tuple[str, str]:
  """(kind, value) of a drafter source; raises before any loading if it names nothing."""
  kind, _, value = source.partition(":")
  if source == "self" or (kind == "layers" and value.isdigit() and int(value) >= 1):
    return kind, value
  if kind == "trained" and value:
    if not os.path.exists(os.path.join(value, "drafter", "drafter.json")):
      raise FileNotFoundError(f"drafter {source!r}: {value}/drafter holds no trained drafter; "
                              "train one with experiments/train_drafter.py")
    return kind, value
  if kind == "checkpoint" and value:
    if not os.path.exists(value):
      raise FileNotFoundError(f"drafter {source!r}: no such file or folder {value}")
    return kind, value
  if kind == "pruned" and value:
    pruned_checkpoint.read_metadata(value)
    return kind, value
  raise ValueError(f"drafter {source!r}: expected 'self', 'layers:<k>' (k >= 1), "
                   "'trained:<workdir>', 'checkpoint:<path>' or 'pruned:<dir>'")


def load(source: str, verifier_config: ModelConfig, verifier_params: dict):
  """(config, params) of the drafter named by `source` (see the module docstring)."""
  kind, value = check(source)
  if kind == "layers":
    return checkpoint_io.take_layers(verifier_config, verifier_params, int(value))
  if kind == "trained":
    return _load_trained(os.path.join(value, "drafter"), verifier_config, verifier_params)
  if kind == "checkpoint":
    return checkpoint_io.load_checkpoint(value)
  if kind == "pruned":
    return pruned_checkpoint.load(value, verifier_config, verifier_params)
  return verifier_config, verifier_params  # self
