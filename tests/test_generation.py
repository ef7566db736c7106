"""Text in, text out: `generation.Generation` and experiments/generate.py end to end on a tiny
random model saved as an HF folder with a byte-level tokenizer, and once on SmolLM2."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from budgetdraft import drafters, generation
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.decoding.speculative import SpeculativeConfig
from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import init_params
from tests import checkpoint_writers
from tests.conftest import REPO_ROOT

PROMPT = "The lighthouse keeper said: café, naïve, 42."


def _byte_characters() -> dict[int, str]:
  """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  """A 2-layer random model + a byte-level tokenizer: 256 bytes and 2 specials."""
  directory = str(tmp_path_factory.mktemp("tiny_model"))
  config = get_config("tiny", vocab_size=258, max_context=512)
  params = init_params(config, jax.random.key(3))
  # Token id = byte value. Non-ASCII rows of the tied embedding are zero, so their logit is 0 and
  # an ASCII byte (some logit > 0) wins: the model writes valid text that streams piece by piece.
  params["embed"]["embedding"] = (params["embed"]["embedding"] * 5).at[128:256].set(0.0)
  checkpoint_writers.write_safetensors(directory, config, params)
  tokenizer = Tokenizer(models.BPE(vocab={c: b for b, c in _byte_characters().items()},
                                   merges=[]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([AddedToken("<|im_start|>", special=True),
                                AddedToken("<|im_end|>", special=True)])
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, f)
  return directory


def _generate(folder, *flags, stdin=None):
  return subprocess.run([sys.executable, "experiments/generate.py", *flags,
                         f"--config.checkpoint={folder}", "--config.prefill_chunk=32"],
                        cwd=REPO_ROOT, capture_output=True, text=True, input=stdin, timeout=300)


def test_ar_and_speculative_give_the_same_greedy_text(tiny_folder):
  outputs = {}
  for drafter in ("none", "self", "layers:1"):
    result = _generate(tiny_folder, "--json", f"--config.drafter={drafter}",
                       "--config.max_new_tokens=24", "--config.policy=streaming",
                       "--config.budget=70", f"--prompt={PROMPT * 3}")
    assert result.returncode == 0, result.stderr[-2000:]
    outputs[drafter] = json.loads(result.stdout)
  texts = {drafter: output["text"] for drafter, output in outputs.items()}
  assert texts["none"] == texts["self"] == texts["layers:1"] and texts["none"]
  stats = outputs["layers:1"]["stats"]
  assert stats["emitted_tokens"] == 24 and stats["verifier_calls"] < 24
  assert stats["drafter_kv_bytes"] > 0 and stats["acceptance"] is not None
  assert outputs["none"]["stats"]["acceptance"] is None


def test_speculative_prefill_prunes_and_decodes_losslessly_from_the_pruned_prompt(tiny_folder):
  """AR (scored by layers:1) and speculative decoding (drafter layers:1 scores) keep the same
  chunks, so their greedy texts agree; the verifier prefilled fewer tokens than the prompt has."""
  outputs = {}
  for drafter in ("none", "layers:1"):
    result = _generate(tiny_folder, "--json", f"--config.drafter={drafter}",
                       "--config.scorer=layers:1", "--config.keep_rate=0.5",
                       "--config.max_new_tokens=16", "--config.policy=lookahead",
                       "--config.budget=70", f"--prompt={PROMPT * 4}")
    assert result.returncode == 0, result.stderr[-2000:]
    outputs[drafter] = json.loads(result.stdout)
  assert outputs["none"]["text"] == outputs["layers:1"]["text"] and outputs["none"]["text"]
  for output in outputs.values():
    stats = output["stats"]
    assert 0 < stats["prefilled_tokens"] < stats["prompt_tokens"], stats


def test_streamed_text_is_the_final_text_and_stats_go_to_stderr(tiny_folder):
  streamed = _generate(tiny_folder, "--config.drafter=layers:1", "--chat", stdin=PROMPT)
  assert streamed.returncode == 0, streamed.stderr[-2000:]
  final = json.loads(_generate(tiny_folder, "--config.drafter=layers:1", "--chat", "--json",
                               stdin=PROMPT).stdout)
  assert streamed.stdout == final["text"] + "\n"
  assert "prompt_tokens=" in streamed.stderr and "decode_tokens_per_s=" in streamed.stderr


@pytest.mark.parametrize("flags, message", [
    (["--prompt=   "], "the prompt is empty"),
    (["--prompt=hi", "--config.drafter=layer:2"], "expected 'self', 'layers:<k>'"),
    (["--prompt_file=/nonexistent/prompt.txt"], "cannot read --prompt_file"),
    (["--prompt=" + "word " * 400], "the prompt has 2000 tokens; .* allows 256"),
    (["--prompt=hi", "--config.temperature=-1"], "temperature=-1.0 must be"),
    (["--prompt=hi", "--config.keep_rate=0"], r"keep_rate=0.0 must be in \(0, 1\]"),
    (["--prompt=hi", "--config.keep_rate=0.5", "--config.scorer=layer:2"],
     "expected 'self', 'layers:<k>'"),
])
def test_bad_input_gives_one_clear_line(tiny_folder, flags, message):
  result = _generate(tiny_folder, *flags)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("generate.py: ") and "Traceback" not in result.stderr, lines[-5:]
  assert re.search(message, lines[-1]), lines[-1]


def test_left_truncation_keeps_the_end_of_a_long_prompt(tiny_folder):
  result = _generate(tiny_folder, "--truncate=left", "--json", "--prompt=" + "word " * 400)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout)["stats"]["prompt_tokens"] == 512 - 256
  assert "cut to its last 256" in result.stderr


def _tiny_run(folder, stop=(), max_new_tokens=40):
  model = checkpoint_io.load(folder)
  spec = SpeculativeConfig(gamma=3, max_new_tokens=max_new_tokens, prefill_chunk=32,
                           sampling=SamplingConfig(), eos_id=model.tokenizer.eos_id)
  prompt = generation.prompt_tokens(model, PROMPT, chat=False, spec=spec, speculative=True,
                                    truncate=False)
  return generation.Generation(model, drafters.load("layers:1", model.config, model.params),
                               prompt, spec, stop=stop)


def test_stop_strings_end_the_text_where_they_first_appear(tiny_folder):
  full = _tiny_run(tiny_folder)
  pieces = list(full)
  full_text = "".join(pieces)
  assert len(pieces) > 3 and full_text == full.text  # streamed round by round, not at the end
  assert len(full_text) > 10
  stop = full_text[5:8]
  stopped = _tiny_run(tiny_folder, stop=(stop,))
  pieces = list(stopped)
  assert "".join(pieces) == stopped.text == full_text[:full_text.index(stop)]


def test_pieces_never_split_a_character(tiny_folder):
  run = _tiny_run(tiny_folder)
  tokenizer = run.verifier.tokenizer
  cafe = tokenizer.encode("café")                       # "é" is two byte tokens
  assert run._decided(cafe[:-1], final=False)[0] == "caf"  # the cut character is held back
  assert run._decided(cafe[:-1], final=True)[0] == "caf\ufffd"
  assert run._decided(cafe, final=False)[0] == "café"


@pytest.mark.slow
def test_smollm2_answers_a_chat_question(smollm2):
  result = subprocess.run([sys.executable, "experiments/generate.py", "--chat", "--json",
                           "--prompt=What is the capital of France?",
                           "--config.max_new_tokens=24"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  output = json.loads(result.stdout)
  assert "Paris" in output["text"], output
  assert output["stats"]["emitted_tokens"] <= 24
  assert output["stats"]["acceptance"] is not None  # "auto": the shipped drafter speculated
