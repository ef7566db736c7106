"""The measurement library on the tiny model: speedup rows check greedy equality with AR, the rule
table reports standard errors, and result names never clobber committed tables."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.decoding.speculative import SpeculativeConfig
from budgetdraft import drafters
from budgetdraft.evaluation import (batch_throughput, decode_speed, kernel_speed, repetition,
                                    results, rule_efficiency, speedup, timing)
from budgetdraft.models import prefill
from budgetdraft.models.checkpoint_io import Checkpoint
from budgetdraft.models.config import RopeScaling, get_config
from budgetdraft.models.transformer import init_params
from tests.test_speculative import TINY_SPARSITY, tiny_pair  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tiny_verifier(tiny_pair):
  config, params, _ = tiny_pair
  return Checkpoint(path="tiny", config=config, params=params, tokenizer=None)


def _prompts(count, length):
  return np.random.default_rng(0).integers(3, 200, (count, length)).astype(np.int32)


def test_speedup_rows_report_greedy_equality_with_ar(tiny_verifier):
  spec = SpeculativeConfig(gamma=3, max_new_tokens=8, prefill_chunk=32)
  variants = [speedup.Variant("self", dataclasses.replace(spec, sparsity=TINY_SPARSITY)),
              speedup.Variant("layers:1", dataclasses.replace(spec, rule="gbv", num_paths=2))]
  rows = speedup.speedup(tiny_verifier, {160: _prompts(1, speedup.prompt_length(160, variants))},
                         variants)
  assert [row["= AR"] for row in rows] == ["yes", "yes"]
  assert speedup.greedy_mismatches(rows) == []
  rows[1]["= AR"] = "NO"
  assert speedup.greedy_mismatches(rows) == ["layers:1 full KV@full gbv K=2 at 160"]
  with pytest.raises(ValueError, match="context 12 leaves no prompt"):
    speedup.prompt_length(12, variants)  # 8 new tokens + a 7-token tree leave nothing


def test_speedup_rows_at_two_temperatures_compare_each_with_its_own_ar(tiny_verifier):
  spec = SpeculativeConfig(gamma=3, max_new_tokens=8, prefill_chunk=32)
  sampled = dataclasses.replace(spec, sampling=SamplingConfig(temperature=1.0))
  variants = [speedup.Variant("self", spec), speedup.Variant("self", sampled)]
  rows = speedup.speedup(tiny_verifier, {160: _prompts(1, speedup.prompt_length(160, variants))},
                         variants)
  assert [(row["temperature"], row["= AR"]) for row in rows] == [(0.0, "yes"), (1.0, "sampled")]
  for row in rows:
    assert row["draft ms/round"] > 0 and row["verify ms/round"] > 0
    # T_D/T_T (per draft step) and T_V/T_T share the AR step: their ratio is the phases' ratio.
    assert row["T_V/T_T"] / (row["gamma"] * row["T_D/T_T"]) == pytest.approx(
        row["verify ms/round"] / row["draft ms/round"])
    assert row["tokens/call"] >= 1


def test_a_gamma_grid_reports_errors_costs_repetition_and_a_secondary_best_view(tiny_verifier):
  spec = SpeculativeConfig(gamma=2, max_new_tokens=8, prefill_chunk=32, sparsity=TINY_SPARSITY)
  variants = [speedup.Variant("self", dataclasses.replace(spec, gamma=gamma)) for gamma in (2, 3)]
  variants.append(speedup.Variant("self", dataclasses.replace(spec, sparsity=None)))
  prompts = _prompts(2, speedup.prompt_length(160, variants))
  rows = speedup.speedup(tiny_verifier, {160: prompts}, variants)
  for row in rows:
    assert row["speedup s.e."] >= 0 and row["tokens/call s.e."] >= 0  # two prompts: finite
    assert row["T_D/T_T"] > 0 and row["T_V/T_T"] > 0
    assert row["predicted speedup"] == pytest.approx(
        row["tokens/call"] / (row["gamma"] * row["T_D/T_T"] + row["T_V/T_T"]))
    assert 0 < row["distinct-2"] <= 1 and 0 <= row["copy share"] <= 1
  best = speedup.best_over_gamma(rows)  # only the setting measured at two gammas
  assert len(best) == 1 and best[0]["policy"] == rows[0]["policy"]
  assert best[0]["decode speedup"] == max(r["decode speedup"] for r in rows[:2])


def test_a_state_of_taken_rows_decodes_as_those_rows_do(tiny_verifier):
  """take_rows builds the batch table's states: decoding rows [1, 0, 1] of a prefilled pair gives
  each taken row's own tokens (AR and speculative, caches and per-row arrays moved together)."""
  config, params = tiny_verifier.config, tiny_verifier.params
  spec = SpeculativeConfig(gamma=3, max_new_tokens=6, prefill_chunk=32, sparsity=TINY_SPARSITY)
  prompt, lengths = jnp.asarray(_prompts(2, 100)), jnp.array([100, 90], jnp.int32)
  static = dict(config=config, sampling=spec.sampling, eos_id=None, pad_id=0)
  state = autoregressive.start(params, prompt, lengths, jax.random.key(0), max_new_tokens=6,
                               prefill_chunk=32, **static)
  tokens = lambda s: np.asarray(autoregressive.decode(params, s, **static).tokens)
  assert (tokens(batch_throughput.take_rows(state, [1, 0, 1])) == tokens(state)[[1, 0, 1]]).all()
  spec_static = dict(verifier_config=config, drafter_config=config, spec=spec)
  state = speculative.start(params, params, prompt, lengths, jax.random.key(0), **spec_static)
  outputs = lambda s: speculative.outputs_and_stats(
      speculative.decode(params, params, s, **spec_static), spec)[0]
  assert outputs(batch_throughput.take_rows(state, [1, 0, 1])) == [outputs(state)[i]
                                                                    for i in (1, 0, 1)]


def test_the_batch_table_measures_every_system_at_every_batch_size(tiny_verifier):
  spec = SpeculativeConfig(gamma=3, max_new_tokens=8, prefill_chunk=32)
  variants = [speedup.Variant("self", dataclasses.replace(spec, sparsity=TINY_SPARSITY)),
              speedup.Variant("layers:1", spec)]
  loaded = {v.drafter: drafters.load(v.drafter, tiny_verifier.config, tiny_verifier.params)
            for v in variants}
  rows = batch_throughput.batch_throughput(tiny_verifier, loaded, variants, _prompts(2, 120),
                                           [1, 3], repeats=2)
  assert [(row["system"], row["batch"]) for row in rows] == [
      ("AR", 1), ("AR", 3), ("self (snapkv 24, gamma 3)", 1), ("self (snapkv 24, gamma 3)", 3),
      ("layers:1 (full KV, gamma 3)", 1), ("layers:1 (full KV, gamma 3)", 3)]
  assert [row["= AR"] for row in rows[2:]] == ["yes"] * 4
  for row in rows:
    assert row["tok/s min"] <= row["decode tok/s"] <= row["tok/s max"]
    assert row["tokens/call"] >= 1
  assert rows[1]["KV share of step bytes"] > rows[0]["KV share of step bytes"]
  sampled = dataclasses.replace(spec, sampling=SamplingConfig(temperature=1.0))
  with pytest.raises(ValueError, match="same sampling"):
    batch_throughput.batch_throughput(tiny_verifier, loaded, variants[:1] + [
        speedup.Variant("self", sampled)], _prompts(2, 120), [1])


def test_repetition_measures_on_hand_made_text():
  assert repetition.distinct_ratio([1, 2, 3, 4], 2) == 1.0
  assert repetition.distinct_ratio([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)
  assert np.isnan(repetition.distinct_ratio([1], 2))
  assert repetition.copy_share([1, 2, 3], [4], n=4) == 0.0
  # 4-grams: [5 1 2 3] is new, [1 2 3 4] was in the context, [2 3 4 1] new, [3 4 1 2] new.
  assert repetition.copy_share([1, 2, 3, 4, 5, 1, 2], [3, 4, 1, 2], n=4) == pytest.approx(1 / 4)
  # The continuation copies itself: the first token has no 2-gram, (7 8) and (8 7) are new, the
  # three after them repeat.
  assert repetition.copy_share([], [7, 8, 7, 8, 7, 8], n=2) == pytest.approx(3 / 6)


def test_a_16k_context_runs_end_to_end_on_a_long_context_model():
  """A tiny random model with Llama-3 rope scaling and 32K positions: speculative decoding at a
  16K context (self-drafting over SnapKV) equals AR."""
  config = get_config("tiny", num_layers=2, max_context=32768, attention_block=512,
                      rope_scaling=RopeScaling(8.0, 1.0, 4.0, 4096))
  verifier = Checkpoint(path="tiny-16k", config=config,
                        params=init_params(config, jax.random.key(3)), tokenizer=None)
  spec = SpeculativeConfig(gamma=3, max_new_tokens=8, prefill_chunk=512)
  variants = [speedup.Variant("self", dataclasses.replace(spec, sparsity=TINY_SPARSITY))]
  length = speedup.prompt_length(16384, variants)
  rows = speedup.speedup(verifier, {16384: _prompts(1, length)}, variants)
  assert length > 16000 and [row["= AR"] for row in rows] == ["yes"]


def test_the_kernel_bench_on_cpu_certifies_errors_and_reports_no_bandwidth():
  (row,) = kernel_speed.kernel_speed(["smollm2"], [256], [128], queries=4, block=64,
                                     bandwidth=1e10)
  assert row["kernels"] == "triton (interpret)" and row["max abs err"] < 1e-4
  assert row["compact BW share"] == row["gather BW share"] == "n/a (interpret)"


def test_the_verify_loop_repeats_one_verify_step(tiny_verifier):
  """bench_decode's verify timing runs the very verify step of the speculative loop, rolled back
  each time, so its total is steps x that step's checksum."""
  config, params = tiny_verifier.config, tiny_verifier.params
  prompt = jnp.asarray(_prompts(1, 40))
  state = autoregressive.start(params, prompt, jnp.array([40]), jax.random.key(0), config=config,
                               max_new_tokens=8, prefill_chunk=32, sampling=SamplingConfig(),
                               eos_id=None, pad_id=0)
  spec = SpeculativeConfig(gamma=3, max_new_tokens=1)
  drafts = jnp.broadcast_to(state.last_token[:, None, None], (1, 1, 3))
  p, _, _ = speculative.verify_step(params, jax.tree.map(jnp.copy, state.cache), state.last_token,
                                    drafts, verifier_config=config, spec=spec)
  total = decode_speed.verify_loop(params, state.cache, state.last_token, drafts, config=config,
                                   spec=spec, steps=5)
  np.testing.assert_allclose(total, 5 * p[:, 0, :, 0].sum(), rtol=1e-5)


def test_the_forward_loop_repeats_one_teacher_forced_forward(tiny_verifier):
  """bench_decode's forward timing runs the model's own forward: steps x the checksum of
  `continuation_logits` from the same cache."""
  config, params = tiny_verifier.config, tiny_verifier.params
  cache = prefill.prefill_cache(params, jnp.asarray(_prompts(1, 40)), config=config,
                                capacity=64, prefill_chunk=32)
  tokens = jnp.asarray(_prompts(1, 5))
  logits = prefill.continuation_logits(params, cache, tokens, config=config)
  looped = decode_speed.forward_loop(params, cache, tokens, config=config, steps=3)
  np.testing.assert_allclose(looped, 3 * logits.max(-1).sum(), rtol=1e-5)


def test_a_forward_floor_is_its_bytes_over_bandwidth_or_its_flops_over_peak(tiny_verifier):
  config, params = tiny_verifier.config, tiny_verifier.params
  cache = prefill.prefill_cache(params, jnp.asarray(_prompts(1, 40)), config=config,
                                capacity=64, prefill_chunk=32)
  cost = lambda bandwidth, peak: decode_speed.forward_cost(
      tiny_verifier, cache, jnp.asarray([7]), 40, 5, bandwidth=bandwidth, peak=peak, steps=2,
      repeats=1)
  slow_memory, slow_compute = cost(1e6, 1e18), cost(1e18, 1e6)
  kv = 2 * config.num_layers * config.num_kv_heads * 40 * config.head_dim * 4
  assert slow_memory["MB read"] == pytest.approx((timing.tree_bytes(params) + kv) / 1e6)
  flops = (2 * 5 * config.decoder_params()  # weights
           + 4 * 5 * 40 * config.num_heads * config.head_dim * config.num_layers  # attention
           + 2 * 5 * config.vocab_size * config.dim)  # head
  assert sum(slow_compute[f"GFLOP {part}"] for part in ("weights", "attention", "head")) == (
      pytest.approx(flops / 1e9))
  for row, floor_ms in ((slow_memory, slow_memory["bytes floor ms"]),
                        (slow_compute, slow_compute["FLOPs floor ms"])):
    assert row["x floor"] == pytest.approx(row["forward ms"] / floor_ms)
  assert slow_compute["FLOPs floor ms"] == pytest.approx(1e3 * flops / 1e6)


def test_rule_efficiency_rows_carry_standard_errors(tiny_verifier):
  spec = SpeculativeConfig(gamma=3, sampling=SamplingConfig(temperature=1.0), max_new_tokens=12,
                           prefill_chunk=32, sparsity=TINY_SPARSITY)
  rows = rule_efficiency.rule_efficiency(tiny_verifier, (tiny_verifier.config,
                                                         tiny_verifier.params),
                                         _prompts(2, 100), [("block", 1), ("gbv", 2)], spec)
  assert [(row["rule"], row["K"]) for row in rows] == [("block", 1), ("gbv", 2)]
  for row in rows:
    assert row["rounds"] >= 2 and 1 <= row["tokens/call"] <= 4
    assert 0 <= row["tokens/call SE"] < 2 and row["ms/token"] > 0


def test_output_paths_change_only_with_measured_overrides():
  assert results.output_path("results", "speedup_default", {}) == "results/speedup_default"
  assert results.output_path("results", "speedup_default", {"data_dir": "/d"}) == (
      "results/speedup_default")
  ad_hoc = results.output_path("results", "speedup_default", {"gamma": 3})
  assert ad_hoc.startswith("results/speedup_default-") and len(ad_hoc) == len(
      "results/speedup_default-") + 8
  assert ad_hoc == results.output_path("out", "speedup_default", {"gamma": 3}).replace(
      "out/", "results/")
  assert ad_hoc != results.output_path("results", "speedup_default", {"gamma": 2})
