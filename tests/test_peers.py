"""The HF transformers peer of bench_decode decodes the same tokens as we do (runs only where the
optional `peers` extra is installed)."""

import jax
import numpy as np
import pytest

from budgetdraft.evaluation import decode_speed, peers, timing
from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import init_params
from tests import checkpoint_writers

pytest.importorskip("transformers")
pytest.importorskip("torch")


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_hf_peer_decodes_our_greedy_tokens(tmp_path, fmt):
  config = get_config("tiny", max_context=512)
  params = init_params(config, jax.random.key(4))
  params["embed"]["embedding"] = params["embed"]["embedding"] * 20  # decisive greedy margins
  if fmt == "gguf":
    path = str(tmp_path / "tiny.gguf")
    checkpoint_writers.write_gguf(path, config, params)
  else:
    path = checkpoint_writers.write_safetensors(str(tmp_path / "tiny"), config, params)
  model = checkpoint_io.Checkpoint(path, *checkpoint_io.load_checkpoint(path), tokenizer=None)
  prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, 200))
  kwargs = dict(max_new_tokens=16, bandwidth=1e10)
  ours = decode_speed.decode_speed(model, prompt, [128, 216], prefill_chunk=64, repeats=1,
                                   **kwargs)
  theirs = peers.hf_decode_speed(model, prompt, [128, 216], repeats=1,
                                 weight_bytes=timing.tree_bytes(model.params),
                                 reference_rows=ours, **kwargs)
  for mine, hf in zip(ours, theirs):
    assert hf["tokens"] == mine["tokens"] and hf["context"] == mine["context"]
    assert hf["same greedy tokens"] == 16
    assert hf["ms/step"] > 0 and hf["system"].startswith("HF transformers")
