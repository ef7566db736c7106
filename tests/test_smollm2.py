"""End-to-end checks on the real default verifier, SmolLM2-135M-Instruct (Q4_1 GGUF)."""

import os

import jax
import jax.numpy as jnp
import pytest

from budgetdraft import drafters
from budgetdraft.evaluation import perplexity
from budgetdraft.data import readers
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.sparsity.selection import SparsityConfig
from configs import speedup as configs_speedup

# Perplexity of the first 2048 next-token predictions of held-out documents, measured with
# `perplexity.perplexity` on 2026-11-22 (CPU, float32). With the wrong RoPE/Q-K convention it is > 100.
RECORDED_PERPLEXITY = {"kjv/40_mark": 13.34, "austen/northangerabbey": 36.24,
                       "shakespeare/henry_v": 36.85}


@pytest.mark.slow
def test_perplexity_on_held_out_passage(smollm2, data_dir):
  config, params, tokenizer = smollm2
  validation = {d.id: d for d in readers.documents("long_books", data_dir, "validation")}
  doc_id = next(i for i in RECORDED_PERPLEXITY if i in validation)
  tokens = tokenizer.encode(validation[doc_id].text)[:2049]
  assert len(tokens) == 2049
  ppl = perplexity.perplexity(params, jnp.asarray([tokens]), config=config)
  assert ppl == pytest.approx(RECORDED_PERPLEXITY[doc_id], rel=0.02)
  assert ppl < 60


@pytest.mark.slow
def test_greedy_chat_answer_is_sensible(smollm2):
  config, params, tokenizer = smollm2
  prompt = tokenizer.encode(tokenizer.chat_prompt("What is the capital of France?"))
  (answer,) = autoregressive.generate(params, [prompt], jax.random.key(0), config=config,
                                      max_new_tokens=16, eos_id=tokenizer.eos_id,
                                      pad_id=tokenizer.eos_id, prefill_chunk=64)
  text = tokenizer.decode(answer)
  assert "Paris" in text
  assert answer[-1] == tokenizer.eos_id, text


def test_tokenizer_round_trips_the_corpus(smollm2, data_dir):
  _, _, tokenizer = smollm2
  for doc in readers.documents("long_books", data_dir, "validation"):
    sample = doc.text[:20_000]
    assert tokenizer.decode(tokenizer.encode(sample)) == sample, doc.id
  assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
  assert tokenizer.encode("<|im_start|>") == [tokenizer.bos_id]
  odd = "naïve café – 42 ½ \t\n emoji 🙂"
  assert tokenizer.decode(tokenizer.encode(odd)) == odd


@pytest.mark.slow
def test_the_shipped_drafter_is_accepted_and_lossless(smollm2, data_dir):
  """The drafter `make run` uses (drafters/smollm2-eagle) loads onto the embedded verifier (its
  fingerprint is checked), fits the 40 MB limit, and on a held-out 1K prompt over a 256-key SnapKV
  cache emits the greedy AR tokens while being accepted (well above a layer cut's ~1.1 tokens
  per call)."""
  config, params, tokenizer = smollm2
  source = configs_speedup.SHIPPED
  directory = source.partition(":")[2]
  size = sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)
  assert size <= 40e6
  drafter_config, drafter_params = drafters.load(source, config, params)
  assert drafter_config.feature_dim == config.dim and drafter_config.draft_vocab > 0
  text = next(iter(readers.documents("long_books", data_dir, "validation"))).text
  prompt = tokenizer.encode(text)[:1024]
  expected = autoregressive.generate(params, [prompt], jax.random.key(0), config=config,
                                     max_new_tokens=48, prefill_chunk=512)
  spec = speculative.SpeculativeConfig(
      gamma=4, max_new_tokens=48, prefill_chunk=512,
      sparsity=SparsityConfig(policy="snapkv", budget=256, sinks=4, window=64, recent=128))
  out, stats = speculative.generate(params, drafter_params, [prompt], jax.random.key(1),
                                    verifier_config=config, drafter_config=drafter_config,
                                    spec=spec)
  assert out == expected
  assert stats.tokens_per_call > 1.5, stats
