"""Speculative decoding vs autoregressive, measured side by side on long-context prompts.

  python experiments/speedup.py --config=configs/speedup.py:default

For each context length and row (drafter, KV policy and budget, verification rule, paths): prefill
and decode wall time of speculative decoding and of AR decoding on the same prompts, acceptance rate,
block efficiency (tokens per verifier call), time per round and the drafter's share of it, peak KV
bytes of both models, and speedup = AR time / speculative time (decode phase and end to end).
Writes results/speedup_<variant>.{md,csv,json,png}.
"""

import csv
import os

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from budgetdraft import benchmarking, drafters, tables
from budgetdraft import tokenizer as tokenizer_lib
from budgetdraft.data import packing, readers
from budgetdraft.decoding import autoregressive, speculative
from budgetdraft.decoding.sampling import SamplingConfig
from budgetdraft.models import checkpoint_io
from budgetdraft.models.transformer import Transformer
from budgetdraft.sparsity.selection import SparsityConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/speedup.py:default")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results", "Where the tables and the plot go.")


def _compiled(fn, *args, **static):
  """Ahead-of-time compiled `fn`: compile time stays out of every measurement."""
  return fn.lower(*args, **static).compile()


def measure_ar(params, config, prompt, sampling, new_tokens, chunk):
  lengths = jnp.array([prompt.shape[1]], jnp.int32)
  static = dict(config=config, sampling=sampling, eos_id=None, pad_id=0)
  start = _compiled(autoregressive.start, params, prompt, lengths, jax.random.key(0),
                       max_new_tokens=new_tokens, chunk_size=chunk, **static)
  state, prefill_s = benchmarking.timed(start, params, prompt, lengths, jax.random.key(0))
  decode = _compiled(autoregressive.decode, params, state, **static)
  _, decode_s = benchmarking.timed(decode, params, state)
  return prefill_s, decode_s


def measure_speculative(verifier, drafter, prompt, spec):
  """Timings and stats of one speculative run, plus a timed draft and verify step of its loop."""
  (verifier_config, verifier_params), (drafter_config, drafter_params) = verifier, drafter
  lengths = jnp.array([prompt.shape[1]], jnp.int32)
  static = dict(verifier_config=verifier_config, drafter_config=drafter_config, spec=spec)
  start = _compiled(speculative.start, verifier_params, drafter_params, prompt, lengths,
                       jax.random.key(1), **static)
  state, prefill_s = benchmarking.timed(start, verifier_params, drafter_params, prompt, lengths,
                                        jax.random.key(1))
  decode = _compiled(speculative.decode, verifier_params, drafter_params, state, **static)
  final, decode_s = benchmarking.timed(decode, verifier_params, drafter_params, state)
  # One draft and one verify step from the post-prefill state, for the time split. The caches are
  # donated (updated in place, as in the loop's carry) and copied afresh outside the timer.
  paths = spec.num_paths
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  root = state.verifier_cache.length
  draft_fn = jax.jit(lambda p, c, r, n, k: speculative.draft(
      Transformer(drafter_config), p, c, r, n, k, spec)[::2], donate_argnums=(1,))
  draft_args = lambda: (drafter_params, copy(state.drafter_cache),
                        jnp.repeat(state.recent, paths, 0), jnp.repeat(root, paths),
                        jax.random.key(2))
  draft_fn(*draft_args())
  (drafts, _), draft_s = benchmarking.timed_with_fresh_args(draft_fn, draft_args)
  verify_fn = jax.jit(lambda p, c, last, d: speculative.verify(
      Transformer(verifier_config), p, c, last, d, spec), donate_argnums=(1,))
  verify_args = lambda: (verifier_params, copy(state.verifier_cache), state.recent[:, 1],
                         drafts.reshape(1, paths, spec.gamma))
  verify_fn(*verify_args())
  _, verify_s = benchmarking.timed_with_fresh_args(verify_fn, verify_args)
  _, stats = speculative.outputs_and_stats(final, spec)
  return dict(prefill_s=prefill_s, decode_s=decode_s, draft_s=draft_s, verify_s=verify_s,
              verifier_kv=state.verifier_cache.nbytes(), drafter_kv=state.drafter_cache.nbytes(),
              **stats)


def _plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  series = {}
  for row in rows:
    if row["budget"] != "full" and row["rule"] == "block":
      key = (row["context"], row["drafter"], row["policy"])
      series.setdefault(key, []).append((int(row["budget"]), row["acceptance"]))
  for (context, drafter, policy), points in sorted(series.items()):
    points.sort()
    ax.plot(*zip(*points), marker="o", label=f"{policy}, {drafter}, {context // 1024}K")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("KV budget of the drafter (kept prompt keys per layer and head)")
  ax.set_ylabel("acceptance rate")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  cfg = _CONFIG.value
  path = cfg.checkpoint or checkpoint_io.default_verifier_path()
  config, params = checkpoint_io.load_checkpoint(path)
  tokenizer = tokenizer_lib.load_tokenizer(path)
  sampling = SamplingConfig(temperature=cfg.temperature)
  rows = []
  for context in cfg.contexts:
    # A round may verify num_paths * gamma + 1 tokens past the last emitted one.
    headroom = max(row["num_paths"] for row in cfg.rows) * cfg.gamma + 1
    prompt_len = context - cfg.new_tokens - headroom
    windows = packing.first_windows(readers.documents(cfg.dataset, cfg.data_dir, cfg.split),
                                    tokenizer, prompt_len, cfg.num_prompts)
    prompts = [jnp.asarray(w[None]) for w in windows]
    ar = [measure_ar(params, config, p, sampling, cfg.new_tokens, cfg.prefill_chunk)
          for p in prompts]
    ar_prefill, ar_decode = sum(a[0] for a in ar), sum(a[1] for a in ar)
    logging.info("context %d AR: prefill %.2fs decode %.2fs", context, ar_prefill, ar_decode)
    for row in cfg.rows:
      sparsity = None if row["policy"] is None else SparsityConfig(
          policy=row["policy"], budget=row["budget"], sinks=cfg.sinks, window=cfg.window,
          recent=cfg.recent)
      spec = speculative.SpeculativeConfig(
          gamma=cfg.gamma, num_paths=row["num_paths"], rule=row["rule"], sampling=sampling,
          max_new_tokens=cfg.new_tokens, prefill_chunk=cfg.prefill_chunk, sparsity=sparsity)
      drafter = drafters.from_spec(row["drafter"], config, params)
      runs = [measure_speculative((config, params), drafter, p, spec) for p in prompts]
      total = lambda key: sum(r[key] for r in runs)
      rounds = total("rounds")
      result = {
          "context": context, "drafter": row["drafter"], "policy": row["policy"] or "full KV",
          "budget": row["budget"] or "full", "rule": row["rule"], "paths": row["num_paths"],
          "acceptance": total("accepted") / max(1, rounds * cfg.gamma),
          "tokens/call": (total("accepted") + rounds) / max(1, rounds),
          "ms/round": 1e3 * total("decode_s") / max(1, rounds),
          "draft share": total("draft_s") / (total("draft_s") + total("verify_s")),
          "decode tok/s": cfg.new_tokens * len(runs) / total("decode_s"),
          "AR decode tok/s": cfg.new_tokens * len(runs) / ar_decode,
          "decode speedup": ar_decode / total("decode_s"),
          "e2e speedup": (ar_prefill + ar_decode) / (total("prefill_s") + total("decode_s")),
          "verifier KV MB": runs[0]["verifier_kv"] / 1e6,
          "drafter KV MB": runs[0]["drafter_kv"] / 1e6,
      }
      rows.append(result)
      logging.info("%s", result)
  table = tables.markdown_table(rows)
  print(table)
  output = os.path.join(_OUTPUT_DIR.value, f"speedup_{cfg.variant}")
  notes = (f"Verifier {os.path.basename(path)}, batch 1, {cfg.new_tokens} new tokens, gamma="
           f"{cfg.gamma}, temperature {cfg.temperature}, {cfg.num_prompts} prompt(s) per context "
           f"from {cfg.dataset}/{cfg.split}. Speedups are AR time / speculative time measured in "
           "this run; e2e includes both prefills (and KV selection). ms/round is the measured "
           "decode loop time per verifier call; draft share is the drafter's fraction of one "
           "round, estimated from a draft step and a verify step timed on their own (standalone "
           "steps run ~2x slower than inside the loop, so only their ratio is used).")
  tables.write_results(output, f"Speculative decoding speedup ({cfg.variant})", table, rows, notes)
  with open(output + ".csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  _plot(rows, output + ".png")


if __name__ == "__main__":
  app.run(main)
