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


# What a CPU can check of the compiled kernels: Pallas lowers them for an accelerator it does not
# have (`lowering_platforms`), down to the accelerator's custom call: Mosaic for TPU, Triton IR for
# GPU. The final Mosaic / PTX compilation happens on the device and is not checked here.
_LOWERING = {"tpu": "tpu", "gpu": "cuda"}
_KERNEL_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}


@pytest.fixture
def built_for(monkeypatch):
  """Builds as if on another platform (`backend.platform`), for lowering only. Traces cached that
  way are dropped before and after, so no CPU run reuses them."""
  def pretend(platform):
    jax.clear_caches()
    monkeypatch.setattr(backend, "platform", lambda: platform)
  yield pretend
  jax.clear_caches()


def _lowered(fn, platform, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=(_LOWERING[platform],)).as_text()


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_both_kernels_lower_to_their_accelerator_call(built_for, platform):
  """bfloat16, GQA rows that are no power of two (3 x 5, 3 x 8), a padded capacity; the forward
  and the custom VJP. Two GPU failures this caught: without Triton params Pallas lowers GPU
  kernels with Mosaic GPU, which staged whole KV rows in shared memory (539 KB > 227 KB), and
  Triton refused the [15, 64] query rows (its arrays need power-of-two sizes)."""
  built_for(platform)
  q, k, v, positions, query_positions = _decode_inputs(0, 2, 5, 9, 3, 64, 300, 0.6, jnp.bfloat16)
  text = _lowered(sparse_decode_attention, platform, q, k, v, positions, query_positions)
  assert text.count(_KERNEL_CALL[platform]) == 1

  (q, k, v, query_positions, keep, table, counts), ring = _block_sparse_inputs(
      0, 2, 32, 256, 9, 3, 64, 8, 64, 3, 0.7, 200, 24, jnp.bfloat16)
  attend = lambda q, k, v: block_sparse_attention(q, k, v, query_positions, keep, table, counts,
                                                  block_q=8, block_k=64, ring_from=ring)
  assert _lowered(attend, platform, q, k, v).count(_KERNEL_CALL[platform]) == 1
  loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
  gradient = _lowered(jax.grad(loss, argnums=(0, 1, 2)), platform, q, k, v)
  assert gradient.count(_KERNEL_CALL[platform]) == 1  # the forward; the backward is jnp


@pytest.mark.parametrize("platform", ["cpu", "tpu", "gpu"])
def test_auto_attention_runs_the_kernels_where_they_compile(built_for, platform):
  """The default attention_impl="auto": on TPU and GPU a verifier step on the full cache, a
  drafter step on a sparse cache and a training view's gradient lower to the kernels' calls; on
  CPU (where Pallas only interprets) to none."""
  from budgetdraft.models.config import get_config
  from budgetdraft.models.kv_cache import FullKVCache
  from budgetdraft.models.transformer import Transformer, init_params, unroll
  from budgetdraft.sparsity import selection
  from budgetdraft.training import views

  built_for(platform)
  config = get_config("tiny", attention_block=32)
  assert config.attention_impl == "auto"
  params = init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, config.vocab_size)
  sparsity = selection.SparsityConfig(policy="streaming", budget=16, sinks=2, window=4, recent=8)

  def verifier_step(params, tokens):  # the decoding layout, on a full cache
    layered, layered_params = unroll(config, params)
    cache = FullKVCache.init(layered, 2, 64).advance(tokens.shape[1])
    return Transformer(layered).apply({"params": layered_params}, tokens[:, :1],
                                      cache.length[:, None], cache)[0]

  def drafter_step(params, tokens):  # a sparse cache
    kept = jnp.zeros((config.num_layers, 2, config.num_kv_heads, 64), bool).at[..., :16].set(True)
    cache = FullKVCache.init(config, 2, 64).advance(tokens.shape[1])
    sparse = selection.compress(config, cache, kept, cache.length, sparsity.ring_size(2))
    return Transformer(config).apply({"params": params}, tokens[:, :1], sparse.length[:, None],
                                     sparse)[0]

  def training_gradient(params, tokens):  # a view: kept keys + the ring, through the custom VJP
    return jax.grad(lambda p: views.all_branch_outputs(
        config, p, tokens, 32, jnp.array([16]), sparsity, 4, jax.random.key(0))[1].sum())(params)

  for fn in (verifier_step, drafter_step, training_gradient):
    if platform == "cpu":
      assert "pallas_call" not in str(jax.make_jaxpr(fn)(params, tokens)), fn.__name__
    else:
      assert _KERNEL_CALL[platform] in _lowered(fn, platform, params, tokens), fn.__name__


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
