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


def save(directory: str, trainable: dict, num_layers: int, verifier: str) -> None:
  checkpoint_io.save_params(os.path.join(directory, "params"), trainable)
  with open(os.path.join(directory, "drafter.json"), "w") as f:
    json.dump({"num_layers": num_layers, "verifier": verifier}, f, indent=1)


def _load_trained(directory: str, verifier_config: ModelConfig, verifier_params: dict):
  """(config, params) of a saved drafter, re-attached to its verifier's embedding and head."""
  meta_path = os.path.join(directory, "drafter.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{directory} holds no trained drafter (no drafter.json); train one "
                            "with experiments/train_drafter.py")
  with open(meta_path) as f:
    meta = json.load(f)
  config, _, shared = from_verifier(verifier_config, verifier_params, meta["num_layers"])
  trainable = checkpoint_io.restore_params(os.path.join(directory, "params"))
  return config, {**shared, **trainable}


def load(source: str, verifier_config: ModelConfig, verifier_params: dict):
  """(config, params) of the drafter named by `source` (see the module docstring)."""
  kind, _, value = source.partition(":")
  if source == "self":
    return verifier_config, verifier_params
  if kind == "layers" and value.isdigit():
    return checkpoint_io.take_layers(verifier_config, verifier_params, int(value))
  if kind == "trained" and value:
    return _load_trained(os.path.join(value, "drafter"), verifier_config, verifier_params)
  if kind == "checkpoint" and value:
    return checkpoint_io.load_checkpoint(value)
  raise ValueError(f"drafter {source!r}: expected 'self', 'layers:<k>', 'trained:<workdir>' or "
                   "'checkpoint:<path>'")
