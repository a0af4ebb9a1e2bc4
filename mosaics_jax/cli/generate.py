"""`mosaics-generate`: sample text from a trained model, streamed as it is generated.

    mosaics-generate runs/mm1-char --prompt "ROMEO:" --max-new-tokens 500 --temperature 0.8
    mosaics-generate exported/ --prompt-file prompt.txt --num-samples 3 --top-p 0.9 --seed 1

PATH is a training workdir or an exported directory whose run kept its tokenizer (a text run).
The text goes to stdout as the decode loop produces it; a one-line summary (prompt and new tokens,
prefill and decode tokens/s) ends on stderr. Samples whose decode cache (the prompt and
--max-new-tokens, or --max-len) would not fit in memory are refused before anything is allocated.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from mosaics_jax.cli import common
from mosaics_jax.inference import generate as generate_lib, sampling as sampling_lib, score
from mosaics_jax.port import pretrained

# New tokens per dispatch of the decode loop: the stream's granularity.
STREAM_CHUNK = 16


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mosaics-generate",
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[1:]),
  )
  parser.add_argument("path", help="a training workdir or an exported directory")
  prompt = parser.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", action=common.StoreOnce, help="the text to continue")
  prompt.add_argument(
      "--prompt-file", action=common.StoreOnce, help="a UTF-8 file holding the text to continue"
  )
  parser.add_argument("--max-new-tokens", type=int, default=200)
  parser.add_argument(
      "--temperature",
      type=float,
      default=1.0,
      help=f"0 (or below float32's smallest normal, {sampling_lib.GREEDY_BELOW:.3g}): greedy",
  )
  parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens")
  parser.add_argument("--top-p", type=float, help="sample in the smallest set of probability p")
  parser.add_argument("--seed", type=common.seed, default=0)
  parser.add_argument("--num-samples", type=int, default=1, help="samples of the same prompt")
  parser.add_argument(
      "--max-len", type=int, help="tokens a sample may reach, prompt included (default: all)"
  )
  return parser


def _prompt(args) -> str:
  if args.prompt is not None:
    return args.prompt
  try:
    return pathlib.Path(args.prompt_file).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read the prompt file {args.prompt_file}: {e}") from None


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.num_samples < 1:
      raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    sampling = sampling_lib.Sampling(args.temperature, args.top_k, args.top_p)
    model = pretrained.load(args.path)
    ids = model.encode(_prompt(args))
    generator = generate_lib.Generator(model.model)
    _check_memory(model, generator, len(ids), args)
    parts = generator.stream(
        model.params,
        [ids] * args.num_samples,
        args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        max_len=args.max_len,
        chunk=STREAM_CHUNK,
    )
    _print(model, parts, len(ids), args.num_samples)
  except (ValueError, *common.READ_ERRORS) as e:
    return common.fail("mosaics-generate", e)
  return 0


def _check_memory(
    model: pretrained.Pretrained, generator: generate_lib.Generator, prompt_tokens: int, args
) -> None:
  """ValueError, before anything is allocated, when the samples would not fit in memory: the
  estimate of scoring (`Scorer.check_memory`) for rows of max_len tokens, a prefill chunk (the
  generator's, else the whole prompt) and a batch of --num-samples rows."""
  length = prompt_tokens + args.max_new_tokens if args.max_len is None else args.max_len
  scorer = score.Scorer(
      model.model, chunk=generator.chunk or max(prompt_tokens, 1), batch_size=args.num_samples
  )
  try:
    scorer.check_memory(length, model.params)
  except ValueError as e:
    raise ValueError(f"{e} (--max-new-tokens, --max-len, --num-samples)") from None


def _print(model: pretrained.Pretrained, parts, prompt_tokens: int, samples: int) -> None:
  """Streams a single sample to stdout as it comes (several: each once complete), then the
  summary to stderr."""
  rows: list[list[int]] = [[] for _ in range(samples)]
  shown = ""
  start = time.perf_counter()
  prefilled = None
  for part in parts:
    if prefilled is None:  # The first part, of no tokens, marks the prefill's end.
      prefilled = time.perf_counter()
    for row, tokens in zip(rows, part):
      row.extend(int(t) for t in tokens if t != generate_lib.PAD)
    if samples == 1:
      # Decoding the whole sample each time keeps multi-byte characters whole.
      text = model.decode(rows[0])
      sys.stdout.write(text[len(shown) :])
      sys.stdout.flush()
      shown = text
  end = time.perf_counter()
  if samples > 1:
    print("\n\n".join(f"--- sample {i}\n{model.decode(row)}" for i, row in enumerate(rows)))
  else:
    print()
  new = sum(len(row) for row in rows)
  print(
      f"mosaics-generate: {prompt_tokens} prompt tokens x {samples}, {new} new tokens; prefill"
      f" {prompt_tokens * samples / max(prefilled - start, 1e-9):.0f} tokens/s, decode"
      f" {new / max(end - prefilled, 1e-9):.1f} tokens/s (compilation included)",
      file=sys.stderr,
  )
