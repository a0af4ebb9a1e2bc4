"""Trained models from disk: `mosaics_jax.load(path)`, and the exported directory format.

`load` reads either
- a training workdir (`config.json` + `checkpoints/`): the newest readable Orbax checkpoint; or
- an exported directory (`config.json` + `model.safetensors`), which `save_exported` and
  `mosaics-port` write. Its safetensors metadata says the layout: "flax" (our parameter paths
  joined with "/", Flax shapes: what `save_exported` writes) or "pytorch" (the names and shapes of
  `mosaics_jax.port.layout`, what `mosaics-port to-safetensors` writes). A file without that
  metadata, such as a PyTorch state dict saved with `safetensors.torch.save_model`, is read as
  "pytorch".

    model = mosaics_jax.load("runs/quickstart")
    logits = model.logits(tokens)     # int [batch, seq] -> numpy float32 [batch, seq, vocab]
    losses = model.token_losses(rows) # token-id rows of any lengths -> per-token losses

The exported `config.json` is `{"model": {"family": ..., fields...}, "step": N}`; "step" is the
training step the weights come from, or null. A directory that is both a workdir and an export is
refused: which model it means is unknown.

Weights are read as float32, the parameters' dtype, from float16, bfloat16 or float64 too (said
in one warning); other dtypes, NaN and infinities are refused naming the tensors
(`allow_nonfinite` lets the latter through), and so is a file that is not valid safetensors.

An export never overwrites what it was not asked to (`check_output`): it goes into a new or empty
directory or, forced, replaces the export files (`EXPORT_FILES`) of a non-empty one and leaves its
other files; never into a training workdir, nor, given its source, into the source, a directory
inside it or one that holds it. Its files are written in a temporary sibling and renamed into
place, so a failure leaves no half-written export, with the mode of any new file (0666 less the
umask).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

from mosaics_jax import checkpoints, config as config_lib, sharding, tokenizers
from mosaics_jax.inference import (
    generate as generate_lib,
    prefill as prefill_lib,
    sampling as sampling_lib,
    score as score_lib,
)
from mosaics_jax.model import families, lm
from mosaics_jax.port import layout as layout_lib

WEIGHTS_FILE = "model.safetensors"
LAYOUTS = ("flax", "pytorch")
# What an export writes; a forced export replaces these and no other file.
EXPORT_FILES = (WEIGHTS_FILE, *tokenizers.FILES, checkpoints.CONFIG_FILE)
# What marks a training workdir, which no export may write into (the lock: a run that started).
_RUN_MARKS = (checkpoints.CHECKPOINTS_DIR, checkpoints.UNREADABLE_DIR, checkpoints.LOCK_FILE)


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A model with its weights: `logits(tokens)` scores tokens, `generate(prompts, n)` continues
  them; with the run's tokenizer, `encode`, `decode` and `generate_text` work on text."""

  config: config_lib.ModelConfig
  model: flax.linen.Module
  params: layout_lib.Params
  step: int | None  # The training step of the weights, when known.
  tokenizer: tokenizers.Tokenizer | None = None  # None for a run on token ids.

  @functools.cached_property
  def _apply(self):
    return jax.jit(self.model.apply)

  def logits(
      self,
      tokens: Int[np.ndarray, "b t"] | jax.Array,
      segment_ids: Int[np.ndarray, "b t"] | jax.Array | None = None,
      **model_kwargs: Any,
  ) -> Float[np.ndarray, "b t v"]:
    """Logits of int tokens [batch, seq] as numpy; `model_kwargs` go to the model (ltm_delay).

    Raises:
      ValueError: tokens or segment ids of the wrong shape or type, a token id outside the
        vocabulary (its row and position named), or rows longer than the model's longest input.
    """
    # Checked here, where the values are known (under jit the model sees only shapes).
    tokens, segment_ids = lm.check_inputs(
        tokens, segment_ids, families.of(self.config).max_length(self.config)
    )
    for i, row in enumerate(np.asarray(tokens)):
      prefill_lib.check_token_ids(row, self.config.vocab_size, f"row {i} of the tokens")
    return np.asarray(self._apply({"params": self.params}, tokens, segment_ids, **model_kwargs))

  @functools.cached_property
  def _scorer(self) -> score_lib.Scorer:
    return score_lib.Scorer(self.model)

  def token_losses(self, rows: score_lib.Rows) -> list[Float[np.ndarray, " t"]]:
    """Per row of token ids (any lengths, each >= 2), the losses -log p(row[i + 1] | row[: i +
    1]) in nats: in chunks through the decode cache, so no length limit (v1's block_size
    included) and one compilation per bucket of lengths (`inference.score`)."""
    return self._scorer.token_losses(self.params, rows)

  @functools.cached_property
  def _generator(self) -> generate_lib.Generator:
    return generate_lib.Generator(self.model)

  def generate(
      self,
      prompts: generate_lib.Prompts,
      max_new_tokens: int,
      *,
      temperature: float = 0.0,
      top_k: int | None = None,
      top_p: float | None = None,
      seed: int = 0,
      stop_tokens: Sequence[int] | None = None,
      max_len: int | None = None,
  ) -> list[list[int]]:
    """The new tokens of each prompt (token-id lists of any lengths, or an int array [batch,
    seq]), each row ending after its first stop token (included) or `max_new_tokens`.
    Temperature 0 is greedy; see `inference.generate.Generator` for the rest."""
    sampling = sampling_lib.Sampling(temperature, top_k, top_p)
    return self._generator(
        self.params,
        prompts,
        max_new_tokens,
        sampling=sampling,
        seed=seed,
        stop_tokens=tuple(stop_tokens or ()),
        max_len=max_len,
    )

  def encode(self, text: str) -> list[int]:
    """The token ids of `text` with the run's tokenizer."""
    return self._tokenizer().encode(text).tolist()

  def decode(self, ids: Sequence[int]) -> str:
    """The text of token ids with the run's tokenizer."""
    return self._tokenizer().decode(list(ids))

  def generate_text(
      self, prompt: str | Sequence[str], max_new_tokens: int, **sampling: Any
  ) -> str | list[str]:
    """The text that follows `prompt` (or each prompt of a list); `sampling` as for `generate`."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    new = self.generate([self.encode(p) for p in prompts], max_new_tokens, **sampling)
    texts = [self.decode(ids) for ids in new]
    return texts[0] if isinstance(prompt, str) else texts

  def _tokenizer(self) -> tokenizers.Tokenizer:
    if self.tokenizer is None:
      raise ValueError(
          "this model has no tokenizer (it was trained on token ids, or exported without one):"
          " give token ids to `generate`"
      )
    return self.tokenizer


def load(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> Pretrained:
  """The model in a training workdir or an exported directory (module docstring).

  Nothing in `path` is written, moved or deleted: it may be read-only. A corrupt newest checkpoint
  of a workdir is warned of and the one before it read. An export's NaN or infinite weights are
  refused unless `allow_nonfinite`.

  Raises:
    FileNotFoundError: `path` is neither a workdir nor an export.
    PortError: its config, weights or tokenizer do not describe a model this project can build
      here, or it is both a workdir and an export.
    ConfigError: a config field of the wrong type or range.
  """
  path = pathlib.Path(path).absolute()  # Orbax wants absolute paths.
  config_path = path / checkpoints.CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"{path} has no {checkpoints.CONFIG_FILE}: not a workdir or an export")
  try:
    saved = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise layout_lib.PortError(f"{config_path} is not JSON: {e}") from None
  if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
    raise layout_lib.PortError(f'{config_path} has no model config (a "model" object)')
  config = config_lib.from_dict(config_lib.ModelConfig, saved["model"])
  _check_fits(config, config_path)
  if (path / WEIGHTS_FILE).is_file() and (path / checkpoints.CHECKPOINTS_DIR).is_dir():
    raise layout_lib.PortError(
        f"{path} is both a training workdir ({checkpoints.CHECKPOINTS_DIR}/) and an export"
        f" ({WEIGHTS_FILE}): which model it means is unknown; move one of them elsewhere"
    )
  try:
    tokenizer = tokenizers.load(path)
  except ValueError as e:  # A tokenizer.json this project did not write; the message names it.
    raise layout_lib.PortError(str(e)) from None
  if (path / WEIGHTS_FILE).is_file():
    params = _read_weights(config, path / WEIGHTS_FILE, allow_nonfinite=allow_nonfinite)
    step = saved.get("step")
  elif (path / "checkpoints").is_dir():
    step, params = _restore_params(path / "checkpoints")
  else:
    raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor checkpoints/")
  return Pretrained(
      config=config,
      model=families.build_model(config),
      # Exports hold unrolled layers; a checkpoint those its run had.
      params=families.to_layout(params, config),
      step=step,
      tokenizer=tokenizer,
  )


def _check_fits(config: config_lib.ModelConfig, source: pathlib.Path) -> None:
  """Refuses a model whose float32 parameters alone exceed the memory here, before any is made."""
  params = families.param_count(config)
  available = sharding.memory_available()
  if params * 4 > available:
    raise layout_lib.PortError(
        f"{source} describes a {config.family} model of {params:,} parameters"
        f" ({params * 4 / 2**30:,.1f} GiB in float32), more than the {available / 2**30:,.1f} GiB"
        " of memory here"
    )


def _restore_params(directory: pathlib.Path) -> tuple[int, layout_lib.Params]:
  # No template: Orbax restores the saved tree as it is, and only the params are kept.
  ckpts = checkpoints.Checkpoints(directory, keep=1, read_only=True)
  try:
    restored = ckpts.restore_latest(None)
  finally:
    ckpts.close()
  if restored is None:
    raise FileNotFoundError(
        f"{directory} holds no checkpoint yet: a run saves its first one at step"
        " train.checkpoint_every, or when it stops"
    )
  step, state, _ = restored
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state["params"])
  return step, params


def _read_weights(
    config: config_lib.ModelConfig, path: pathlib.Path, *, allow_nonfinite: bool
) -> layout_lib.Params:
  layout, tensors = read_safetensors(path)
  if layout in (None, "pytorch"):
    params = layout_lib.from_torch(
        config, tensors, source=str(path), allow_nonfinite=allow_nonfinite
    )
    return jax.tree.map(jnp.asarray, params)
  if layout != "flax":
    raise layout_lib.PortError(
        f"{path}: unknown layout {layout!r} in its metadata; known: {LAYOUTS}"
    )
  expected = {"/".join(p): s for p, s in layout_lib.param_shapes(config).items()}
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  misshaped = sorted(
      f"{n}: {tensors[n].shape}, expected {s}"
      for n, s in expected.items()
      if n in tensors and tensors[n].shape != s
  )
  if missing or unexpected or misshaped:
    raise layout_lib.PortError(
        f"{path} does not fit its {config.family} config: missing {missing}, unexpected"
        f" {unexpected}, mis-shaped {misshaped}"
    )
  tensors = layout_lib.as_float32(tensors, str(path), allow_nonfinite=allow_nonfinite)
  flat = {tuple(n.split("/")): jnp.asarray(x) for n, x in tensors.items()}
  return flax.traverse_util.unflatten_dict(flat)


def read_safetensors(
    path: pathlib.Path, *, skip: Collection[str] = ()
) -> tuple[str | None, dict[str, np.ndarray]]:
  """The layout in the metadata of a safetensors file, and its tensors but those named in `skip`
  (e.g. a PyTorch module's buffers, which the parameters do not need), as they are stored.

  Raises PortError for a file that is not valid safetensors (the library checks the header, the
  offsets and the length), or that holds a tensor whose dtype is not in `layout.FLOAT_DTYPES`.
  """
  import safetensors  # pylint: disable=import-outside-toplevel

  try:
    with safetensors.safe_open(path, framework="np") as f:
      layout = (f.metadata() or {}).get("layout")
    # Raw bytes: the numpy loader of older safetensors refuses bfloat16, which numpy lacks.
    stored = [(n, t) for n, t in safetensors.deserialize(path.read_bytes()) if n not in skip]
  except safetensors.SafetensorError as e:
    raise layout_lib.PortError(f"{path} is not a valid safetensors file: {e}") from None
  wrong = sorted(
      f"{n}: {t['dtype']}" for n, t in stored if t["dtype"] not in layout_lib.FLOAT_DTYPES
  )
  if wrong:
    raise layout_lib.PortError(
        f"{path}: weights must be float16 (F16), bfloat16 (BF16), float32 (F32) or float64 (F64),"
        f" got {', '.join(wrong)}"
    )
  return layout, {
      n: np.frombuffer(t["data"], layout_lib.FLOAT_DTYPES[t["dtype"]]).reshape(t["shape"])
      for n, t in stored
  }


def check_output(
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    force: bool = False,
    file: bool = False,
) -> None:
  """Raises PortError unless an export may be written at `path` (module docstring): a directory,
  or with `file` a file, that `source` (what the export reads, when given) neither is, holds nor
  lies in. A file's directory must exist; a directory is made with its parents."""
  target = pathlib.Path(path).resolve()
  if source is not None:
    origin = pathlib.Path(source).resolve()
    if target == origin or origin in target.parents or target in origin.parents:
      raise layout_lib.PortError(
          f"{path} is, holds or lies in the source {source}: an export never writes into what it"
          " reads; give another output"
      )
  if file:
    if target.is_dir():
      raise layout_lib.PortError(f"{path} is a directory: give the name of a file")
    if not target.parent.is_dir():
      raise layout_lib.PortError(f"{path}: no directory {target.parent}")
    if target.exists() and not force:
      raise layout_lib.PortError(f"{path} exists: force (--force) replaces it")
    return
  if target.exists() and not target.is_dir():
    raise layout_lib.PortError(f"{path} is a file, not a directory")
  marks = [m for m in _RUN_MARKS if (target / m).exists()]
  if marks:
    raise layout_lib.PortError(
        f"{path} is a training workdir (it has {', '.join(marks)}): an export never goes into one,"
        " forced or not; give a new directory"
    )
  if target.is_dir() and any(target.iterdir()) and not force:
    raise layout_lib.PortError(
        f"{path} is not empty: an export goes into a new or empty directory; force (--force)"
        f" replaces its {', '.join(EXPORT_FILES)} and leaves its other files"
    )


def write_file(path: str | os.PathLike, write: Callable[[pathlib.Path], object]) -> None:
  """Writes the file `path` by `write(name)` into a temporary sibling renamed to `path` when
  complete, so that a failure leaves no half-written file."""
  path = pathlib.Path(path)
  partial = _partial(path)
  try:
    write(partial)
    partial.replace(path)
  finally:
    partial.unlink(missing_ok=True)


def _partial(path: pathlib.Path) -> pathlib.Path:
  """A new name next to `path` for what becomes `path` when complete."""
  return path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}")


def save_exported(
    directory: str | os.PathLike,
    config: config_lib.ModelConfig,
    params: layout_lib.Params,
    *,
    step: int | None = None,
    layout: str = "flax",
    tokenizer: tokenizers.Tokenizer | None = None,
    force: bool = False,
) -> pathlib.Path:
  """Writes an exported directory that `load` reads; `layout` is "flax" or "pytorch".

  The directory is new or empty, or with `force` its export files are replaced (`check_output`,
  which raises PortError otherwise); a failure leaves it as it was.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel

  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  directory = pathlib.Path(directory)
  check_output(directory, force=force)
  if layout == "pytorch":
    tensors = layout_lib.to_torch(config, params)
  else:
    # Layers unrolled, as model.scan_layers may say either: one file layout for both.
    unrolled = families.to_layout(flax.core.meta.unbox(params), layout_lib.unroll(config))
    flat = flax.traverse_util.flatten_dict(unrolled)
    tensors = {"/".join(p): np.ascontiguousarray(x, np.float32) for p, x in flat.items()}
  model = {"family": config.family, **config_lib.to_dict(config)}
  text = json.dumps({"model": model, "step": step}, indent=2) + "\n"
  with staging(directory) as staged:
    (staged / checkpoints.CONFIG_FILE).write_text(text)
    st_numpy.save_file(tensors, staged / WEIGHTS_FILE, metadata={"layout": layout})
    # safetensors makes its file 0600: give it the mode of a file made the usual way.
    (staged / WEIGHTS_FILE).chmod((staged / checkpoints.CONFIG_FILE).stat().st_mode)
    if tokenizer is not None:
      tokenizers.save(tokenizer, staged)
  return directory


@contextlib.contextmanager
def staging(directory: pathlib.Path, files: Sequence[str] = EXPORT_FILES) -> Iterator[pathlib.Path]:
  """A new directory next to `directory` for an export's files, which go into `directory` when
  the block ends without an error: renamed into place if `directory` does not exist, else
  (forced) each replacing its namesake, config.json last, and those of `files` that the new export
  lacks deleted (a tokenizer of the replaced export). The staging directory never stays."""
  directory.parent.mkdir(parents=True, exist_ok=True)
  staged = _partial(directory)
  staged.mkdir()
  try:
    yield staged
    if not directory.exists():
      staged.rename(directory)
      return
    names = sorted((p.name for p in staged.iterdir()), key=lambda n: n == checkpoints.CONFIG_FILE)
    for name in names:
      (staged / name).replace(directory / name)
    for name in set(files) - set(names):
      (directory / name).unlink(missing_ok=True)
  finally:
    shutil.rmtree(staged, ignore_errors=True)
