"""Where a drafter comes from, named by one source string everywhere (`load`):

  self              the verifier itself (isolates the effect of the sparse cache on acceptance);
  layers:<k>        the verifier's first k layers + final norm + its embedding and head;
  trained:<workdir> a drafter trained by experiments/train_drafter.py;
  checkpoint:<path> any Llama-family GGUF / HF folder sharing the verifier's tokenizer.
A trained drafter saves only its own layers and final norm: the embedding and head (for SmolLM2
half of a small drafter's weights) are shared with the verifier, frozen, and re-attached at load.
"""

import json
import os
import shutil

from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import ModelConfig

SHARED = ("embed", "lm_head")


def split_params(params: dict) -> tuple[dict, dict]:
  """(trainable, shared) halves of a drafter's params tree."""
  shared = {k: v for k, v in params.items() if k in SHARED}
  return {k: v for k, v in params.items() if k not in SHARED}, shared


def from_verifier(verifier_config: ModelConfig, verifier_params: dict, num_layers: int):
  """(drafter config, trainable params, shared params): the verifier's first `num_layers` blocks."""
  config, params = checkpoint_io.take_layers(verifier_config, verifier_params, num_layers)
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


def save(directory: str, trainable: dict, *, num_layers: int, verifier: dict, steps: int) -> None:
  """Writes a drafter atomically: into `<directory>.partial`, then renamed into place. A drafter
  already at `directory` is kept as `<directory>-step<its steps>`.

  verifier: {"name", "fingerprint"} of the verifier whose embedding and head it borrows.
  """
  staging = directory + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  checkpoint_io.save_params(os.path.join(staging, "params"), trainable)
  with open(os.path.join(staging, "drafter.json"), "w") as f:
    json.dump({"num_layers": num_layers, "verifier": verifier["name"],
               "verifier_fingerprint": verifier["fingerprint"], "steps": steps}, f, indent=1)
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
  config, _, shared = from_verifier(verifier_config, verifier_params, meta["num_layers"])
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
  raise ValueError(f"drafter {source!r}: expected 'self', 'layers:<k>' (k >= 1), "
                   "'trained:<workdir>' or 'checkpoint:<path>'")


def load(source: str, verifier_config: ModelConfig, verifier_params: dict):
  """(config, params) of the drafter named by `source` (see the module docstring)."""
  kind, value = check(source)
  if kind == "layers":
    return checkpoint_io.take_layers(verifier_config, verifier_params, int(value))
  if kind == "trained":
    return _load_trained(os.path.join(value, "drafter"), verifier_config, verifier_params)
  if kind == "checkpoint":
    return checkpoint_io.load_checkpoint(value)
  return verifier_config, verifier_params  # self
