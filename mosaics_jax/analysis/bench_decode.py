"""`mosaics-bench decode`: generation speed with decode caches against re-running the full context
for every new token (what the official nanoMosaics code does), in the same process.

The decode loop runs in dispatches of `bucket` tokens (`Generator.stream`), each timed: µs per
token by position bucket show how the cost grows with the stream. Everything is compiled and run
once before it is timed. The full re-run is a jitted forward over a fixed length (the context
padded to the bucket's end, so that one compilation serves each bucket; causality makes the padding
harmless) timed once per bucket: its total is the sum over the new tokens of the forward whose
length covers them.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mosaics_jax import config as config_lib
from mosaics_jax.inference import generate as generate_lib
from mosaics_jax.model import cache as cache_lib, families


@dataclasses.dataclass(frozen=True)
class DecodeReport:
  """Generation speed of one experiment's model."""

  experiment: str
  batch: int
  prompt_len: int
  new_tokens: int
  cache_bytes: int  # Of the whole cache (all layers), at the run's max_len.
  cache_bytes_at_twice: int  # At twice that max_len: equal when the cache does not grow.
  prefill_tokens_per_second: float
  decode_tokens_per_second: float
  buckets: tuple[tuple[int, int, float, float], ...]  # (first, last position, cached µs/token,
  #   full re-run µs/token)
  rerun_seconds: float  # The full re-run's total over the new tokens.
  cached_seconds: float  # The decode loop's total.

  @property
  def speedup(self) -> float:
    return self.rerun_seconds / self.cached_seconds


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(
    experiment: config_lib.Experiment,
    *,
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 2048,
    bucket: int = 256,
    repeats: int = 3,
    rerun: bool = True,
) -> DecodeReport:
  """Prefill `prompt_len` random tokens per row, then decode `new_tokens` greedily; with `rerun`,
  time the full re-run too."""
  cfg = experiment.model
  max_len = prompt_len + new_tokens
  longest = families.of(cfg).max_length(cfg)
  if longest is not None and max_len > longest:
    # v1's block_size is a mask's length, GPT-2's the rows of its position table (parameters).
    longer = dataclasses.replace(cfg, block_size=max_len)
    if families.param_shapes(longer) != families.param_shapes(cfg):
      raise ValueError(
          f"{experiment.name} reads at most {longest} tokens (its parameters fix the length):"
          f" prompt {prompt_len} + new tokens {new_tokens} = {max_len}"
      )
  model = families.build_model(cfg)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  params = model.init(jax.random.key(0), jnp.asarray(prompts[:, :8]))["params"]
  generator = generate_lib.Generator(model)

  def stream():
    return generator.stream(params, prompts, new_tokens, max_len=max_len, chunk=bucket)

  for _ in stream():  # Compiles the prefill and both loop lengths.
    pass
  prefill_times, bucket_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    times = []
    for _ in stream():  # The first part marks the prefill's end.
      now = time.perf_counter()
      times.append(now - start)
      start = now
    prefill_times.append(times[0])
    bucket_times.append(times[1:])
  prefill = statistics.median(prefill_times)
  per_bucket = [statistics.median(ts) for ts in zip(*bucket_times)]

  # The full re-run of the official code: one forward of the whole context per new token. v1's
  # block_size bounds its training context, not this measurement: the baseline gets the length.
  full_cfg = cfg
  if longest is not None:
    full_cfg = dataclasses.replace(cfg, block_size=max_len)
  full = families.build_model(full_cfg)
  forward = jax.jit(lambda tokens: full.apply({"params": params}, tokens)[:, -1])
  buckets = []
  rerun_total = 0.0
  for i, seconds in enumerate(per_bucket):
    first = prompt_len + i * bucket
    last = min(first + bucket, max_len) - 1
    count = last - first + 1
    full_seconds = float("nan")
    if rerun:
      tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, last + 1)).astype(np.int32))
      jax.block_until_ready(forward(tokens))  # Compiles this length.
      full_seconds = _median_time(lambda tokens=tokens: forward(tokens), repeats)
      rerun_total += full_seconds * count
    buckets.append((first, last, seconds / count * 1e6, full_seconds * 1e6))
  return DecodeReport(
      experiment=experiment.name,
      batch=batch,
      prompt_len=prompt_len,
      new_tokens=new_tokens,
      cache_bytes=cache_lib.nbytes(model.init_cache(batch, max_len)),
      cache_bytes_at_twice=cache_lib.nbytes(model.init_cache(batch, 2 * max_len)),
      prefill_tokens_per_second=batch * prompt_len / prefill,
      decode_tokens_per_second=batch * new_tokens / sum(per_bucket),
      buckets=tuple(buckets),
      rerun_seconds=rerun_total if rerun else float("nan"),
      cached_seconds=sum(per_bucket),
  )


def format_report(r: DecodeReport) -> str:
  grows = "constant" if r.cache_bytes == r.cache_bytes_at_twice else "grows with max_len"
  lines = [
      f"decoding {r.experiment}: batch {r.batch}, prompt {r.prompt_len} tokens, {r.new_tokens} new"
      f" tokens (greedy), random parameters",
      f"prefill {r.prefill_tokens_per_second:.0f} tokens/s; decode"
      f" {r.decode_tokens_per_second:.1f} tokens/s; cache {r.cache_bytes / 2**20:.2f} MiB"
      f" ({grows}: {r.cache_bytes_at_twice / 2**20:.2f} MiB at twice the length)",
      f"full re-run per token (no cache): {r.rerun_seconds:.1f} s against {r.cached_seconds:.2f} s"
      f" cached: {r.speedup:.1f}x"
      if not math.isnan(r.rerun_seconds)
      else "full re-run: not run",
      "",
      "| positions | cached µs/token | full re-run µs/token | ratio |",
      "|---|---:|---:|---:|",
  ]
  for first, last, cached, rerun in r.buckets:
    if math.isnan(rerun):
      lines.append(f"| {first}-{last} | {cached:.0f} | - | - |")
    else:
      lines.append(f"| {first}-{last} | {cached:.0f} | {rerun:.0f} | {rerun / cached:.1f}x |")
  return "\n".join(lines)
