"""Generates text for a prompt, streaming it to stdout; statistics go to stderr.

  python experiments/generate.py --prompt="What is the capital of France?" --chat
  python experiments/generate.py --prompt_file=notes.txt --config.drafter=self \
      --config.max_new_tokens=128 --config.temperature=0.7
  cat notes.txt | python experiments/generate.py --json

The prompt comes from --prompt, --prompt_file or stdin. Decoding settings are the config's fields
(configs/generate.py): --config.drafter (a drafter source, none = autoregressive, or auto = the
shipped drafter when it was trained for this verifier, else none), .policy,
.budget, .rule, .num_paths, .gamma, .temperature, .top_p, .seed, .max_new_tokens, .stop, and the
speculative prefill's .keep_rate (< 1: the verifier prefills only the prompt chunks a small model
picks, the drafter or .scorer; faster to the first token, no longer lossless w.r.t. the full
prompt):

  python experiments/generate.py --prompt_file=book.txt --config.keep_rate=0.25
"""

import dataclasses
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from budgetdraft import drafters, generation, launch, parallel, specprefill
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.decoding.speculative import SpeculativeConfig
from budgetdraft.sparsity.selection import SparsityConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/generate.py:default")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A UTF-8 file holding the prompt.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt in the model's chat template.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object {text, stats} instead of streaming.")
_TRUNCATE = flags.DEFINE_enum("truncate", "none", ["none", "left"],
                              "What to do with a prompt longer than the context allows.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  try:
    if _PROMPT.value is not None and _PROMPT_FILE.value is not None:
      raise ValueError("give --prompt or --prompt_file, not both")
    sparsity = None if cfg.drafter == "none" or cfg.policy == "full" else SparsityConfig(
        policy=cfg.policy, budget=cfg.budget)
    spec = SpeculativeConfig(gamma=cfg.gamma, num_paths=cfg.num_paths, rule=cfg.rule,
                             sampling=SamplingConfig(cfg.temperature, cfg.top_p),
                             max_new_tokens=cfg.max_new_tokens, prefill_chunk=cfg.prefill_chunk,
                             sparsity=sparsity)
    if cfg.drafter not in ("none", "auto"):
      drafters.check(cfg.drafter)
    selection = (None if cfg.keep_rate == 1.0 else
                 specprefill.SpecPrefillConfig(keep_rate=cfg.keep_rate))
    if selection is not None and cfg.drafter in ("none", "auto"):
      drafters.check(cfg.scorer)
    if _PROMPT_FILE.value is not None:
      try:
        with open(_PROMPT_FILE.value, encoding="utf-8") as f:
          text = f.read()
      except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompt_file={_PROMPT_FILE.value}: {e}") from e
    else:
      text = _PROMPT.value if _PROMPT.value is not None else sys.stdin.read()

    mesh = launch.mesh(cfg.mesh)
    verifier = parallel.place_checkpoint(mesh, launch.checkpoint(cfg.checkpoint))
    source = cfg.drafter
    if source == "auto":  # the shipped drafter takes feature inputs: no speculative prefill
      shipped = drafters.shipped_for(verifier.config, verifier.params)
      source = shipped if shipped and selection is None else "none"
    drafter = (None if source == "none" else parallel.place_drafter(
        mesh, drafters.load(source, verifier.config, verifier.params)))
    prompt = generation.prompt_tokens(verifier, text, chat=_CHAT.value, spec=spec,
                                      speculative=drafter is not None,
                                      truncate=_TRUNCATE.value == "left")
    spec = dataclasses.replace(spec, eos_id=verifier.tokenizer.eos_id,
                               pad_id=verifier.tokenizer.eos_id or 0)
    scorer = (parallel.place_drafter(mesh, drafters.load(cfg.scorer, verifier.config,
                                                         verifier.params))
              if selection is not None and drafter is None else None)
    run = generation.Generation(verifier, drafter, prompt, spec, stop=tuple(cfg.stop),
                                seed=cfg.seed, selection=selection, scorer=scorer)
    for piece in run:  # every process decodes; process 0 prints
      if not _JSON.value and parallel.is_writer():
        sys.stdout.write(piece)
        sys.stdout.flush()
    if not parallel.is_writer():
      return
    if _JSON.value:
      print(json.dumps({"text": run.text, "stats": run.stats.as_dict()}))
    else:
      sys.stdout.write("\n")
      print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in run.stats.as_dict().items()), file=sys.stderr)
  except (ValueError, OSError) as e:  # bad input: one line naming it, no traceback
    sys.exit(f"generate.py: {e}")


if __name__ == "__main__":
  app.run(main)
