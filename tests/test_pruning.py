"""Bonsai pruning: unit bookkeeping, the smaller model it leaves, its checkpoint, the estimator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft import drafters
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.evaluation import pruning as pruning_eval
from budgetdraft.models import checkpoint_io
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import init_params
from budgetdraft.pruning import bonsai, units
from budgetdraft.pruning import checkpoint as pruned_checkpoint
from tests.test_speculative import TINY_SPARSITY
from tests.test_transformer import full_logits

CHANNEL_GROUP = 16


def _model(name: str, **overrides):
  config = get_config(name, **overrides)
  return config, init_params(config, jax.random.key(0))


def _tokens(config, batch=2, length=33, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)


def _random_keep(layout, seed, drop=0.4):
  """A keep vector dropping ~drop of the heads and channels, with layer 0's heads all gone."""
  rng = np.random.default_rng(seed)
  keep = rng.random(layout.size) > drop
  heads, _, layers = layout.split(keep)  # views into keep
  heads[0] = False
  layers[:] = True
  return keep


@pytest.mark.parametrize("name", ["tiny", "tiny-untied"])
def test_nothing_pruned_gives_the_verifier(name):
  config, params = _model(name)
  layout = units.Layout(config, CHANNEL_GROUP)
  pruned_config, pruned_params = units.prune(layout, params, np.ones(layout.size, bool))
  assert pruned_config.per_layer_widths and pruned_config.num_layers == config.num_layers
  assert pruned_config.decoder_params() == config.decoder_params() == layout.total_params()
  tokens = _tokens(config)
  np.testing.assert_allclose(full_logits(pruned_config, pruned_params, tokens),
                             full_logits(config, params, tokens), atol=2e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-untied"])
def test_the_pruned_model_computes_the_masked_sub_model(name):
  """Slicing (smaller shapes) and masking (zeroed rows) are the same sub-model, a layer with no
  head and a dropped layer included."""
  config, params = _model(name, num_layers=3)
  layout = units.Layout(config, CHANNEL_GROUP)
  keep = _random_keep(layout, seed=0)
  keep[layout.slices()["layers"].start + 2] = False  # drop the last layer
  pruned_config, pruned_params = units.prune(layout, params, keep)
  assert pruned_config.num_layers == 2 and pruned_config.layer_kv_heads[0] == 0
  assert pruned_config.decoder_params() == layout.kept_params(keep)
  tokens = _tokens(config)
  masked = units.masked_params(layout, params, keep.astype(np.float32))
  np.testing.assert_allclose(full_logits(pruned_config, pruned_params, tokens),
                             full_logits(config, masked, tokens), atol=2e-5)


def test_gqa_groups_stay_whole():
  """A kept KV head keeps its own query heads, k/v columns and o_proj rows, in order."""
  config, params = _model("tiny")  # 4 query heads over 2 KV heads: groups {0, 1} and {2, 3}
  layout = units.Layout(config, CHANNEL_GROUP)
  keep = np.ones(layout.size, bool)
  keep[0] = False  # layer 0 loses KV head 0 and query heads 0, 1
  pruned_config, pruned_params = units.prune(layout, params, keep)
  d, layer = config.head_dim, pruned_params["layers"]["0"]
  assert pruned_config.layer_kv_heads == (1, 2)
  full = jax.tree.map(lambda x: np.asarray(x[0]), params["layers"])
  np.testing.assert_array_equal(layer["q_proj"]["kernel"], full["q_proj"]["kernel"][:, 2 * d:])
  np.testing.assert_array_equal(layer["k_proj"]["kernel"], full["k_proj"]["kernel"][:, d:])
  np.testing.assert_array_equal(layer["v_proj"]["kernel"], full["v_proj"]["kernel"][:, d:])
  np.testing.assert_array_equal(layer["o_proj"]["kernel"], full["o_proj"]["kernel"][2 * d:])


def test_a_pruned_drafter_decodes_losslessly_over_a_sparse_cache():
  """The speculative loop and the SnapKV cache take the pruned (unrolled) drafter unchanged."""
  config, params = _model("tiny", num_layers=3, attention_block=32)
  params = {**params, "embed": {"embedding": params["embed"]["embedding"] * 20}}
  layout = units.Layout(config, CHANNEL_GROUP)
  drafter_config, drafter_params = units.prune(layout, params, _random_keep(layout, seed=1,
                                                                            drop=0.2))
  prompts = [list(range(3, 90)), list(range(40, 75))]
  expected = autoregressive.generate(params, prompts, jax.random.key(0), config=config,
                                     max_new_tokens=24, prefill_chunk=32)
  spec = speculative.SpeculativeConfig(gamma=3, max_new_tokens=24, prefill_chunk=32,
                                       sparsity=TINY_SPARSITY)
  out, stats = speculative.generate(params, drafter_params, prompts, jax.random.key(1),
                                    verifier_config=config, drafter_config=drafter_config,
                                    spec=spec)
  assert out == expected
  assert stats.acceptance_rate > 0


def test_a_pruned_checkpoint_round_trips_and_checks_its_verifier(tmp_path):
  config, params = _model("tiny")
  layout = units.Layout(config, CHANNEL_GROUP)
  keep = _random_keep(layout, seed=2)
  pruned_config, pruned_params = units.prune(layout, params, keep)
  directory = str(tmp_path / "bonsai-50")
  identity = {"name": "tiny", "fingerprint": checkpoint_io.fingerprint(config, params)}
  pruned_checkpoint.save(directory, pruned_config, pruned_params, keep=keep, verifier=identity,
                         method="bonsai")
  loaded_config, loaded_params = drafters.load(f"pruned:{directory}", config, params)
  assert loaded_config == pruned_config
  chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), pruned_params, loaded_params)
  assert all(jax.tree.leaves(chex_equal))
  assert pruned_checkpoint.read_metadata(directory)["keep"] == keep.astype(int).tolist()
  with pytest.raises(FileExistsError):
    pruned_checkpoint.save(directory, pruned_config, pruned_params, keep=keep, verifier=identity)
  other = jax.tree.map(lambda x: x + 1, params)
  with pytest.raises(ValueError, match="was pruned from verifier"):
    drafters.load(f"pruned:{directory}", config, other)
  with pytest.raises(FileNotFoundError, match="no pruned model"):
    drafters.check(f"pruned:{tmp_path}")


def test_per_layer_widths_are_validated():
  with pytest.raises(ValueError, match="layer_kv_heads"):
    get_config("tiny", layer_kv_heads=(1,))
  with pytest.raises(ValueError, match="layer_mlp_dims"):
    get_config("tiny", layer_mlp_dims=(64, 256))
  with pytest.raises(ValueError, match="channel_group"):
    units.Layout(get_config("tiny"), 48)


def _planted(num_pairs: int, seed: int = 0):
  """(masks, losses, contributions): -loss linear in the keep masks plus noise, with 3 useless
  units among 40; masks in complement pairs, as Bonsai samples them."""
  rng = np.random.default_rng(seed)
  contributions = rng.uniform(0.1, 1.0, 40)
  contributions[[3, 17, 29]] = 0.0
  masks = np.repeat((rng.random((num_pairs, 40)) > 0.5).astype(np.float64), 2, axis=0)
  masks[1::2] = 1 - masks[::2]
  losses = 5.0 - masks @ contributions + 0.05 * rng.standard_normal(len(masks))
  return masks, losses, contributions


def test_the_regression_finds_the_planted_least_useful_units():
  masks, losses, contributions = _planted(num_pairs=64)
  fitted = bonsai.fit_contributions(masks, losses, ridge=0.01)
  assert set(np.argsort(fitted)[:3]) == {3, 17, 29}
  assert np.corrcoef(fitted, contributions)[0, 1] > 0.95


def test_with_few_sub_models_the_data_corrects_a_wrong_prior():
  """16 pairs for 40 units cannot identify them alone; starting from a prior that swaps a useless
  and a useful unit, the fit moves both toward the truth and ranks better than the prior."""
  masks, losses, contributions = _planted(num_pairs=16)
  prior = contributions + 0.05
  prior[[3, 5]] = prior[[5, 3]]
  fitted = bonsai.fit_contributions(masks, losses, ridge=1.0, prior=prior)
  assert fitted[3] < prior[3] - 0.2 and fitted[5] > prior[5] + 0.2
  correlation = lambda x: np.corrcoef(x, contributions)[0, 1]
  assert correlation(fitted) > correlation(prior) + 0.05


def test_the_schedule_lands_on_every_target():
  steps = bonsai.schedule((0.5, 0.3, 0.15), 0.2)
  assert [target for _, target in steps if target] == [0.5, 0.3, 0.15]
  goals = [1.0] + [goal for goal, _ in steps]
  assert all(0 < a - b <= 0.2 + 1e-9 for a, b in zip(goals, goals[1:]))
  with pytest.raises(ValueError, match="decreasing"):
    bonsai.BonsaiConfig(targets=(0.3, 0.5))


def test_bonsai_and_the_baseline_reach_their_sizes_with_forward_passes_only():
  config, params = _model("tiny", num_layers=4, mlp_dim=256)
  layout = units.Layout(config, CHANNEL_GROUP)
  calibration = _tokens(config, length=65)
  saved = {}
  reached = bonsai.bonsai(layout, params, calibration,
                          bonsai.BonsaiConfig(targets=(0.6, 0.4), max_step=0.2, masks_per_step=8),
                          on_target=lambda target, keep: saved.setdefault(target, keep.copy()))
  assert sorted(reached) == sorted(saved) == [0.4, 0.6]
  for target, keep in reached.items():
    np.testing.assert_array_equal(keep, saved[target])
    assert abs(layout.kept_fraction(keep) - target) < 0.03
  assert not np.any(reached[0.4] & ~reached[0.6])  # iterative: the smaller model nests
  one_shot = bonsai.magnitude_one_shot(layout, params, calibration, 0.4)
  assert abs(layout.kept_fraction(one_shot) - 0.4) < 0.03
  assert one_shot[layout.slices()["layers"]].all()


def test_the_prior_is_zero_for_absent_units():
  config, params = _model("tiny")
  layout = units.Layout(config, CHANNEL_GROUP)
  keep = _random_keep(layout, seed=3)
  prior = bonsai.activation_prior(layout, params, _tokens(config), keep)
  units_ = layout.kinds() != units.KINDS.index("layers")
  assert np.all(prior[~layout.present(keep)] == 0) and np.all(prior[~units_] == 0)
  assert np.all(prior[layout.present(keep) & units_] > 0)
  heads, channels, _ = layout.split(prior)  # relative to their layer: present ones average 1
  present_heads, present_channels, _ = layout.split(layout.present(keep))
  for values, alive in ((heads, present_heads), (channels, present_channels)):
    for layer in range(config.num_layers):
      if alive[layer].any():
        np.testing.assert_allclose(values[layer][alive[layer]].mean(), 1.0, rtol=1e-5)


def test_the_pruning_table_measures_each_drafter_beside_the_verifier():
  """One row per drafter after the verifier's: its share of the decoder, its perplexity, its
  tokens per verifier call at each budget and its step cost against the verifier's."""
  config, params = _model("tiny")
  layout = units.Layout(config, CHANNEL_GROUP)
  verifier = checkpoint_io.Checkpoint(path="tiny", config=config, params=params, tokenizer=None)
  drafters_ = {"cut": checkpoint_io.take_layers(config, params, 1),
               "pruned": units.prune(layout, params, _random_keep(layout, 0))}
  rng = np.random.default_rng(0)
  rows = pruning_eval.pruning_table(
      verifier, drafters_, {120: rng.integers(3, 200, (1, 108))}, rng.integers(3, 200, (1, 65)),
      [24, None], TINY_SPARSITY, gamma=3, max_new_tokens=8, prefill_chunk=32,
      perplexity_chunk=64)
  assert [row["drafter"] for row in rows] == ["verifier (reference)", "cut", "pruned"]
  assert rows[1]["kept"] == pytest.approx(0.5)  # one of two identical layers
  assert rows[2]["kept"] == pytest.approx(layout.kept_fraction(_random_keep(layout, 0)))
  for row in rows[1:]:
    assert 1 <= row["tokens/call 24"] <= 4 and 1 <= row["tokens/call full"] <= 4
    assert 0 <= row["sum min(p,q) full"] <= 1 and row["perplexity"] > 1
    assert row["step / verifier step"] == pytest.approx(row["step ms"] / rows[0]["step ms"])
