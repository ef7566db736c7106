"""Trains a BudgetDraft drafter (or a baseline) for the verifier; resumes from its workdir.

  python experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:multiview
  python experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:naive
  python experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:single

Training sequences are non-overlapping (prompt_len + continuation)-token windows of the dataset's
train split, shuffled by the seed. Progress goes to the log, per-step metrics to
<workdir>/metrics.jsonl and TensorBoard (<workdir>/tensorboard), checkpoints to
<workdir>/checkpoints, the trained drafter to <workdir>/drafter (use it as `trained:<workdir>`).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

from budgetdraft import tokenizer as tokenizer_lib
from budgetdraft.data import packing, readers
from budgetdraft.models import checkpoint_io
from budgetdraft.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/budgetdraft_smollm2.py:multiview")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "Stop (checkpointed) after this many steps; rerun to resume.")


def training_sequences(cfg, tokenizer) -> np.ndarray:
  """[N, prompt_len + continuation] windows of the train split, in a seeded random order."""
  windows, _, _ = packing.document_windows(readers.documents(cfg.dataset, cfg.data_dir, cfg.split),
                                           tokenizer, cfg.prompt_len + cfg.continuation)
  if not len(windows):
    raise ValueError(f"{cfg.dataset}/{cfg.split} has no document of "
                     f"{cfg.prompt_len + cfg.continuation} tokens")
  return windows[np.random.default_rng(cfg.seed).permutation(len(windows))]


def main(argv):
  del argv
  cfg = _CONFIG.value
  path = cfg.checkpoint or checkpoint_io.default_verifier_path()
  verifier_config, verifier_params = checkpoint_io.load_checkpoint(path)
  sequences = training_sequences(cfg, tokenizer_lib.load_tokenizer(path))
  logging.info("%d training sequences of %d tokens; %d steps x batch %d use %d of them",
               len(sequences), sequences.shape[1], cfg.steps, cfg.batch_size,
               min(len(sequences), cfg.steps * cfg.batch_size))
  trainer.train(cfg, verifier_config, verifier_params, sequences, cfg.workdir,
                verifier_name=os.path.basename(path), stop_after=_STOP_AFTER.value)


if __name__ == "__main__":
  app.run(main)
