"""The C++ CPU kernels against their pure-jnp references on fresh random inputs, and the packed
decoding layout that uses them."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft import cpu_kernels
from budgetdraft.models import attention
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import init_params, unroll


def test_kernels_build_and_register_here():
  """This machine has a C++ compiler, so the kernels must build (a silent fallback to XLA's ops
  would leave every other test here passing on the wrong path)."""
  assert cpu_kernels.available(), "the CPU kernels did not build: see the logged warning"
  assert cpu_kernels.library_path().exists()
  assert attention.uses_cpu_kernels("auto")
  assert not attention.uses_cpu_kernels("jnp") and not attention.uses_cpu_kernels("pallas")


@pytest.mark.parametrize("rows", [1, 3, 6, 7, 16, 97, 200])
@pytest.mark.parametrize("depth,features", [(64, 64), (576, 960), (100, 130)])
def test_panel_matmul_matches_reference(rows, depth, features):
  key = jax.random.key(rows * 1000 + depth + features)
  x = jax.random.normal(jax.random.fold_in(key, 0), (rows, depth))
  w = jax.random.normal(jax.random.fold_in(key, 1), (depth, features))
  panels = cpu_kernels.pack_panels(w)
  assert panels.shape == (-(-features // 64), depth, 64)
  expected = cpu_kernels.panel_matmul_reference(x, panels, features)
  np.testing.assert_allclose(expected, x @ w, rtol=1e-5, atol=1e-4)
  got = jax.jit(cpu_kernels.panel_matmul, static_argnums=2)(x, panels, features)
  assert got.shape == (rows, features)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_panel_matmul_keeps_leading_axes():
  x = jax.random.normal(jax.random.key(0), (2, 3, 70))
  w = jax.random.normal(jax.random.key(1), (70, 90))
  got = cpu_kernels.panel_matmul(x, cpu_kernels.pack_panels(w), 90)
  np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-4)


def _attention_inputs(seed, batch, num_new, num_heads, num_kv_heads, head_dim, capacity, filled):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, num_new, num_heads, head_dim))
  k = jax.random.normal(keys[1], (batch, num_kv_heads, capacity, head_dim))
  v = jax.random.normal(keys[2], (batch, num_kv_heads, capacity, head_dim))
  # A random draft tree: every token sees itself, and a random subset of the earlier ones.
  tree = jax.random.bernoulli(keys[3], 0.6, (batch, num_new, num_new))
  mask = jnp.tril(tree) | jnp.eye(num_new, dtype=bool)
  return q, k, v, jnp.asarray(filled, jnp.int32), mask


@pytest.mark.parametrize("num_new", [1, 5, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (8, 1, 64)])
def test_decode_attention_matches_reference(num_new, num_heads, num_kv_heads, head_dim):
  """Ragged rows: one barely started, one with most of the cache filled (several key ranges, the
  chunk across a range boundary), over a capacity that is no multiple of the key range."""
  capacity = 1072
  filled = [3, capacity - num_new - 40]
  inputs = _attention_inputs(num_new + num_heads + head_dim, 2, num_new, num_heads, num_kv_heads,
                             head_dim, capacity, filled)
  expected = cpu_kernels.decode_attention_reference(*inputs)
  got = jax.jit(cpu_kernels.decode_attention)(*inputs)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("filled", [0, 512 - 2, 1072 - 5])
def test_decode_attention_at_range_and_cache_edges(filled):
  """The chunk at the cache's start, straddling the first key range's end, and ending at the
  capacity (causal chunk of 5)."""
  q, k, v, _, _ = _attention_inputs(filled, 1, 5, 6, 2, 64, 1072, [filled])
  mask = jnp.tril(jnp.ones((1, 5, 5), bool))
  filled = jnp.array([filled], jnp.int32)
  np.testing.assert_allclose(cpu_kernels.decode_attention(q, k, v, filled, mask),
                             cpu_kernels.decode_attention_reference(q, k, v, filled, mask),
                             rtol=2e-5, atol=2e-5)


def test_decode_attention_gives_zeros_to_a_query_that_sees_nothing():
  q, k, v, _, mask = _attention_inputs(0, 2, 3, 4, 2, 64, 64, [0, 10])
  mask = mask.at[0].set(False)  # row 0: an empty cache and a chunk that hides itself
  filled = jnp.array([0, 10], jnp.int32)
  got = cpu_kernels.decode_attention(q, k, v, filled, mask)
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_allclose(got, cpu_kernels.decode_attention_reference(q, k, v, filled, mask),
                             rtol=2e-5, atol=2e-5)


def test_decode_attention_refuses_unsupported_shapes():
  assert cpu_kernels.supports_attention(64, 1072, 16)
  assert not cpu_kernels.supports_attention(16, 1072, 1)   # head_dim not a multiple of 64
  assert not cpu_kernels.supports_attention(64, 1000, 1)   # capacity not a multiple of 16
  assert not cpu_kernels.supports_attention(64, 1072, 17)  # more new tokens than a decode step
  q, k, v, filled, mask = _attention_inputs(0, 1, 2, 2, 1, 32, 64, [4])
  with pytest.raises(Exception, match="head_dim must be a multiple of 64"):
    jax.block_until_ready(cpu_kernels.decode_attention(q, k, v, filled, mask))


def test_unroll_packs_weights_only_for_the_kernels():
  """`unroll` packs (fused q/k/v and gate/up, panels, a packed head) where the kernels run, and
  keeps XLA's layout for attention_impl "jnp" and for non-float32 weights."""
  config = get_config("tiny-untied")
  params = init_params(config, jax.random.key(0))
  packed_config, packed = unroll(config, params)
  assert packed_config.packed_weights and packed_config.unroll_layers
  layer = packed["layers"]["0"]
  assert set(layer) == {"attn_norm", "mlp_norm", "qkv_proj", "o_proj", "gate_up_proj",
                        "down_proj"}
  qkv_features = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
  assert layer["qkv_proj"]["panels"].shape == (-(-qkv_features // 64), config.dim, 64)
  assert layer["qkv_proj"]["bias"].shape == (qkv_features,)  # attention_bias: fused too
  assert packed["head"]["panels"].shape == (config.vocab_size // 64, config.dim, 64)
  assert "lm_head" not in packed
  for other in (get_config("tiny-untied", attention_impl="jnp"),
                get_config("tiny-untied", param_dtype="bfloat16", compute_dtype="bfloat16")):
    other_config, other_params = unroll(other, init_params(other, jax.random.key(0)))
    assert other_config.unroll_layers and not other_config.packed_weights
    assert "q_proj" in other_params["layers"]["0"]


def _python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=300)


def test_kernels_can_be_turned_off_and_a_failed_build_falls_back(tmp_path):
  code = ("from budgetdraft import cpu_kernels; from budgetdraft.models import attention; "
          "print(cpu_kernels.available(), attention.uses_cpu_kernels('auto'))")
  off = _python(code, BUDGETDRAFT_CPU_KERNELS="0")
  assert off.returncode == 0 and off.stdout.split() == ["False", "False"], off.stderr
  broken = _python(code, CXX=str(tmp_path / "no-such-compiler"),
                   BUDGETDRAFT_KERNEL_CACHE=str(tmp_path))
  assert broken.returncode == 0 and broken.stdout.split() == ["False", "False"], broken.stderr
  assert "CPU kernels unavailable" in broken.stderr and "no-such-compiler" in broken.stderr
