"""Pallas kernels against their pure-jnp references, fresh random inputs: both layouts of each
kernel, the triton one in the generic interpreter and the mosaic (TPU) one in the TPU interpreter,
which simulates TPU memory spaces and the DMAs that the index maps issue."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (block_sparse_attention, block_sparse_attention_reference,
                            sparse_decode_attention, sparse_decode_attention_reference)
from pallas_kernels import backend

TRITON, MOSAIC = dict(variant="triton", interpret=True), dict(variant="mosaic", interpret=True)
VARIANTS, VARIANT_IDS = [TRITON, MOSAIC], ["triton", "mosaic"]
# Both layouts in float32; bfloat16 on the triton one (both cast to float32 the same way inside).
DTYPE_KERNELS = pytest.mark.parametrize(
    "dtype, kernel", [(jnp.float32, TRITON), (jnp.bfloat16, TRITON), (jnp.float32, MOSAIC)],
    ids=["triton-f32", "triton-bf16", "mosaic-f32"])

# Max abs error bound per dtype (outputs are O(1): averages of N(0, 1) values).
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _decode_inputs(seed, batch, num_new, num_heads, num_kv_heads, head_dim, capacity, fill, dtype):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, num_new, num_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, num_kv_heads, capacity, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, num_kv_heads, capacity, head_dim), dtype)
  rng = np.random.default_rng(seed)
  context = 4 * capacity
  positions = np.full((batch, num_kv_heads, capacity), -1, np.int32)
  for b in range(batch):
    for h in range(num_kv_heads):
      filled = int(fill * capacity)
      positions[b, h, :filled] = rng.permutation(context)[:filled]  # kept keys, any order
  query_positions = context - num_new + np.arange(num_new)[None].repeat(batch, 0)
  query_positions[:, 0] -= rng.integers(0, context // 2, size=batch)  # some queries see fewer keys
  return q, k, v, jnp.asarray(positions), jnp.asarray(query_positions, jnp.int32)


@pytest.mark.parametrize("batch,num_new,num_heads,num_kv_heads,head_dim,capacity,fill,block", [
    (1, 1, 4, 4, 32, 128, 1.0, 64),     # AR step, MHA, full cache
    (2, 5, 9, 3, 64, 200, 0.6, 64),     # gamma + 1 queries, SmolLM2 heads, partial + padded cache
    (3, 3, 8, 2, 16, 96, 0.3, 32),      # GQA 4:1, mostly empty
    (1, 4, 2, 1, 128, 512, 0.9, 128),   # large head_dim, MQA
])
@DTYPE_KERNELS
def test_sparse_decode_attention_matches_reference(batch, num_new, num_heads, num_kv_heads,
                                                   head_dim, capacity, fill, block, dtype, kernel):
  args = _decode_inputs(capacity + num_new, batch, num_new, num_heads, num_kv_heads, head_dim,
                        capacity, fill, dtype)
  expected = sparse_decode_attention_reference(*args)
  actual = sparse_decode_attention(*args, block=block, **kernel)
  assert actual.shape == expected.shape and actual.dtype == dtype
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             atol=TOLERANCE[dtype])


def _block_sparse_inputs(seed, batch, num_q, num_keys, num_heads, num_kv_heads, head_dim, block_q,
                         block_k, max_blocks, keep_prob, query_offset, ring, dtype):
  """(q, k, v, query_positions, keep, table, counts), ring_from (None when ring = 0: else each
  query also sees its last `ring` keys at or after a per-row ring base)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, num_q, num_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, num_kv_heads, num_keys, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, num_kv_heads, num_keys, head_dim), dtype)
  rng = np.random.default_rng(seed)
  num_q_blocks, num_kv_blocks = num_q // block_q, num_keys // block_k
  table = np.zeros((batch, num_kv_heads, num_q_blocks, max_blocks), np.int32)
  counts = rng.integers(1, max_blocks + 1, size=(batch, num_kv_heads, num_q_blocks)).astype(
      np.int32)
  for index in np.ndindex(*counts.shape):
    table[index][:counts[index]] = np.sort(rng.choice(num_kv_blocks, counts[index], replace=False))
  keep = (rng.random((batch, num_kv_heads, num_keys)) < keep_prob).astype(np.int32)
  query_positions = query_offset + np.arange(num_q)[None].repeat(batch, 0)
  ring_from = None
  if ring:
    ring_base = rng.integers(0, query_offset + 1, size=(batch, 1))
    ring_from = jnp.asarray(np.maximum(ring_base, query_positions - ring + 1), jnp.int32)
  return (q, k, v, jnp.asarray(query_positions, jnp.int32), jnp.asarray(keep), jnp.asarray(table),
          jnp.asarray(counts)), ring_from


BLOCK_SPARSE_CASES = [
    # batch, Tq, S, H, Hkv, D, block_q, block_k, max_blocks, keep_prob, query_offset, ring
    (1, 64, 64, 4, 4, 32, 16, 16, 4, 1.0, 0, 0),       # training self-attention, dense table
    (2, 128, 256, 9, 3, 64, 32, 32, 5, 0.7, 128, 24),  # SmolLM2 heads, a training view + ring
    (1, 8, 512, 8, 2, 16, 8, 64, 6, 0.5, 504, 0),      # decode-like: 8 queries, kept blocks
    (2, 32, 96, 2, 1, 128, 16, 32, 2, 0.3, 40, 40),    # MQA, head_dim 128, mostly ring
]


@pytest.mark.parametrize("case", BLOCK_SPARSE_CASES)
@DTYPE_KERNELS
def test_block_sparse_attention_matches_reference(case, dtype, kernel):
  *shape, block_q, block_k, max_blocks, keep_prob, offset, ring = case
  args, ring_from = _block_sparse_inputs(sum(shape), *shape, block_q, block_k, max_blocks,
                                         keep_prob, offset, ring, dtype)
  static = dict(block_q=block_q, block_k=block_k, ring_from=ring_from)
  expected = block_sparse_attention_reference(*args, **static)
  actual = block_sparse_attention(*args, **static, **kernel)
  if ring_from is not None:  # the ring really adds keys here
    without_ring = block_sparse_attention_reference(*args, block_q=block_q, block_k=block_k)
    assert float(jnp.abs(without_ring.astype(jnp.float32) - expected.astype(jnp.float32)).max()) > 0.1
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             atol=TOLERANCE[dtype])


@pytest.mark.parametrize("case", BLOCK_SPARSE_CASES[:2] + BLOCK_SPARSE_CASES[3:])
@pytest.mark.parametrize("kernel", VARIANTS, ids=VARIANT_IDS)
def test_block_sparse_attention_gradients_match_reference(case, kernel):
  *shape, block_q, block_k, max_blocks, keep_prob, offset, ring = case
  (q, k, v, *rest), ring_from = _block_sparse_inputs(7 + sum(shape), *shape, block_q, block_k,
                                                     max_blocks, keep_prob, offset, ring,
                                                     jnp.float32)
  weights = jax.random.normal(jax.random.key(9), q.shape)
  static = dict(block_q=block_q, block_k=block_k, ring_from=ring_from)

  def loss(attention_fn, **options):
    return lambda q, k, v: jnp.sum(attention_fn(q, k, v, *rest, **static, **options) * weights)

  expected = jax.grad(loss(block_sparse_attention_reference), argnums=(0, 1, 2))(q, k, v)
  actual = jax.grad(loss(block_sparse_attention, **kernel), argnums=(0, 1, 2))(q, k, v)
  for name, a, e in zip("qkv", actual, expected):
    np.testing.assert_allclose(a, e, atol=1e-4, err_msg=f"d{name}")


def test_compiled_kernels_need_their_backend_and_unknown_variants_are_refused():
  """On this CPU only the interpreters exist; asking for a compiled kernel fails before tracing."""
  if jax.default_backend() == "cpu":
    for variant in backend.VARIANTS:
      with pytest.raises(ValueError, match=f"the {variant} kernels compile only on"):
        backend.choose(variant, False)
    assert backend.choose(None, None) == ("triton", True)
  with pytest.raises(ValueError, match="kernel variant 'cuda'"):
    backend.choose("cuda", True)


def test_model_on_kernels_matches_jnp_path():
  """Tiny model: prefill + decode on the full cache, then decoding over a sparse cache."""
  import dataclasses
  from budgetdraft.models.prefill import prefill
  from budgetdraft.models.kv_cache import FullKVCache
  from budgetdraft.models.config import get_config
  from budgetdraft.models.transformer import Transformer, init_params
  from budgetdraft.sparsity import selection

  jnp_config = get_config("tiny", attention_block=32)
  params = init_params(jnp_config, jax.random.key(0))
  prompt = jax.random.randint(jax.random.key(1), (2, 70), 0, jnp_config.vocab_size)
  lengths = jnp.array([70, 45])
  sparsity = selection.SparsityConfig(policy="streaming", budget=24, sinks=2, window=8, recent=8)

  def run(config):
    model = Transformer(config)
    logits, cache = jax.jit(lambda p, t, l, c: prefill(model, p, t, l, c, 32))(
        params, prompt, lengths, FullKVCache.init(config, 2, 128))
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c.length[:, None], c))
    hidden, _ = step(params, jnp.array([[7], [9]]), cache)
    kept = selection.select_kept(jnp.zeros(cache.k.shape[:3] + (cache.capacity,)), lengths,
                                 sparsity)
    sparse = selection.compress(config, cache, kept, lengths, sparsity.ring_size(2))
    sparse_hidden, _ = step(params, jnp.array([[3], [4]]), sparse)
    return logits, hidden, sparse_hidden

  for expected, actual in zip(run(jnp_config),
                              run(dataclasses.replace(jnp_config, attention_impl="pallas"))):
    np.testing.assert_allclose(actual, expected, atol=2e-5)
