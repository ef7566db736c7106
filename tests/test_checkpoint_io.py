"""GGUF and safetensors import on tiny checkpoints written by the test, and every malformed case."""

import dataclasses
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import Transformer, init_params
from tests import checkpoint_writers

# Worst-case absolute dequantization error for weights ~N(0, 0.05) (64-wide rows).
QUANT_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "Q8_0": 2e-3, "Q4_1": 3e-2, "Q4_0": 3e-2}


def _logits(config, params, tokens):
  positions = jnp.arange(tokens.shape[1])[None]
  hidden, _ = Transformer(config).apply({"params": params}, tokens, positions,
                                        FullKVCache.init(config, 1, tokens.shape[1]))
  return Transformer(config).apply({"params": params}, hidden, method=Transformer.logits)


def _scaled_params(config, seed=0):
  """Random params with realistic weight scale (flax's default init is too wide for Q4 tolerances)."""
  params = init_params(config, jax.random.key(seed))
  return jax.tree.map(lambda x: np.asarray(x) * 0.5 if x.ndim > 1 else np.asarray(x) + 0.1,
                      params)


@pytest.mark.parametrize("quant", list(QUANT_TOLERANCE))
def test_gguf_round_trip(tmp_path, quant):
  config = get_config("tiny")
  params = _scaled_params(config)
  path = checkpoint_writers.write_gguf(str(tmp_path / "m.gguf"), config, params, quant)
  loaded_config, loaded = checkpoint_io.load_gguf(path, attention_block=config.attention_block)
  assert loaded_config.norm_eps == pytest.approx(config.norm_eps)  # GGUF stores it as float32
  assert dataclasses.replace(loaded_config, norm_eps=config.norm_eps) == config
  errors = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), loaded, params)
  assert max(jax.tree.leaves(errors)) <= QUANT_TOLERANCE[quant] + 1e-7, errors


def test_gguf_unpermutes_qk_so_logits_match(tmp_path):
  config = get_config("tiny")
  params = _scaled_params(config, seed=1)
  path = checkpoint_writers.write_gguf(str(tmp_path / "m.gguf"), config, params, "F32")
  loaded_config, loaded = checkpoint_io.load_gguf(path, attention_block=config.attention_block)
  tokens = jax.random.randint(jax.random.key(2), (1, 24), 0, config.vocab_size)
  np.testing.assert_allclose(_logits(loaded_config, loaded, tokens),
                             _logits(config, params, tokens), atol=1e-5)


@pytest.mark.parametrize("preset,model_type", [("tiny", "llama"), ("tiny-untied", "qwen2")])
def test_safetensors_round_trip(tmp_path, preset, model_type):
  config = get_config(preset)
  params = _scaled_params(config)
  directory = checkpoint_writers.write_safetensors(str(tmp_path), config, params, model_type)
  loaded_config, loaded = checkpoint_io.load_safetensors(
      directory, attention_block=config.attention_block)
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_load_checkpoint_dispatches_and_takes_layers(tmp_path):
  config = get_config("tiny")
  params = _scaled_params(config)
  directory = checkpoint_writers.write_safetensors(str(tmp_path), config, params)
  loaded_config, loaded = checkpoint_io.load_checkpoint(directory)
  drafter_config, drafter = checkpoint_io.take_layers(loaded_config, loaded, 1)
  assert drafter_config.num_layers == 1
  assert drafter["layers"]["q_proj"]["kernel"].shape[0] == 1
  np.testing.assert_array_equal(drafter["embed"]["embedding"], params["embed"]["embedding"])
  with pytest.raises(ValueError, match="num_layers=3"):
    checkpoint_io.take_layers(loaded_config, loaded, 3)


def test_orbax_round_trip(tmp_path, tiny_model):
  _, params = tiny_model
  checkpoint_io.save_params(str(tmp_path / "ckpt"), params)
  jax.tree.map(np.testing.assert_array_equal, checkpoint_io.restore_params(str(tmp_path / "ckpt")),
               params)


# ------------------------------------------------------------------------------ malformed files


@pytest.fixture
def gguf_file(tmp_path):
  config = get_config("tiny")
  return config, checkpoint_writers.write_gguf(str(tmp_path / "m.gguf"), config,
                                               _scaled_params(config), "Q8_0")


def test_gguf_wrong_magic(tmp_path):
  path = tmp_path / "bad.gguf"
  path.write_bytes(b"GGML" + os.urandom(64))
  with pytest.raises(checkpoint_io.CheckpointError, match=r"bad.gguf: not a GGUF file"):
    checkpoint_io.load_gguf(str(path))


def test_gguf_truncated(gguf_file, tmp_path):
  _, path = gguf_file
  data = open(path, "rb").read()
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(checkpoint_io.CheckpointError, match=r"truncated.gguf: unreadable GGUF"):
    checkpoint_io.load_gguf(str(truncated))


def test_gguf_missing_tensor(tmp_path):
  config = get_config("tiny")
  path = checkpoint_writers.write_gguf(str(tmp_path / "m.gguf"), config, _scaled_params(config),
                                       drop=("blk.1.ffn_up.weight",))
  with pytest.raises(checkpoint_io.CheckpointError, match=r"m.gguf: missing tensor blk.1.ffn_up"):
    checkpoint_io.load_gguf(path)


def test_gguf_shape_mismatch(tmp_path):
  config = get_config("tiny")
  path = checkpoint_writers.write_gguf(str(tmp_path / "m.gguf"), config, _scaled_params(config),
                                       reshape=("blk.0.ffn_down.weight",))
  with pytest.raises(checkpoint_io.CheckpointError,
                     match=r"m.gguf: tensor blk.0.ffn_down.weight: shape \(63, 128\)"):
    checkpoint_io.load_gguf(path)


def test_gguf_not_llama_family(tmp_path):
  writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
  writer.add_block_count(1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(checkpoint_io.CheckpointError, match="architecture 'bert'"):
    checkpoint_io.load_gguf(str(tmp_path / "bert.gguf"))


def test_safetensors_missing_tensor(tmp_path):
  config = get_config("tiny")
  directory = checkpoint_writers.write_safetensors(
      str(tmp_path), config, _scaled_params(config), drop=("model.layers.1.mlp.up_proj.weight",))
  with pytest.raises(checkpoint_io.CheckpointError,
                     match="missing tensor model.layers.1.mlp.up_proj.weight"):
    checkpoint_io.load_safetensors(directory)


def test_safetensors_shape_mismatch(tmp_path):
  config = get_config("tiny")
  directory = checkpoint_writers.write_safetensors(
      str(tmp_path), config, _scaled_params(config), reshape=("model.norm.weight",))
  with pytest.raises(checkpoint_io.CheckpointError, match=r"model.norm.weight: shape \(63,\)"):
    checkpoint_io.load_safetensors(directory)


def test_safetensors_truncated(tmp_path):
  config = get_config("tiny")
  directory = checkpoint_writers.write_safetensors(str(tmp_path), config, _scaled_params(config))
  file = os.path.join(directory, "model.safetensors")
  data = open(file, "rb").read()
  open(file, "wb").write(data[:len(data) // 2])
  with pytest.raises(checkpoint_io.CheckpointError, match="model.safetensors"):
    checkpoint_io.load_safetensors(directory)


def test_unsupported_model_type(tmp_path):
  config = get_config("tiny")
  directory = checkpoint_writers.write_safetensors(str(tmp_path), config, _scaled_params(config),
                                                   model_type="gpt2")
  with pytest.raises(checkpoint_io.CheckpointError, match="model_type 'gpt2'"):
    checkpoint_io.load_safetensors(directory)
