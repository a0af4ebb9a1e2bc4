"""EleutherAI's lm-evaluation-harness (lm-eval) on our models: the lm-eval model `mosaics`.

    lm_eval.simple_evaluate(model=MosaicsLM("runs/mm2-char"), tasks=["hellaswag"])
    mosaics-lm-eval --model mosaics --model_args path=runs/mm2,drop_long_term_memory=true \\
        --tasks hellaswag --batch_size 8

lm-eval finds a model by name in a registry that this module fills when it is imported; lm-eval
0.4.13 reads no entry points of other packages, so plain `lm_eval --model mosaics` does not know
the name. `mosaics-lm-eval` (`command_line`) is lm-eval's own command line after that import.

model_args (`MosaicsLM`): path=RUN (a training workdir or an export), batch_size (8; lm-eval's
command line always passes its --batch_size, 1 unless given, which a batch_size in model_args
overrides), chunk (512: tokens per step through the decode cache), max_length (none), max_gen_toks
(256), eot_id, seed (0: sampled generation only), and any field of the model that changes
evaluation only, as `mosaics-eval --set model.KEY=VALUE` (`Harness.load`): drop_long_term_memory=
true (the v2 paper's Table 2), long_term_delay=N, retrieve_impl=... A value of the wrong type or
out of range is an EvalError that names it.

What a request costs:
- loglikelihood: requests with the same context are scored together; the context goes through
  the model once and its continuations in batches from copies of its cache
  (`Harness.continuation_scores`).
- loglikelihood_rolling: a document is one row with no windows (the Memory Mosaics read any
  length through the decode cache), its first token predicted from the prefix token.
- generate_until: prompts in batches padded to one width, greedy unless do_sample; a stop
  sequence of one token ends its row in the decode loop, and the text is looked at every
  CHECK_EVERY new tokens: the batch ends once every row has a stop sequence. The text is cut
  before the first.

With max_length, inputs are cut to it as lm-eval's Hugging Face model does: contexts keep their
last tokens, documents go in lm-eval's rolling windows of max_length tokens.

The prefix token: lm-eval conditions an empty context, and a document's first token, on
`prefix_token_id` (a BOS or end-of-text token); so do we a context of only whitespace, which
lm-eval leaves without tokens when it moves a context's trailing whitespace to the continuation.
Our char and byte tokenizers have none. It is the run's end-of-text id (the eot_id of its data
config, which a training workdir keeps; eot_id= in model_args for an export), else the newline
token: the text files these models read are lines, and p(x | "\\n") is the model's distribution
of a line's first token. A tokenizer without a one-token newline and a run without eot_id refuse
such requests (EvalError). Generation also stops at the end-of-text id when the run has one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from mosaics_jax import config as config_lib
from mosaics_jax.eval import harness as harness_lib
from mosaics_jax.inference import generate as generate_lib, sampling as sampling_lib

try:
  import lm_eval.__main__ as lm_eval_main
  from lm_eval import utils as lm_utils
  from lm_eval.api import instance as instance_lib, model as model_api, registry
  from lm_eval.models import utils as model_utils
except ImportError as e:
  raise ImportError(
      "mosaics_jax.eval.lm_harness needs lm-evaluation-harness: pip install 'mosaics-jax[eval]'"
  ) from e

EvalError = harness_lib.EvalError
# New tokens per dispatch of the decode loop while stop sequences are looked for in the text.
CHECK_EVERY = 32
# The gen_kwargs of lm-eval tasks that generation reads (after `normalize_gen_kwargs`).
GEN_KWARGS = frozenset({"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"})
# The types of the model_args that are integers (None: the default; text: lm-eval's --batch_size).
INT_ARGS = {
    "batch_size": (int, str),
    "chunk": int,
    "max_length": (int, type(None)),
    "max_gen_toks": int,
    "eot_id": (int, type(None)),
    "seed": int,
}


@dataclasses.dataclass(frozen=True)
class _Generation:
  """The settings of a group of generation requests: one decode loop serves them all."""

  until: tuple[str, ...]
  max_gen_toks: int
  sampling: sampling_lib.Sampling


@registry.register_model("mosaics")
class MosaicsLM(model_api.TemplateLM):
  """A Memory Mosaic (or Llama) of this project as an lm-eval model (module docstring)."""

  def __init__(
      self,
      path: str | os.PathLike,
      batch_size: int | str = 8,
      chunk: int = 512,
      max_length: int | None = None,
      max_gen_toks: int = 256,
      eot_id: int | None = None,
      seed: int = 0,
      device: str | None = None,
      **model_overrides: Any,
  ):
    """Raises EvalError for a model without a tokenizer (a run on token ids), an override that
    would change the parameters, or a bad batch_size, chunk, max_length, max_gen_toks or seed."""
    super().__init__()
    del device  # lm-eval's command line always passes one; JAX places the model on its devices.
    for name, value in (
        ("chunk", chunk),
        ("max_length", max_length),
        ("max_gen_toks", max_gen_toks),
    ):
      if value is not None and value < 1:
        raise EvalError(f"{name} must be >= 1, got {value}")
    if not 0 <= seed < config_lib.SEED_LIMIT:
      raise EvalError(f"seed must be in [0, 2**32), got {seed}")
    self.harness = harness_lib.Harness.load(
        str(path),
        model_overrides=[f"{key}={_text(value)}" for key, value in model_overrides.items()],
        batch_size=_batch_size(batch_size),
        chunk=chunk,
        seed=seed,
        progress=False,
    )
    self._tokenizer = self.harness.tokenizer
    if eot_id is None:
      eot_id = (self.harness.training_data or {}).get("eot_id")
    if eot_id is not None and not 0 <= eot_id < self.harness.model.config.vocab_size:
      raise EvalError(f"eot_id {eot_id} is outside the model's vocabulary")
    self._eot_id = eot_id
    self._prefix = eot_id if eot_id is not None else self._single_token("\n")
    self._max_length = max_length
    self._max_gen_toks = max_gen_toks

  @classmethod
  def create_from_arg_string(
      cls, arg_string: str, additional_config: dict[str, Any] | None = None
  ) -> MosaicsLM:
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(
      cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
  ) -> MosaicsLM:
    # lm-eval's command line passes batch_size and device to every model, given or not: the
    # model_args win (lm-eval's own merge would fail on a key given twice).
    given = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**_typed_args({**given, **arg_dict}))

  @property
  def eot_token_id(self) -> int:
    """The prefix token (module docstring)."""
    if self._prefix is None:
      raise EvalError(
          f"{self.harness.info.path} has no end-of-text id and its tokenizer no one-token newline:"
          " give eot_id=ID in model_args to condition empty contexts and documents on it"
      )
    return self._prefix

  @property
  def max_length(self) -> int | None:
    """The most tokens fed to the model at once; None: no limit (the module docstring)."""
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self.harness.batch_size

  @property
  def device(self) -> str:
    return jax.default_backend()

  def get_model_info(self) -> dict[str, Any]:
    """What lm-eval records of the model in its results: the path, step and overrides."""
    info = self.harness.info
    return {"model_path": info.path, "model_step": info.step, "model_overrides": info.overrides}

  def tok_encode(
      self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
  ) -> list[int]:
    del add_special_tokens, kwargs  # Our tokenizers add no special tokens.
    return self._tokenizer.encode(string).tolist()

  def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
    del kwargs  # Nothing is skipped: our tokenizers have no special tokens.
    return self._tokenizer.decode(list(tokens))

  def _loglikelihood_tokens(
      self,
      requests: Sequence[tuple[tuple[str, str], Sequence[int], Sequence[int]]],
      disable_tqdm: bool = False,
  ) -> list[tuple[float, bool]]:
    """Per (strings, context ids, continuation ids), (log p(continuation | context), whether
    greedy); an empty continuation has log-probability 0 and is greedy."""
    pairs = [
        self._truncate(*self._conditioned(list(context), list(continuation)))
        for _, context, continuation in requests
    ]
    if pairs:
      self.harness.check_length(max(len(c) + len(x) for c, x in pairs))
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
      by_context.setdefault(tuple(context), []).append(i)
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    with _bar(len(requests), "loglikelihood", disable_tqdm) as bar:
      for context, members in by_context.items():
        scored = [i for i in members if pairs[i][1]]
        if scored:
          scores = self.harness.continuation_scores(context, [pairs[i][1] for i in scored])
          for i, score in zip(scored, scores):
            out[i] = score
        for i in members:
          self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        bar.update(len(members))
    return out

  def _conditioned(
      self, context: list[int], continuation: list[int]
  ) -> tuple[list[int], list[int]]:
    """A context of no tokens replaced as lm-eval replaces an empty one (module docstring): by the
    prefix token, or by the continuation's first token where that is the prefix token."""
    if context:
      return context, continuation
    if continuation[:1] == [self.prefix_token_id]:
      return continuation[:1], continuation[1:]
    return [self.prefix_token_id], continuation

  def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
    """The context cut so that context and continuation feed at most max_length tokens (the last
    continuation token is predicted, not fed)."""
    if self._max_length is None:
      return context, continuation
    if len(continuation) > self._max_length:
      raise EvalError(
          f"a continuation of {len(continuation)} tokens does not fit max_length"
          f" {self._max_length} with a token of context"
      )
    return context[-(self._max_length + 1 - len(continuation)) :], continuation

  def loglikelihood_rolling(
      self, requests: Sequence[instance_lib.Instance], disable_tqdm: bool = False
  ) -> list[float]:
    """Per document, its log-likelihood: every token predicted once, the first from the prefix
    token; one row unless max_length asks for lm-eval's rolling windows."""
    windows = []  # (document, context and predicted tokens, number predicted)
    for i, (text,) in enumerate(request.args for request in requests):
      tokens = self.tok_encode(text)
      for context, predicted in map(
          lm_utils.make_disjoint_window,
          lm_utils.get_rolling_token_windows(
              tokens, self.prefix_token_id, self._max_length or max(len(tokens), 1), 1
          ),
      ):
        windows.append((i, context + predicted, len(predicted)))
    if windows:
      self.harness.check_length(max(len(row) for _, row, _ in windows))
    # Longest first: a batch's rows are of close lengths, and each pads to its longest.
    windows.sort(key=lambda window: -len(window[1]))
    totals = [0.0] * len(requests)
    with _bar(len(windows), "loglikelihood_rolling", disable_tqdm) as bar:
      for start in range(0, len(windows), self.batch_size):
        batch = windows[start : start + self.batch_size]
        losses = self.harness.token_losses([np.asarray(row, np.int32) for _, row, _ in batch])
        for (i, _, predicted), loss in zip(batch, losses):
          totals[i] -= float(loss[-predicted:].sum(dtype=np.float64))
        bar.update(len(batch))
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(
      self, requests: Sequence[instance_lib.Instance], disable_tqdm: bool = False
  ) -> list[str]:
    """Per (context, gen_kwargs), the generated text cut before its first stop sequence."""
    groups: dict[_Generation, list[int]] = {}
    prompts = []
    for i, (context, gen_kwargs) in enumerate(request.args for request in requests):
      setting = self._generation(gen_kwargs)
      groups.setdefault(setting, []).append(i)
      prompt = self.tok_encode(context) or [self.prefix_token_id]
      if self._max_length is not None:
        if setting.max_gen_toks >= self._max_length:
          raise EvalError(
              f"max_gen_toks {setting.max_gen_toks} leaves no prompt in max_length"
              f" {self._max_length}"
          )
        prompt = prompt[-(self._max_length - setting.max_gen_toks) :]
      prompts.append(prompt)
    out = [""] * len(requests)
    with _bar(len(requests), "generate_until", disable_tqdm) as bar:
      for setting, members in groups.items():
        members.sort(key=lambda i: -len(prompts[i]))  # Close lengths share a batch.
        for start in range(0, len(members), self.batch_size):
          batch = members[start : start + self.batch_size]
          texts = self._generate([prompts[i] for i in batch], setting, seed_offset=start)
          for i, text in zip(batch, texts):
            out[i] = text
            self.cache_hook.add_partial("generate_until", requests[i].args, text)
          bar.update(len(batch))
    return out

  def _generation(self, gen_kwargs: dict[str, Any]) -> _Generation:
    """The generation settings of a request's gen_kwargs; EvalError naming any we do not read."""
    kwargs = model_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    unread = sorted(set(kwargs) - GEN_KWARGS)
    if unread:
      raise EvalError(f"gen_kwargs {unread} are not supported (only {sorted(GEN_KWARGS)})")
    eot = None if self._eot_id is None else self.tok_decode([self._eot_id])
    until = model_utils.handle_stop_sequences(kwargs["until"], eos=eot)
    temperature = kwargs["temperature"] if kwargs["do_sample"] else 0.0
    return _Generation(
        tuple(s for s in until if s),  # An empty stop sequence stops nothing (as in lm-eval).
        kwargs["max_gen_toks"],
        sampling_lib.Sampling(temperature, kwargs.get("top_k"), kwargs.get("top_p")),
    )

  def _generate(
      self, prompts: list[list[int]], setting: _Generation, seed_offset: int
  ) -> list[str]:
    """The texts of up to batch_size prompts, padded to batch_size rows of one bucketed width
    (so that prompts of many lengths share a compiled prefill). Sampling draws from the seed plus
    `seed_offset`: each batch its own samples."""
    longest = max(len(p) for p in prompts)
    width = max(16, 1 << (longest - 1).bit_length())
    max_len = self.harness.scorer.capacity(width + setting.max_gen_toks)
    self.harness.check_length(longest + setting.max_gen_toks)
    # A stop sequence of one token ends its row in the decode loop. Every stop sequence is also
    # looked for in the text between dispatches: a tokenizer may spell it with other tokens.
    stop_tokens = {self._single_token(s) for s in setting.until} | {self._eot_id}
    stop_tokens.discard(None)
    parts = self.harness.generator.stream(
        self.harness.model.params,
        prompts + [prompts[0]] * (self.batch_size - len(prompts)),
        setting.max_gen_toks,
        sampling=setting.sampling,
        seed=self.harness.seed + seed_offset,
        stop_tokens=sorted(stop_tokens),
        max_len=max_len,
        chunk=CHECK_EVERY if setting.until else None,
        width=width,
    )
    rows: list[list[int]] = [[] for _ in prompts]
    for part in parts:
      for row, new in zip(rows, part):
        row.extend(new[new != generate_lib.PAD].tolist())
      if setting.until and all(
          any(s in self.tok_decode(row) for s in setting.until) or generate_lib.PAD in part[i]
          for i, row in enumerate(rows)
      ):
        parts.close()
        break
    return [
        model_utils.postprocess_generated_text(self.tok_decode(row), list(setting.until), None)
        for row in rows
    ]

  def _single_token(self, text: str) -> int | None:
    """The id of the one token that is `text`, else None."""
    try:
      ids = self._tokenizer.encode(text)
    except ValueError:  # Characters outside a char tokenizer's vocabulary.
      return None
    if len(ids) == 1 and self._tokenizer.decode(ids) == text:
      return int(ids[0])
    return None


def command_line(argv: Sequence[str] | None = None) -> int:
  """lm-eval's command line (`lm_eval`) with `--model mosaics` known; argv without the program
  name, default sys.argv's. EvalError for a --seed outside [0, 2**32), which numpy would refuse
  with a traceback once lm-eval seeds it."""
  saved = sys.argv
  # lm-eval's command line reads sys.argv itself.
  sys.argv = ["mosaics-lm-eval", *(saved[1:] if argv is None else argv)]
  try:
    # `lm_eval_main.cli_evaluate`, with the seeds checked between parsing and running.
    lm_eval_main.setup_logging()
    parser = lm_eval_main.HarnessCLI()
    args = parser.parse_args()
    seeds = [s for s in getattr(args, "seed", None) or () if s is not None]
    bad = [s for s in seeds if not 0 <= s < config_lib.SEED_LIMIT]
    if bad:
      raise EvalError(f"--seed must be in [0, 2**32), got {bad[0]}")
    parser.execute(args)
  finally:
    sys.argv = saved
  return 0


def _typed_args(args: dict[str, Any]) -> dict[str, Any]:
  """model_args with the integers as ints; EvalError naming one of the wrong type. lm-eval types
  each value by its text: a number (its command line reads -1 and 1e3 as floats), true/false,
  none, else text."""
  path = args.get("path")
  if path is None:
    raise EvalError("model_args needs path=RUN (a training workdir or an export)")
  if not isinstance(path, str):
    raise EvalError(
        f"model_args path must be text, got {path!r}: quote a path that lm-eval reads as a number"
        " or a boolean (path='2024')"
    )
  typed = dict(args)
  for name, types in INT_ARGS.items():
    value = args.get(name)
    if isinstance(value, float) and value.is_integer():
      typed[name] = int(value)
    elif name in args and (isinstance(value, bool) or not isinstance(value, types)):
      raise EvalError(f"model_args {name} must be an integer, got {value!r}")
  return typed


def _batch_size(value: int | str) -> int:
  """lm-eval's batch_size (an int, or its text from the command line) as rows per batch."""
  try:
    rows = int(value)
  except ValueError:
    raise EvalError(
        f"batch_size must be a number of rows, got {value!r} (lm-eval's auto batch size is not"
        " supported)"
    ) from None
  if rows < 1:
    raise EvalError(f"batch_size must be >= 1, got {rows}")
  return rows


def _text(value: Any) -> str:
  """A model_args value (typed by lm-eval) as the text of a model override (JSON but for text)."""
  return value if isinstance(value, str) else json.dumps(value)


def _bar(total: int, description: str, disable: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, desc=description, disable=disable, file=sys.stderr)
