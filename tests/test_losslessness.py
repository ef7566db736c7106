"""Losslessness of the whole engine on the real SmolLM2 verifier (slow; part of CI).

Greedy: speculative output equals AR output token for token on two held-out prompts (a ragged
batch) at 4K, for every verification rule and every KV policy, one path and several, on one prompt
filling the model's 8192 positions, and (at 1K) with both models on the Pallas kernels.
Sampling: the law of the first three emitted tokens equals AR sampling's (two-sample chi-square).
Both decoders start from one shared prefill of each prompt batch, the expensive part at 8K.
"""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from budgetdraft import drafters
from budgetdraft.data import packing
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.models import prefill
from budgetdraft.sparsity.selection import SparsityConfig

pytestmark = pytest.mark.slow

MAX_NEW, GAMMA, MAX_PATHS, CHUNK = 64, 3, 3, 512


class _Engine:
  """Both models prefilled once on a batch of prompts; AR and speculative runs decode from it."""

  def __init__(self, verifier, drafter, prompts, max_new=MAX_NEW, gamma=GAMMA, chunk=CHUNK):
    (self.config, self.params), (self.drafter_config, self.drafter_params) = verifier, drafter
    self.prompt, self.lengths = prefill.pad_prompts(prompts, 0, self.config.vocab_size)
    capacity = prefill.request_capacity(self.prompt.shape[1], max_new + MAX_PATHS * gamma + 1,
                                        chunk)
    self.logits, self.verifier_cache, self.drafter_cache, self.hidden = speculative.prefill_caches(
        self.params, self.drafter_params, self.prompt, self.lengths, verifier_config=self.config,
        drafter_config=self.drafter_config, capacity=capacity, prefill_chunk=chunk)

  def autoregressive(self, sampling=SamplingConfig(), max_new=MAX_NEW, seed=0):
    static = dict(sampling=sampling, eos_id=None, pad_id=0)
    state = autoregressive.begin(self.logits, self.verifier_cache, jax.random.key(seed),
                                 max_new_tokens=max_new, **static)
    state = autoregressive.decode(self.params, state, config=self.config, **static)
    return [row[:n].tolist() for row, n in zip(np.asarray(state.tokens),
                                               np.asarray(state.num_emitted))]

  def speculative(self, spec, seed=1):
    state = speculative.begin(self.drafter_params, self.logits, self.verifier_cache,
                              self.drafter_cache, self.prompt, self.lengths, jax.random.key(seed),
                              self.hidden, drafter_config=self.drafter_config, spec=spec)
    state = speculative.decode(self.params, self.drafter_params, state,
                               verifier_config=self.config, drafter_config=self.drafter_config,
                               spec=spec)
    return speculative.outputs_and_stats(state, spec)


def _held_out_prompts(tokenizer, data_dir, context):
  """Two held-out prompts: one filling the context, one 0.85 as long (a ragged batch)."""
  length = context - MAX_NEW - MAX_PATHS * GAMMA - 1
  first, other = packing.dataset_sequences("long_books", data_dir, "validation", tokenizer,
                                           length, 2)
  return [first.tolist(), other[:int(0.85 * length)].tolist()]


def _spec(rule, num_paths, policy):
  sparsity = None if policy is None else SparsityConfig(policy=policy, budget=256, window=32,
                                                        recent=64, lookahead=4)
  return speculative.SpeculativeConfig(gamma=GAMMA, num_paths=num_paths, rule=rule,
                                       max_new_tokens=MAX_NEW, prefill_chunk=CHUNK,
                                       sparsity=sparsity)


RULES_4K = [("tokenwise", 1), ("block", 1), ("greedy", 1), ("specinfer", 3), ("residual_bv", 3),
            ("gbv", 3), ("greedy", 3)]
# random and h2o (47 s here: it scores every prompt query) run on the tiny pair in test_speculative.
POLICIES_4K = ["streaming", "lookahead", "chunk_retrieval"]


# Engines are class-scoped: each class's caches are freed when the class ends.
@pytest.fixture(scope="class")
def engine_4k(smollm2, data_dir):
  """Drafter: the verifier itself (accepted often, but not always, over a sparse cache)."""
  config, params, tokenizer = smollm2
  engine = _Engine((config, params), (config, params),
                   _held_out_prompts(tokenizer, data_dir, 4096))
  return engine, engine.autoregressive()


@pytest.fixture(scope="class")
def engine_8k(smollm2, data_dir):
  """One prompt up to the model's 8192 positions (ragged rows are checked at 4K); a 6-layer cut
  drafts (cheap to prefill)."""
  config, params, tokenizer = smollm2
  engine = _Engine((config, params), drafters.load("layers:6", config, params),
                   _held_out_prompts(tokenizer, data_dir, 8192)[:1])
  return engine, engine.autoregressive()


@pytest.fixture(scope="class")
def engine_pallas(smollm2, data_dir):
  """Both models on the Pallas kernels (interpret mode on CPU): causal attention in prefill and
  decode, and the drafter's sparse cache; tree-masked verification stays on jnp."""
  config, params, tokenizer = smollm2
  config = dataclasses.replace(config, attention_impl="pallas", attention_block=128)
  engine = _Engine((config, params), (config, params),
                   _held_out_prompts(tokenizer, data_dir, 1024), chunk=128)
  return engine, engine.autoregressive()


SAMPLING_ROWS, SAMPLING_GAMMA, SAMPLING_CHUNK = 300, 2, 32


@pytest.fixture(scope="class")
def sampling_engine(smollm2):
  """300 rows of one short chat prompt (small chunks and attention blocks keep memory small)."""
  config, params, tokenizer = smollm2
  config = dataclasses.replace(config, attention_block=SAMPLING_CHUNK)
  prompt = tokenizer.encode(tokenizer.chat_prompt("Tell me a story about a lighthouse."))
  return _Engine((config, params), drafters.load("layers:4", config, params),
                 [prompt] * SAMPLING_ROWS, max_new=3, gamma=SAMPLING_GAMMA, chunk=SAMPLING_CHUNK)


class TestGreedyAt4K:

  @pytest.mark.parametrize("rule,num_paths,policy",
                           [(rule, paths, "snapkv") for rule, paths in RULES_4K] +
                           [("block", 1, policy) for policy in POLICIES_4K] + [("gbv", 2, None)])
  def test_speculative_equals_ar(self, engine_4k, rule, num_paths, policy):
    engine, expected = engine_4k
    assert len(expected[0]) == MAX_NEW and engine.lengths.tolist()[0] > 4000
    out, stats = engine.speculative(_spec(rule, num_paths, policy))
    assert out == expected
    assert stats.acceptance_rate > 0.2  # the drafts were really verified, not all rejected


class TestGreedyAt8K:  # multi-path trees: at 4K above

  @pytest.mark.parametrize("rule,num_paths", [("block", 1)])
  def test_speculative_equals_ar(self, engine_8k, rule, num_paths):
    engine, expected = engine_8k
    assert engine.lengths.tolist()[0] + MAX_NEW + MAX_PATHS * GAMMA + 1 == 8192
    out, _ = engine.speculative(_spec(rule, num_paths, "snapkv"))
    assert out == expected


class TestGreedyWithPallasKernels:

  @pytest.mark.parametrize("rule,num_paths", [("block", 1), ("gbv", 3)])
  def test_speculative_equals_ar(self, engine_pallas, rule, num_paths):
    engine, expected = engine_pallas
    spec = dataclasses.replace(_spec(rule, num_paths, "snapkv"), prefill_chunk=128)
    out, stats = engine.speculative(spec)
    assert out == expected
    assert stats.acceptance_rate > 0.2


def _coarse_cells(samples: np.ndarray, pooled: np.ndarray, top: int = 3) -> np.ndarray:
  """Each 3-token sample as a cell id: per position its token if among that position's `top`
  most frequent in the pooled samples, else 'other' (a fixed coarsening of the joint law)."""
  cells = np.zeros(len(samples), int)
  for position in range(samples.shape[1]):
    values, counts = np.unique(pooled[:, position], return_counts=True)
    frequent = values[np.argsort(-counts)[:top]]
    index = np.array([np.flatnonzero(frequent == t)[0] if t in frequent else top
                      for t in samples[:, position]])
    cells = cells * (top + 1) + index
  return cells


class TestSampling:
  """N = 300 rows per arm at temperature 1 (one shared prefill): a two-sample chi-square test
  (p > 1e-3, fixed seeds) of the first three tokens' joint law, coarsened to 64 cells. The drafter
  is a 4-layer cut, so most tokens come from rejections and residual draws. The exact-law tests on
  the tiny model (test_speculative.py) are the precise ones; this one checks the whole engine at
  the real model's scale."""

  @pytest.mark.parametrize("rule,num_paths,top_p", [("block", 1, 0.9), ("gbv", 2, 1.0)])
  def test_first_three_tokens_follow_ar_sampling(self, sampling_engine, rule, num_paths, top_p):
    engine = sampling_engine
    sampling = SamplingConfig(temperature=1.0, top_p=top_p)
    ar = np.array(engine.autoregressive(sampling, max_new=3, seed=11))
    spec = speculative.SpeculativeConfig(gamma=SAMPLING_GAMMA, num_paths=num_paths, rule=rule,
                                         sampling=sampling, max_new_tokens=3,
                                         prefill_chunk=SAMPLING_CHUNK)
    out, round_stats = engine.speculative(spec, seed=12)
    spec_tokens = np.array(out)
    assert spec_tokens.shape == ar.shape == (SAMPLING_ROWS, 3)
    assert 0 < round_stats.accepted  # some drafts were accepted (and most rejected)
    pooled = np.concatenate([ar, spec_tokens])
    table = np.stack([np.bincount(_coarse_cells(x, pooled), minlength=64)
                      for x in (ar, spec_tokens)])
    table = table[:, table.sum(0) > 0]
    assert table.shape[1] > 5  # the coarsening keeps real resolution
    assert stats.chi2_contingency(table).pvalue > 1e-3
