"""Tokenizers built with HF `tokenizers` from GGUF metadata or a tokenizer.json, never from a hub.

`checkpoint_io.load_tokenizer(path)` picks the source for a checkpoint path.
"""

import dataclasses
import json
import os

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp's pre-tokenizer names -> the split regex it applies before byte-level BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL_TOKEN_TYPE = 3


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
  """A `tokenizers.Tokenizer` with the ids decoding needs."""

  backend: Tokenizer
  bos_id: int | None
  eos_id: int | None

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=False)

  def chat_prompt(self, user_message: str, system: str | None = None) -> str:
    """A ChatML prompt (SmolLM2, Qwen2) asking the assistant to answer `user_message`."""
    parts = [] if system is None else [f"<|im_start|>system\n{system}<|im_end|>\n"]
    parts.append(f"<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n")
    return "".join(parts)


def _pre_tokenizer(pre: str):
  if pre == "smollm":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
  split = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
  if split is None:  # "default"/"gpt-2": the GPT-2 regex built into ByteLevel
    return pre_tokenizers.ByteLevel(add_prefix_space=False)
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(pattern=Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def from_gguf(reader: gguf.GGUFReader, path: str) -> TextTokenizer:
  """Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from an opened GGUF file's metadata."""
  field = lambda key: (reader.fields[key].contents() if key in reader.fields else None)
  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2') GGUF "
                     "tokenizers are supported; pass the model's tokenizer.json instead")
  tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
  if not tokens or not merges:
    raise ValueError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
  token_types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
  backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                 merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
  backend.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre") or "default")
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, kind in zip(tokens, token_types)
                              if kind == _CONTROL_TOKEN_TYPE])
  return TextTokenizer(backend, field("tokenizer.ggml.bos_token_id"),
                       field("tokenizer.ggml.eos_token_id"))


def from_hf_folder(directory: str) -> TextTokenizer:
  """tokenizer.json of an HF checkpoint; bos/eos names come from tokenizer_config.json if present."""
  backend = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  config_path = os.path.join(directory, "tokenizer_config.json")
  special = {}
  if os.path.exists(config_path):
    with open(config_path) as f:
      special = json.load(f)

  def token_id(key):
    token = special.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    return None if token is None else backend.token_to_id(token)

  return TextTokenizer(backend, token_id("bos_token"), token_id("eos_token"))
