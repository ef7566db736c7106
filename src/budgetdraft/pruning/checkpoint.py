"""A pruned model on disk: sliced blocks (orbax) and pruned.json (widths, keep vector, verifier).

The embedding and head are the verifier's, unchanged, so they are not saved: `load` re-attaches
them after checking the verifier's fingerprint, as `drafters` does for trained drafters.
"""

import dataclasses
import json
import os
import shutil

from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import ModelConfig

SHARED = ("embed", "lm_head")
METADATA = "pruned.json"


def directory_for(workdir: str, method: str, target: float) -> str:
  """Where experiments/prune.py keeps the model of `method` at kept fraction `target`."""
  return os.path.join(workdir, f"{method}-{round(100 * target)}")


def save(directory: str, config: ModelConfig, params: dict, *, keep, verifier: dict,
         **metadata) -> None:
  """Writes a pruned model atomically (`<directory>.partial`, then renamed; refuses to replace
  an existing one). verifier: {"name", "fingerprint"}; metadata: kept fraction, method, command."""
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} exists; remove it or choose another directory")
  staging = directory + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  checkpoint_io.save_params(os.path.join(staging, "params"),
                            {k: v for k, v in params.items() if k not in SHARED})
  with open(os.path.join(staging, METADATA), "w") as f:
    json.dump({"verifier": verifier["name"], "verifier_fingerprint": verifier["fingerprint"],
               "num_layers": config.num_layers, "layer_kv_heads": list(config.layer_kv_heads),
               "layer_mlp_dims": list(config.layer_mlp_dims),
               "keep": [int(k) for k in keep], **metadata}, f)
  os.rename(staging, directory)


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} holds no pruned model (no {METADATA}); make one with "
                            "experiments/prune.py")
  with open(path) as f:
    return json.load(f)


def load(directory: str, verifier_config: ModelConfig, verifier_params: dict):
  """(config, params) of the pruned model in `directory`, cut from this verifier."""
  meta = read_metadata(directory)
  actual = checkpoint_io.fingerprint(verifier_config, verifier_params)
  if meta["verifier_fingerprint"] != actual:
    raise ValueError(f"{directory} was pruned from verifier {meta['verifier']!r} (fingerprint "
                     f"{meta['verifier_fingerprint']}), not from the given one ({actual})")
  config = dataclasses.replace(verifier_config, num_layers=meta["num_layers"],
                               layer_kv_heads=tuple(meta["layer_kv_heads"]),
                               layer_mlp_dims=tuple(meta["layer_mlp_dims"]))
  blocks = checkpoint_io.restore_params(os.path.join(directory, "params"))
  return config, {**{k: v for k, v in verifier_params.items() if k in SHARED}, **blocks}
