"""The cached decoder against itself (full vs chunked vs step-by-step) and an independent numpy forward."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from budgetdraft.models import attention
from budgetdraft.models.prefill import prefill
from budgetdraft.models.kv_cache import FullKVCache
from budgetdraft.models.config import get_config
from budgetdraft.models.transformer import Transformer, init_params, unroll

# Logit tolerance per compute dtype (f32 accumulation order differs between chunkings).
TOLERANCE = {"float32": 2e-5, "bfloat16": 0.15}


def numpy_forward(config, params, tokens):
  """Textbook Llama forward in float64 numpy, sharing no code with the model: logits [T, V]."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + config.norm_eps) * w
  length, head_dim = len(tokens), config.head_dim
  inv_freq = config.rope_theta ** (-np.arange(0, head_dim, 2) / head_dim)
  angles = np.arange(length)[:, None] * inv_freq[None]
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

  def rope(x):  # [T, H, D], rotate-half
    a, b = x[..., :head_dim // 2], x[..., head_dim // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

  x = p["embed"]["embedding"][tokens]
  group = config.num_heads // config.num_kv_heads
  causal = np.tril(np.ones((length, length), bool))
  for i in range(config.num_layers):
    layer = jax.tree.map(lambda w: w[i], p["layers"])
    project = lambda h, name: h @ layer[name]["kernel"] + layer[name].get("bias", 0.0)
    h = rms(x, layer["attn_norm"]["scale"])
    q = rope(project(h, "q_proj").reshape(length, config.num_heads, head_dim))
    k = rope(project(h, "k_proj").reshape(length, config.num_kv_heads, head_dim))
    v = project(h, "v_proj").reshape(length, config.num_kv_heads, head_dim)
    heads = []
    for head in range(config.num_heads):
      scores = q[:, head] @ k[:, head // group].T / np.sqrt(head_dim)
      scores = np.where(causal, scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      heads.append((weights / weights.sum(-1, keepdims=True)) @ v[:, head // group])
    x = x + np.concatenate(heads, -1) @ layer["o_proj"]["kernel"]
    h = rms(x, layer["mlp_norm"]["scale"])
    gate = h @ layer["gate_proj"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ layer["up_proj"]["kernel"])) @ layer[
        "down_proj"]["kernel"]
  x = rms(x, p["final_norm"]["scale"])
  head = p["lm_head"]["kernel"] if "lm_head" in p else p["embed"]["embedding"].T
  return x @ head


@functools.lru_cache(maxsize=None)
def jitted_model(config):
  """(forward(params, tokens, positions, cache) -> (logits, cache)) compiled once per shape."""
  model = Transformer(config)

  @jax.jit
  def forward(params, tokens, positions, cache):
    hidden, cache = model.apply({"params": params}, tokens, positions, cache)
    return model.apply({"params": params}, hidden, method=Transformer.logits), cache

  return forward


def full_logits(config, params, tokens):
  """One call over the whole sequence: [B, T, V]."""
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  logits, _ = jitted_model(config)(params, tokens, positions,
                                   FullKVCache.init(config, batch, length))
  return logits


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied"])
def test_matches_numpy_reference(preset):
  config = get_config(preset)
  params = init_params(config, jax.random.key(1))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (37,), 0, config.vocab_size))
  expected = numpy_forward(config, params, tokens)
  np.testing.assert_allclose(full_logits(config, params, jnp.asarray(tokens)[None])[0], expected,
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_then_decode_matches_full_sequence(dtype):
  config = get_config("tiny", compute_dtype=dtype, param_dtype=dtype, attention_block=16)
  params = init_params(config, jax.random.key(3))
  tokens = jax.random.randint(jax.random.key(4), (2, 45), 0, config.vocab_size)
  expected = full_logits(config, params, tokens)
  forward = jitted_model(config)
  cache = FullKVCache.init(config, 2, 64)
  split = 29
  positions = jnp.broadcast_to(jnp.arange(split), (2, split))
  logits, cache = forward(params, tokens[:, :split], positions, cache)
  steps = [logits]
  for t in range(split, tokens.shape[1]):
    logits, cache = forward(params, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), expected, atol=TOLERANCE[dtype])
  np.testing.assert_array_equal(cache.length, [45, 45])


@pytest.mark.parametrize("prefill_chunk", [1, 7, 16, 64])
def test_chunked_prefill_matches_unchunked_on_ragged_batch(tiny_model, prefill_chunk):
  config, params = tiny_model
  config = dataclasses.replace(config, attention_block=16)
  lengths = jnp.array([50, 23, 1])
  prompt = jax.random.randint(jax.random.key(5), (3, 50), 0, config.vocab_size)
  model = Transformer(config)
  run_prefill = jax.jit(functools.partial(prefill, model), static_argnums=(4,))
  logits, cache = run_prefill(params, prompt, lengths, FullKVCache.init(config, 3, 128),
                              prefill_chunk)
  np.testing.assert_array_equal(cache.length, lengths)
  for row, length in enumerate(lengths.tolist()):
    alone = full_logits(config, params, prompt[row:row + 1, :length])
    np.testing.assert_allclose(logits[row], alone[0, -1], atol=TOLERANCE["float32"])
    _, row_cache = run_prefill(params, prompt[row:row + 1, :length], lengths[row:row + 1],
                               FullKVCache.init(config, 1, 128), length)
    np.testing.assert_allclose(cache.k[:, row, :, :length], row_cache.k[:, 0, :, :length],
                               atol=1e-5)


@pytest.mark.parametrize("starts", [(40, 9), (64, 64), (0, 33)])
def test_chunked_attention_matches_dense_attention_on_ragged_rows(starts):
  """The block loop (unmasked blocks before every row's chunk, masked ones after) equals one
  masked softmax over every slot, for rows whose chunks start in different blocks, under a tree
  mask, with keys past each row's chunk left as garbage."""
  batch, num_new, num_heads, num_kv_heads, head_dim, capacity, block = 2, 5, 4, 2, 8, 96, 16
  keys = jax.random.split(jax.random.key(len(starts) + sum(starts)), 3)
  q = jax.random.normal(keys[0], (batch, num_new, num_heads, head_dim))
  k, v = (jax.random.normal(key, (1, batch, num_kv_heads, capacity, head_dim))
          for key in keys[1:])
  tree = np.tril(np.ones((num_new, num_new), bool))
  tree[4, 3] = tree[3, 2] = False
  chunk_mask = jnp.broadcast_to(jnp.asarray(tree), (batch, num_new, num_new))
  chunk_start = jnp.asarray(starts, jnp.int32)
  out = attention.chunked_attention(q, k, v, 0, chunk_start, chunk_mask, block)
  slots = jnp.broadcast_to(jnp.arange(capacity), (batch, capacity))
  visible = attention.visible_mask(chunk_start, chunk_mask, slots)[:, None]
  expected, _ = attention.dense_attention(q, k[0], v[0], visible)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_tree_chunk_mask_hides_siblings(tiny_model):
  """A query sees exactly the chunk tokens its mask allows: masking a token = removing it."""
  config, params = tiny_model
  model = Transformer(config)
  tokens = jax.random.randint(jax.random.key(6), (1, 6), 0, config.vocab_size)
  # Tokens 0-3 form a chain; token 4 branches off token 2 (it must not see token 3).
  mask = np.tril(np.ones((5, 5), bool))
  mask[4, 3] = False
  positions = jnp.array([[0, 1, 2, 3, 3]])
  hidden, _ = model.apply({"params": params}, tokens[:, :5], positions,
                          FullKVCache.init(config, 1, 64), jnp.asarray(mask)[None])
  branch = jnp.concatenate([tokens[:, :3], tokens[:, 4:5]], 1)
  expected, _ = model.apply({"params": params}, branch, jnp.arange(4)[None],
                            FullKVCache.init(config, 1, 64))
  np.testing.assert_allclose(hidden[0, 4], expected[0, 3], atol=1e-5)


@pytest.mark.parametrize("attention_impl", ["jnp", "pallas", "auto"])
def test_unrolled_layout_computes_the_stacked_model(attention_impl):
  """`unroll` (per-layer weights and cache arrays, the decoding layout; with "auto" on a CPU, its
  weights packed for the C++ kernels, which also attend for heads of 64) changes no number: a
  chunked prefill, one-token steps and a tree-masked verify chunk give the stacked model's logits,
  and the cache holds the same keys."""
  head_dim = {"head_dim": 64} if attention_impl == "auto" else {}
  config = get_config("tiny", attention_block=16, attention_impl=attention_impl, **head_dim)
  params = init_params(config, jax.random.key(7))
  unrolled_config, unrolled_params = unroll(config, params)
  assert unrolled_config.unroll_layers and unrolled_config.unrolled
  assert unrolled_config.packed_weights == (attention_impl == "auto")
  assert set(unrolled_params["layers"]) == {str(layer) for layer in range(config.num_layers)}
  assert unroll(unrolled_config, unrolled_params)[1] is unrolled_params
  tokens = jax.random.randint(jax.random.key(8), (2, 40), 0, config.vocab_size)
  mask = np.tril(np.ones((4, 4), bool))
  mask[3, 2] = False  # a draft tree: token 3 branches off token 1
  outputs = []
  for c, p in ((config, params), (unrolled_config, unrolled_params)):
    forward = jitted_model(c)
    cache = FullKVCache.init(c, 2, 48)
    assert cache.layered == c.unroll_layers and cache.capacity == 48
    logits, cache = forward(p, tokens[:, :33], jnp.broadcast_to(jnp.arange(33), (2, 33)), cache)
    steps = [logits]
    for t in range(33, 36):
      logits, cache = forward(p, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
      steps.append(logits)
    model = Transformer(c)
    hidden, tree_cache = model.apply({"params": p}, tokens[:, 36:40],
                                     jnp.array([[36, 37, 38, 38]] * 2), cache,
                                     jnp.broadcast_to(jnp.asarray(mask), (2, 4, 4)))
    steps.append(model.apply({"params": p}, hidden, method=Transformer.logits))
    keys = jnp.stack(tree_cache.k) if tree_cache.layered else tree_cache.k
    outputs.append((jnp.concatenate(steps, 1), keys, tree_cache.length))
  (stacked, stacked_keys, stacked_length), (unrolled, unrolled_keys, unrolled_length) = outputs
  np.testing.assert_allclose(unrolled, stacked, atol=TOLERANCE["float32"])
  np.testing.assert_allclose(unrolled_keys, stacked_keys, atol=1e-5)
  np.testing.assert_array_equal(unrolled_length, stacked_length)


def test_layered_cache_rows_and_room_match_the_stacked_cache(tiny_model):
  """gather_rows, reserve and nbytes of a per-layer cache act on each layer as on the stack."""
  config, params = tiny_model
  config = dataclasses.replace(config, attention_impl="jnp")  # XLA's ops: bit-equal keys
  tokens = jax.random.randint(jax.random.key(9), (3, 20), 0, config.vocab_size)
  caches = []
  for c, p in ((config, params), unroll(config, params)):
    _, cache = jitted_model(c)(p, tokens, jnp.broadcast_to(jnp.arange(20), (3, 20)),
                               FullKVCache.init(c, 3, 64))
    caches.append(cache.gather_rows(jnp.array([2, 0, 2])).reserve(130))
  stacked, layered = caches
  assert layered.capacity == stacked.capacity == 192 and layered.batch_size == 3
  assert layered.nbytes() == stacked.nbytes()
  np.testing.assert_array_equal(jnp.stack(layered.k), stacked.k)
  np.testing.assert_array_equal(jnp.stack(layered.v), stacked.v)
  np.testing.assert_array_equal(layered.length, stacked.length)
