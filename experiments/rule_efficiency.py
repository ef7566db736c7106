"""Verification rules inside the speculative engine on a real model: tokens per verifier call (with
standard errors) and wall time per emitted token, teacher-free.

  python experiments/rule_efficiency.py --config=configs/rule_efficiency.py:smollm2

Writes results/rule_efficiency.{md,json}. The measurement is
`budgetdraft.evaluation.rule_efficiency`.
"""

from absl import app, flags
from ml_collections import config_flags

from budgetdraft import drafters, launch, parallel
from budgetdraft.data import packing
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.decoding.speculative import SpeculativeConfig
from budgetdraft.evaluation import results, rule_efficiency
from budgetdraft.sparsity.selection import SparsityConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/rule_efficiency.py:smollm2")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where the table goes.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  spec = SpeculativeConfig(gamma=cfg.gamma, sampling=SamplingConfig(cfg.temperature, cfg.top_p),
                           max_new_tokens=cfg.max_new_tokens, prefill_chunk=cfg.prefill_chunk,
                           sparsity=SparsityConfig(**cfg.sparsity))
  for rule, num_paths in cfg.rules:  # every row is a valid configuration before any model work
    SpeculativeConfig(gamma=cfg.gamma, rule=rule, num_paths=num_paths)
  drafters.check(cfg.drafter)
  prompt_len = cfg.context - cfg.max_new_tokens - max(k for _, k in cfg.rules) * cfg.gamma - 1
  mesh = launch.mesh(cfg.mesh)
  verifier = parallel.place_checkpoint(mesh, launch.checkpoint(cfg.checkpoint))
  drafter = parallel.place_drafter(mesh, drafters.load(cfg.drafter, verifier.config,
                                                        verifier.params))
  prompts = packing.dataset_sequences(cfg.dataset, cfg.data_dir, cfg.split, verifier.tokenizer,
                                      prompt_len, cfg.num_prompts)
  rows = rule_efficiency.rule_efficiency(verifier, drafter, prompts, list(cfg.rules), spec)
  if not parallel.is_writer():
    return

  path = results.output_path(_RESULTS_DIR.value, "rule_efficiency",
                             config_flags.get_override_values(flags.FLAGS["config"]))
  notes = (f"Verifier {verifier.name}; drafter `{cfg.drafter}` over {spec.sparsity.policy}@"
           f"{spec.sparsity.budget}; {cfg.num_prompts} held-out {cfg.dataset}/{cfg.split} prompts "
           f"of {prompt_len} tokens, {cfg.max_new_tokens} new tokens each, gamma={cfg.gamma}, "
           f"temperature {cfg.temperature}, top-p {cfg.top_p}. tokens/call SE = standard error "
           "over rounds. ms/token = decode-loop wall time per emitted token (prefill excluded); "
           "AR ms/token from AR decoding of the same prompts in the same run.")
  print(results.write(path, "Verification rules in the engine", rows, notes))


if __name__ == "__main__":
  app.run(main)
