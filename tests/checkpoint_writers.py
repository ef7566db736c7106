"""Writes small GGUF and HF safetensors checkpoints from a params tree, as the real converters do."""

import json
import os

import gguf
import numpy as np
from safetensors.numpy import save_file

from budgetdraft.models.checkpoint_io import _BIAS_TENSORS, _GLOBAL_TENSORS, _LAYER_TENSORS


def hf_tensors(config, params) -> dict[str, np.ndarray]:
  """Our params -> HF-named tensors in HF orientation ([out, in])."""
  out = {}
  layer_names = dict(_LAYER_TENSORS, **(_BIAS_TENSORS if config.attention_bias else {}))
  for name, (_, hf_name) in layer_names.items():
    module, leaf = name.split("/")
    for i in range(config.num_layers):
      array = np.asarray(params["layers"][module][leaf][i], np.float32)
      out[f"model.layers.{i}.{hf_name}"] = array.T if leaf == "kernel" else array
  for name, (_, hf_name) in _GLOBAL_TENSORS.items():
    module, leaf = name.split("/")
    if module in params:
      array = np.asarray(params[module][leaf], np.float32)
      out[hf_name] = array.T if leaf == "kernel" else array
  return {name: np.ascontiguousarray(array) for name, array in out.items()}


def write_safetensors(directory, config, params, model_type="llama", drop=(), reshape=()):
  os.makedirs(directory, exist_ok=True)
  tensors = hf_tensors(config, params)
  for name in drop:
    del tensors[name]
  for name in reshape:
    tensors[name] = tensors[name][:-1]
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  hf_config = {
      "model_type": model_type, "vocab_size": config.vocab_size, "hidden_size": config.dim,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "intermediate_size": config.mlp_dim,
      "rope_theta": config.rope_theta, "rms_norm_eps": config.norm_eps,
      "tie_word_embeddings": config.tie_embeddings,
      "max_position_embeddings": config.max_context}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f)
  return directory


def _permute_rows(weight, num_heads):
  """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF rotate-half -> interleaved)."""
  rows = weight.shape[0]
  return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(
      1, 2).reshape(weight.shape)


def write_gguf(path, config, params, quant="F32", drop=(), reshape=()):
  """A llama-architecture GGUF; 2-D projection weights in `quant`, norms in F32."""
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_context)
  writer.add_embedding_length(config.dim)
  writer.add_feed_forward_length(config.mlp_dim)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  writer.add_vocab_size(config.vocab_size)
  hf = hf_tensors(config, params)
  to_gguf = {}
  for gguf_name, hf_name in {**_LAYER_TENSORS, **_BIAS_TENSORS}.values():
    for i in range(config.num_layers):
      if f"model.layers.{i}.{hf_name}" in hf:
        to_gguf[f"model.layers.{i}.{hf_name}"] = f"blk.{i}.{gguf_name}"
  for gguf_name, hf_name in _GLOBAL_TENSORS.values():
    to_gguf[hf_name] = gguf_name
  qtype = getattr(gguf.GGMLQuantizationType, quant)
  for hf_name, array in hf.items():
    name = to_gguf[hf_name]
    if name in drop:
      continue
    if name.endswith(("attn_q.weight", "attn_q.bias")):
      array = _permute_rows(array, config.num_heads)
    elif name.endswith(("attn_k.weight", "attn_k.bias")):
      array = _permute_rows(array, config.num_kv_heads)
    if name in reshape:
      array = array[:-1]
    if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
