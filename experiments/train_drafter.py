"""Trains a BudgetDraft drafter (or a baseline) for the verifier; resumes from its workdir.

  python experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:multiview
  python experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:naive
  python experiments/train_drafter.py --config=configs/budgetdraft_smollm2.py:single
  python experiments/train_drafter.py --config=configs/budgetdraft_paper.py:cpu   # as published

Training sequences are non-overlapping (prompt_len + continuation)-token sequences of the dataset's
train split, shuffled by the seed. Progress goes to the log, per-step metrics to
<workdir>/metrics.jsonl and TensorBoard (<workdir>/tensorboard), checkpoints to
<workdir>/checkpoints, the trained drafter to <workdir>/drafter (use it as `trained:<workdir>`).
With several devices, the run is sharded on `--config.mesh` (default: every device on `data`):
the batch over `data`, parameters and optimizer state FSDP-sharded; checkpoints restore onto
any mesh.
"""

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

from budgetdraft import launch
from budgetdraft.data import packing
from budgetdraft.training import trainer
from budgetdraft.training.config import TrainConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/budgetdraft_smollm2.py:multiview")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "Stop (checkpointed) after this many steps; rerun to resume.")


def main(argv):
  del argv
  config = TrainConfig.from_dict(_CONFIG.value)
  mesh = launch.mesh(config.mesh)
  verifier = launch.checkpoint(config.checkpoint)
  sequences = packing.dataset_sequences(config.dataset, config.data_dir, config.split,
                                        verifier.tokenizer, config.sequence_len)
  sequences = sequences[np.random.default_rng(config.seed).permutation(len(sequences))]
  logging.info("%d training sequences of %d tokens; %d steps x batch %d cycle through %d of them",
               len(sequences), sequences.shape[1], config.steps, config.batch_size,
               config.sequences_used(len(sequences)))
  trainer.train(config, verifier.config, verifier.params, sequences, verifier_name=verifier.name,
                stop_after=_STOP_AFTER.value, mesh=mesh)


if __name__ == "__main__":
  app.run(main)
