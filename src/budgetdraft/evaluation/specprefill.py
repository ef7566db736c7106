"""Speculative prefill against a full prefill, measured side by side on the same prompts.

Per prompt: time to first token (TTFT: scorer prefill + look-ahead scoring + the verifier's prefill
of the kept tokens, against the verifier's full prefill), quality of what the pruned verifier says
next (NLL of the true continuation, agreement of its first greedy tokens with the full prefill's,
pass-key retrieval where the prompt has an answer), and end to end time with decoding: AR from the
pruned cache, and speculative decoding with the scorer as drafter over the lookahead KV policy
(scores shared with the prefill pass). Every time is of an ahead-of-time compiled call.
"""

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from budgetdraft import drafters as drafters_lib
from budgetdraft import parallel, specprefill
from budgetdraft.data import retrieval
from budgetdraft.decoding import autoregressive, sampling as sampling_lib, speculative
from budgetdraft.evaluation import decode_speed, timing
from budgetdraft.models.checkpoint_io import Checkpoint
from budgetdraft.models.prefill import continuation_logits, request_capacity
from budgetdraft.sparsity.selection import SparsityConfig


@dataclasses.dataclass(frozen=True)
class Prompt:
  task: str                                   # "books" or "passkey"
  tokens: np.ndarray                          # [P]
  continuation: np.ndarray                    # [C] true next tokens (NLL target)
  passkey: retrieval.PasskeyPrompt | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every row shares."""

  greedy_tokens: int = 32       # compared with the full prefill's
  max_new_tokens: int = 64      # decoded for the end-to-end times
  prefill_chunk: int = 512
  gamma: int = 4
  drafter_budget: int = 256     # the scorer-as-drafter's KV budget (lookahead policy)

  def __post_init__(self):
    if self.greedy_tokens < 1:
      raise ValueError(f"greedy_tokens={self.greedy_tokens} must be >= 1")
    self.spec(1)  # bad lengths or a budget below sinks + window fail here, before any model work

  def spec(self, lookahead: int) -> speculative.SpeculativeConfig:
    """Greedy speculative decoding with the scorer drafting over a lookahead-selected cache."""
    return speculative.SpeculativeConfig(
        gamma=self.gamma, rule="greedy", max_new_tokens=self.max_new_tokens,
        prefill_chunk=self.prefill_chunk,
        sparsity=SparsityConfig(policy="lookahead", budget=self.drafter_budget,
                                lookahead=lookahead))

  def room(self, lookahead: int) -> int:
    """Cache positions decoding writes past the prompt."""
    return speculative.positions_after_prompt(self.spec(lookahead))


def _nll(verifier: Checkpoint, logits, cache, continuation) -> float:
  """Mean negative log-likelihood of the continuation [C] after the prompt (teacher forced)."""
  tail = continuation_logits(verifier.params, cache, jnp.asarray(continuation[None, :-1]),
                             config=verifier.config)
  every = jnp.concatenate([logits[:, None], tail], axis=1)[0]
  logp = jax.nn.log_softmax(every, axis=-1)
  return float(-jnp.take_along_axis(logp, jnp.asarray(continuation)[:, None], axis=1).mean())


def _ar_decode(verifier: Checkpoint, logits, cache, max_new_tokens: int):
  """(tokens [max_new_tokens], decode seconds) of greedy AR decoding from a prefilled cache."""
  static = dict(sampling=sampling_lib.SamplingConfig(), eos_id=None, pad_id=0)
  state = autoregressive.begin(logits, cache, jax.random.key(0), max_new_tokens=max_new_tokens,
                               **static)
  decode = timing.compiled(autoregressive.decode, verifier.params, state, config=verifier.config,
                           **static)
  final, seconds = timing.timed(decode, verifier.params, state)
  return np.asarray(final.tokens[0]), seconds


def _spec_decode(verifier: Checkpoint, scorer, scores, logits, cache, prompt, lengths,
                 settings: Settings, selection: specprefill.SpecPrefillConfig):
  """(tokens, decode seconds, `RoundStats`) of greedy speculative decoding from the pruned cache,
  the scorer drafting over its lookahead-selected sparse cache."""
  scorer_config, scorer_params = scorer
  spec = settings.spec(selection.lookahead)
  state = speculative.begin(scorer_params, logits, cache, scores.cache, prompt, lengths,
                            jax.random.key(1), kv_scores=scores.kv_scores, drafter_config=scorer_config,
                            spec=spec)
  static = dict(verifier_config=verifier.config, drafter_config=scorer_config, spec=spec)
  decode = timing.compiled(speculative.decode, verifier.params, scorer_params, state, **static)
  final, seconds = timing.timed(decode, verifier.params, scorer_params, state)
  (tokens,), stats = speculative.outputs_and_stats(final, spec)
  return np.asarray(tokens), seconds, stats


def _quality(verifier: Checkpoint, item: Prompt, logits, cache, tokens, reference) -> dict:
  n = len(reference)
  row = {"NLL": _nll(verifier, logits, cache, item.continuation),
         "greedy agree": float(np.mean(tokens[:n] == reference)),
         "same prefix": decode_speed.same_prefix(tokens[:n], reference)}
  if item.passkey is not None:
    row["retrieved"] = float(retrieval.answered(verifier.tokenizer.decode(tokens[:n]),
                                                item.passkey))
  return row


def _full(verifier: Checkpoint, item: Prompt, settings: Settings, capacity: int):
  """The full prefill's time, greedy tokens and decode time. It runs as `prefill_kept` keeping
  every token, which is the verifier's plain prefill bit for bit (tested), so both sides of the
  TTFT ratio are timed through the same function."""
  prompt = jnp.asarray(item.tokens[None])
  lengths = jnp.array([prompt.shape[1]], jnp.int32)
  everything = specprefill.SpecPrefillConfig(keep_rate=1.0)
  importance = jnp.zeros(prompt.shape, jnp.float32)
  prefill = timing.compiled(specprefill.prefill_kept, verifier.params, prompt, lengths,
                            importance, config=verifier.config, settings=everything,
                            capacity=capacity, prefill_chunk=settings.prefill_chunk)
  (logits, cache, _, _), ttft = timing.timed(prefill, verifier.params, prompt, lengths,
                                             importance)
  tokens, decode_s = _ar_decode(verifier, logits, cache, settings.max_new_tokens)
  return dict(ttft=ttft, decode_s=decode_s, tokens=tokens, logits=logits, cache=cache)


def specprefill_table(verifier: Checkpoint, prompts: dict, scorers: list[str],
                      keep_rates: list[float], settings: Settings,
                      selection: specprefill.SpecPrefillConfig, mesh=None) -> list[dict]:
  """One row per (context, task, scorer, keep rate) plus each (context, task)'s full prefill.

  prompts: {context: [Prompt]}. Quality and times are means over the prompts of a (context, task).
  mesh: where the verifier's params are placed (`parallel.place_checkpoint`); scorers go there too.
  """
  rows = []
  for context, items in prompts.items():
    capacity = request_capacity(len(items[0].tokens), settings.room(selection.lookahead),
                                settings.prefill_chunk)
    tasks = {}
    for i, item in enumerate(items):
      tasks.setdefault(item.task, []).append(i)
    full = [_full(verifier, item, settings, capacity) for item in items]
    for task, picked in tasks.items():
      quality = [_quality(verifier, items[i], full[i]["logits"], full[i]["cache"],
                          full[i]["tokens"], full[i]["tokens"][:settings.greedy_tokens])
                 for i in picked]
      rows.append(_row(context, task, "full prefill", 1.0, float(len(items[0].tokens)), quality,
                       ttft=np.mean([full[i]["ttft"] for i in picked]), ttft_speedup=1.0,
                       e2e_ar=1.0, e2e_spec=float("nan"), tokens_per_call=float("nan")))
      logging.info("%s", rows[-1])
    for source in scorers:
      scorer = parallel.place_drafter(mesh, drafters_lib.load(source, verifier.config,
                                                              verifier.params))
      scored = [_score(scorer, item, settings, selection, capacity) for item in items]
      for rate in keep_rates:
        chosen = dataclasses.replace(selection, keep_rate=rate)
        runs = [_pruned_run(verifier, scorer, item, *score, settings, chosen, capacity, reference)
                for item, score, reference in zip(items, scored, full)]
        for task, picked in tasks.items():
          mean = lambda key: float(np.mean([runs[i][key] for i in picked]))
          full_ttft = float(np.mean([full[i]["ttft"] for i in picked]))
          full_e2e = full_ttft + float(np.mean([full[i]["decode_s"] for i in picked]))
          rows.append(_row(
              context, task, source, rate, mean("kept"), [runs[i]["quality"] for i in picked],
              ttft=mean("ttft"), ttft_speedup=full_ttft / mean("ttft"),
              e2e_ar=full_e2e / (mean("ttft") + mean("ar_s")),
              e2e_spec=full_e2e / (mean("ttft") + mean("spec_s")),
              tokens_per_call=mean("tokens_per_call"), scorer_s=mean("scorer_s")))
          logging.info("%s", rows[-1])
  return rows


def _score(scorer, item: Prompt, settings: Settings, selection: specprefill.SpecPrefillConfig,
           capacity: int):
  """(`specprefill.Scores`, seconds) of the scorer's pass over one prompt; the keep rate plays
  no part in it, so one pass serves every rate."""
  scorer_config, scorer_params = scorer
  prompt = jnp.asarray(item.tokens[None])
  lengths = jnp.array([prompt.shape[1]], jnp.int32)
  score = timing.compiled(specprefill.score, scorer_params, prompt, lengths, config=scorer_config,
                          settings=selection, capacity=capacity,
                          prefill_chunk=settings.prefill_chunk)
  return timing.timed(score, scorer_params, prompt, lengths)


def _pruned_run(verifier: Checkpoint, scorer, item: Prompt, scores: specprefill.Scores,
                scorer_s: float, settings: Settings, selection: specprefill.SpecPrefillConfig,
                capacity: int, full: dict) -> dict:
  prompt = jnp.asarray(item.tokens[None])
  lengths = jnp.array([prompt.shape[1]], jnp.int32)
  common = dict(settings=selection, capacity=capacity, prefill_chunk=settings.prefill_chunk)
  prefill = timing.compiled(specprefill.prefill_kept, verifier.params, prompt, lengths,
                            scores.importance, config=verifier.config, **common)
  (logits, cache, _, num_kept), verifier_s = timing.timed(prefill, verifier.params, prompt,
                                                          lengths, scores.importance)
  tokens, ar_s = _ar_decode(verifier, logits, cache, settings.max_new_tokens)
  spec_tokens, spec_s, stats = _spec_decode(verifier, scorer, scores, logits, cache, prompt,
                                            lengths, settings, selection)
  if not np.array_equal(spec_tokens, tokens):
    raise RuntimeError("greedy speculative tokens from the pruned prefill differ from greedy AR "
                       "tokens from it: a losslessness bug")
  reference = full["tokens"][:settings.greedy_tokens]
  return dict(kept=float(num_kept[0]), ttft=scorer_s + verifier_s, scorer_s=scorer_s, ar_s=ar_s,
              spec_s=spec_s, tokens_per_call=stats.tokens_per_call,
              quality=_quality(verifier, item, logits, cache, tokens, reference))


def _row(context, task, scorer, rate, kept, quality: list[dict], *, ttft, ttft_speedup, e2e_ar,
         e2e_spec, tokens_per_call, scorer_s=0.0) -> dict:
  mean = lambda key: float(np.mean([q[key] for q in quality]))
  return {"context": context, "task": task, "scorer": scorer, "keep rate": rate,
          "kept tokens": kept, "TTFT s": ttft, "scorer s": scorer_s, "TTFT speedup": ttft_speedup,
          "NLL": mean("NLL"), "greedy agree": mean("greedy agree"),
          "same prefix": mean("same prefix"),
          "retrieved": mean("retrieved") if "retrieved" in quality[0] else float("nan"),
          "e2e speedup (AR decode)": e2e_ar, "e2e speedup (spec decode)": e2e_spec,
          "tokens/call": tokens_per_call}


def plot(rows: list[dict], path: str) -> None:
  """TTFT speedup against quality (greedy agreement with the full prefill), one line per
  (context, task, scorer), points labelled by keep rate."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, quality in zip(axes, ("greedy agree", "NLL")):
    series = {}
    for row in rows:
      if row["scorer"] != "full prefill":
        key = f"{row['task']}, {row['scorer']}, {row['context'] // 1024}K"
        series.setdefault(key, []).append(row)
    for label, points in series.items():
      ax.plot([p["TTFT speedup"] for p in points], [p[quality] for p in points], marker="o",
              label=label)
      for p in points:
        ax.annotate(f"{p['keep rate']:g}", (p["TTFT speedup"], p[quality]), fontsize=7)
    for row in rows:
      if row["scorer"] == "full prefill":
        ax.axhline(row[quality], color="gray", lw=0.5)
    ax.set_xlabel("TTFT speedup over the full prefill")
    ax.set_ylabel(quality + (" (full prefill = 1)" if quality == "greedy agree" else
                             " of the true continuation (gray: full prefill)"))
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
