"""`TrainConfig`: everything a BudgetDraft training run reads, typed, frozen and validated once.

Config files stay ml_collections (`configs/budgetdraft_*.py`, `--config.field=value` overrides);
the entry point converts them here (`TrainConfig.from_dict`) and nothing past it sees a loose dict.
Frozen and hashable, so the jitted train step takes it as a static argument.
"""

import dataclasses
from typing import Mapping

from budgetdraft import drafters
from budgetdraft.models.config import ModelConfig
from budgetdraft.sparsity.selection import SparsityConfig

# Fields that say where files are, how often to report or whether a resume may change the recipe,
# not what is trained. `steps` may grow when a finished run is extended (the trainer warns).
RUN_CONTROL_FIELDS = frozenset({"workdir", "variant", "checkpoint", "data_dir", "log_every",
                                "checkpoint_every", "allow_config_change", "steps",
                                "teacher.cache_dir", "mesh"})


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """The shared full-cache teacher: the verifier's top-k next-token probabilities (top_k = 0: its
  whole law, on the fly only; a cache of it would hold 4 bytes per vocabulary entry per token)."""

  top_k: int = 64
  cache_dir: str = ""  # "" = on the fly; else cached once in <cache_dir>/targets.array_record

  def __post_init__(self):
    if self.top_k < 0:
      raise ValueError(f"teacher.top_k={self.top_k} must be >= 1, or 0 for the whole law")
    if self.top_k == 0 and self.cache_dir:
      raise ValueError("teacher.top_k=0 (the whole law) is computed on the fly; set "
                       "teacher.cache_dir='' or cache a top_k >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run. The three methods are one trainer: num_views = 0 (naive distillation),
  1 with one budget (single-budget), M over a budget range (BudgetDraft multi-view)."""

  workdir: str
  variant: str = ""
  checkpoint: str = ""             # the verifier; "" = the embedded SmolLM2-135M-Instruct GGUF
  dataset: str = "long_books"
  data_dir: str = "data"
  split: str = "train"
  seed: int = 0

  drafter: str = "layers"          # drafters.KINDS: "layers" (the verifier's first k blocks),
                                   # "eagle" (k fresh blocks fed the verifier's hidden states) or
                                   # "pruned" (the pruned verifier in `pruned_from`)
  drafter_layers: int = 6          # k (the embedding and head are the verifier's, shared)
  pruned_from: str = ""            # drafter "pruned": experiments/prune.py's output directory
  draft_vocab: int = 0             # > 0: the head scores only the most frequent training tokens
  feature_weight: float = 0.0      # eagle: weight of the smooth-L1 regression on hidden states
  self_fed_weight: float = 0.0     # eagle: weight of the loss of a second continuation pass fed
                                   # the drafter's own hidden states (views.self_fed_features)
  prompt_len: int = 1024           # compression point P inside each training sequence
  continuation: int = 256          # C positions after P carry the losses
  batch_size: int = 1
  steps: int = 100
  num_sequences: int = 0           # training sequences cycled through (0: steps x batch_size,
                                   # one pass); fewer than that trains several epochs

  learning_rate: float = 3e-4
  warmup_steps: int = 10
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  final_lr_fraction: float = 0.1   # the cosine schedule ends at this share of learning_rate
  kl_weight: float = 0.5           # forward-KL share of the divergence (gradient early on)
  rejection_weight: float = 1.0    # expected-rejection (TV) share; 0 = forward KL alone, whose
                                   # gradient vanishes where the drafter equals the teacher
  targets: str = "soft"            # "soft": rejection + kl_weight KL against the teacher's top-k
                                   # law; "argmax": cross-entropy to its argmax (published recipe)
  prefix_gradient: bool = True     # False: the prompt's keys are prefilled without gradient

  sparsity: SparsityConfig = SparsityConfig(budget=None)  # the inference selection of the views
  gamma: int = 4                   # views see the last recent + gamma tokens, like the ring
  budgets: tuple[int, ...] = (128, 256, 512)
  budget_weights: tuple[float, ...] = ()  # sampling weights of `budgets`; () = uniform
  num_views: int = 2               # M budgets sampled per step (0 = the full branch alone)
  sparse_weight: float = 1.0       # lambda in L_full + lambda * mean_B L_sparse(B)

  teacher: TeacherConfig = TeacherConfig()
  log_every: int = 10
  checkpoint_every: int = 20
  allow_config_change: bool = False  # resume a workdir under a different recipe (with a warning)
  mesh: str = ""                   # "data=4,model=2" (parallel.make_mesh); "" = every device on
                                   # data when there are several, else none

  def __post_init__(self):
    for name in ("drafter_layers", "prompt_len", "continuation", "batch_size", "steps", "gamma",
                 "log_every", "checkpoint_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.sparsity.budget is not None:
      raise ValueError("sparsity.budget must be unset: the views' budgets come from `budgets`")
    if self.drafter not in drafters.KINDS:
      raise ValueError(f"drafter={self.drafter!r}; valid: {', '.join(map(repr, drafters.KINDS))}")
    if (self.drafter == "pruned") != bool(self.pruned_from):
      raise ValueError(f"pruned_from={self.pruned_from!r} names the pruned model of drafter="
                       "'pruned', and only of it")
    if self.draft_vocab < 0 or self.feature_weight < 0:
      raise ValueError(f"draft_vocab={self.draft_vocab} and feature_weight={self.feature_weight} "
                       "must be >= 0")
    if self.feature_weight and self.drafter != "eagle":
      raise ValueError("feature_weight regresses the verifier's hidden states: drafter='eagle' only")
    if self.self_fed_weight < 0:
      raise ValueError(f"self_fed_weight={self.self_fed_weight} must be >= 0")
    if self.self_fed_weight and self.drafter != "eagle":
      raise ValueError("self_fed_weight replaces the verifier's hidden states that an EAGLE "
                       "drafter is fed by its own: drafter='eagle' only")
    if self.num_sequences < 0:
      raise ValueError(f"num_sequences={self.num_sequences} must be >= 0")
    if self.num_views < 0:
      raise ValueError(f"num_views={self.num_views} must be >= 0")
    if self.targets not in ("soft", "argmax"):
      raise ValueError(f"targets={self.targets!r}; valid: 'soft', 'argmax'")
    if min(self.kl_weight, self.rejection_weight) < 0 or (
        self.targets == "soft" and not self.kl_weight + self.rejection_weight):
      raise ValueError(f"kl_weight={self.kl_weight} and rejection_weight={self.rejection_weight} "
                       "must be >= 0, not both 0 (soft targets)")
    if not 0.0 <= self.final_lr_fraction <= 1.0:
      raise ValueError(f"final_lr_fraction={self.final_lr_fraction} must be in [0, 1]")
    if self.budget_weights and (len(self.budget_weights) != len(self.budgets) or
                                min(self.budget_weights) < 0 or sum(self.budget_weights) <= 0):
      raise ValueError(f"budget_weights={self.budget_weights} must give one weight >= 0 per "
                       f"budget in {self.budgets}, not all zero")
    if self.num_views:
      if not self.budgets:
        raise ValueError("the budget list is empty; give at least one budget")
      for budget in self.budgets:
        self.sparsity.check_budget(budget)
      if max(self.budgets) >= self.prompt_len:
        raise ValueError(f"budget {max(self.budgets)} keeps the whole {self.prompt_len}-token "
                         "prompt (that is the full-cache branch); use budgets below prompt_len")
      if self.sparse_weight < 0:
        raise ValueError(f"sparse_weight (lambda)={self.sparse_weight} must be >= 0")

  @classmethod
  def from_dict(cls, values: Mapping) -> "TrainConfig":
    """From an ml_collections ConfigDict (or a plain mapping) with the fields of this class."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown training config fields {unknown}")
    values["sparsity"] = SparsityConfig(budget=None, **values.get("sparsity", {}))
    values["teacher"] = TeacherConfig(**values.get("teacher", {}))
    values["budgets"] = tuple(values.get("budgets", cls.budgets))
    values["budget_weights"] = tuple(values.get("budget_weights", cls.budget_weights))
    return cls(**values)

  def recipe(self) -> dict:
    """The fields that decide what is trained, flattened ("sparsity.policy": "snapkv", ...)."""
    flat = {}
    for name, value in dataclasses.asdict(self).items():
      items = value.items() if isinstance(value, dict) else [(None, value)]
      for sub, leaf in items:
        key = name if sub is None else f"{name}.{sub}"
        if key not in RUN_CONTROL_FIELDS:
          flat[key] = list(leaf) if isinstance(leaf, tuple) else leaf
    return flat

  @property
  def ring_size(self) -> int:
    return self.sparsity.ring_size(self.gamma)

  def sequences_used(self, available: int) -> int:
    """How many of `available` training sequences the run cycles through."""
    return min(available, self.num_sequences or self.steps * self.batch_size)

  @property
  def sequence_len(self) -> int:
    return self.prompt_len + self.continuation

  def check_against(self, verifier_config: ModelConfig, sequence_len: int) -> None:
    """The checks that need the verifier and the data."""
    if sequence_len != self.sequence_len:
      raise ValueError(f"sequences have {sequence_len} tokens, but prompt_len + continuation = "
                       f"{self.prompt_len} + {self.continuation}")
    if sequence_len > verifier_config.max_context:
      raise ValueError(f"training sequences of {sequence_len} tokens exceed the verifier's "
                       f"context of {verifier_config.max_context}")
    if self.teacher.top_k > verifier_config.vocab_size:
      raise ValueError(f"teacher.top_k={self.teacher.top_k} must be in [1, vocab size "
                       f"{verifier_config.vocab_size}], or 0 for the whole law")
    if self.draft_vocab > verifier_config.vocab_size:
      raise ValueError(f"draft_vocab={self.draft_vocab} exceeds the verifier's vocabulary of "
                       f"{verifier_config.vocab_size}")
    if self.drafter == "layers" and self.drafter_layers > verifier_config.num_layers:
      raise ValueError(f"drafter_layers={self.drafter_layers} exceeds the verifier's "
                       f"{verifier_config.num_layers} layers")
