"""nanoGPT checkpoints (nanoMosaics' `train.py`, model_type "gpt") <-> our gpt2 config and params.

`from_nanogpt` reads the dict that `torch.load(..., weights_only=True)` gives; `to_nanogpt` gives
the dict that train.py saves and resumes from. Tensor names and layouts are
`mosaics_jax.model.gpt2`'s (`GPT2Family.torch_name`), plus the tied `lm_head.weight`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mosaics_jax import config as config_lib
from mosaics_jax.port import layout

# GPTConfig field -> GPT2Config field. train.py writes all of these.
_NANO_ARGS = {
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_embd": "width",
    "vocab_size": "vocab_size",
    "block_size": "block_size",
    "bias": "bias",
    "dropout": "dropout",
}
_NANO_OPTIONAL = {"dropout"}
# Fields whose values nanoGPT hard-codes: other values cannot be exported.
_NANO_FIXED = {"layer_norm_eps": 1e-5}


def config_from_model_args(model_args: Mapping[str, Any]) -> config_lib.GPT2Config:
  """The GPT2Config of a nanoGPT `model_args` dict; unknown or missing args are errors."""
  unknown = sorted(set(model_args) - set(_NANO_ARGS) - _NANO_OPTIONAL)
  missing = sorted(set(_NANO_ARGS) - _NANO_OPTIONAL - set(model_args))
  if unknown or missing:
    hint = (
        " (a nanoMosaics MemoryMosaic checkpoint? use --format nanomosaics)"
        if {"pmem_size", "pmem_count"} & set(unknown)
        else ""
    )
    raise layout.PortError(
        f"model_args do not describe a nanoGPT GPT: unknown {unknown}, missing {missing}{hint}"
    )
  kwargs = {ours: model_args[theirs] for theirs, ours in _NANO_ARGS.items() if theirs in model_args}
  try:
    return config_lib.GPT2Config(**kwargs)
  except config_lib.ConfigError as e:
    raise layout.PortError(f"model_args {dict(model_args)}: {e}") from None


def model_args(config: config_lib.ModelConfig) -> dict[str, Any]:
  """nanoGPT's `model_args` of a GPT2Config; PortError if nanoGPT cannot express it."""
  return export_args(config, "nanogpt", "gpt2", "GPT-2", "nanoGPT", _NANO_FIXED, _NANO_ARGS)


def export_args(
    config: config_lib.ModelConfig,
    format_name: str,
    family: str,
    described: str,
    code: str,
    fixed: Mapping[str, Any],
    args: Mapping[str, str],
) -> dict[str, Any]:
  """The constructor arguments (`args`: their name -> our field) of `config` for the `code` base,
  whose `format_name` holds `family` models (`described` in words). PortError for a model of
  another family, or a field that `code` hard-codes (`fixed`) to another value."""
  if config.family != family:
    raise layout.PortError(
        f"the {format_name} format holds {described} ({family}) models, this one is"
        f" {config.family}: use"
        " `mosaics-port to-safetensors`"
    )
  differing = {
      field: getattr(config, field)
      for field, value in fixed.items()
      if not np.allclose(getattr(config, field), value, rtol=1e-9, atol=0)
  }
  if differing:
    raise layout.PortError(f"{code} hard-codes these fields to other values: {differing}")
  return {theirs: getattr(config, ours) for theirs, ours in args.items()}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """What a nanoGPT-style checkpoint holds that a Flax model needs."""

  config: config_lib.ModelConfig
  params: layout.Params
  iter_num: int | None
  best_val_loss: float | None


def from_nanogpt(checkpoint: Mapping[str, Any], *, allow_nonfinite: bool = False) -> Checkpoint:
  """Reads the dict of a nanoGPT `ckpt.pt` (torch tensors) into our config and params; NaN or
  infinite weights are refused by name unless `allow_nonfinite` (`layout.as_float32`)."""
  return read_checkpoint(checkpoint, config_from_model_args, "nanoGPT", allow_nonfinite)


def read_checkpoint(
    checkpoint: Mapping[str, Any],
    config_of: Callable[[Mapping[str, Any]], config_lib.ModelConfig],
    code: str,
    allow_nonfinite: bool,
) -> Checkpoint:
  """Reads a checkpoint dict of nanoGPT's train.py layout (`model`: a state dict of torch
  tensors; `model_args`: what `config_of` turns into our config; `iter_num`, `best_val_loss`)
  written by the `code` base."""
  for key in ("model", "model_args"):
    if key not in checkpoint:
      raise layout.PortError(
          f"not a {code} checkpoint: no {key!r} entry (it has {sorted(checkpoint)})"
      )
  config = config_of(checkpoint["model_args"])
  state = checkpoint["model"]
  if not isinstance(state, Mapping):
    raise layout.PortError(f"the checkpoint's model entry is a {type(state).__name__}, not a dict")
  not_tensors = sorted(f"{n}: {type(x).__name__}" for n, x in state.items() if not _is_tensor(x))
  if not_tensors:
    raise layout.PortError(
        f"the checkpoint's model holds values that are not tensors: {not_tensors}"
    )
  # torch gives no numpy bfloat16: through float32 and back (exact), so that `as_float32` says the
  # cast; other dtypes keep theirs, to be converted or named.
  bfloat16 = layout.FLOAT_DTYPES["BF16"]
  state = {
      n: x.detach().float().numpy().astype(bfloat16)
      if str(x.dtype) == "torch.bfloat16"
      else x.detach().numpy()
      for n, x in state.items()
  }
  params = layout.from_torch(config, state, allow_nonfinite=allow_nonfinite)
  best = checkpoint.get("best_val_loss")
  return Checkpoint(
      config=config,
      params=params,
      iter_num=checkpoint.get("iter_num"),
      best_val_loss=None if best is None else float(best),
  )


def _is_tensor(x: Any) -> bool:
  """Whether `x` is a torch tensor (torch is imported only where a checkpoint is)."""
  return all(hasattr(x, attribute) for attribute in ("detach", "is_floating_point", "numpy"))


def to_nanogpt(
    config: config_lib.ModelConfig,
    params: layout.Params,
    *,
    iter_num: int = 0,
    best_val_loss: float = 1e9,
    learning_rate: float = 6e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
) -> dict[str, Any]:
  """The dict nanoGPT's train.py saves and resumes from (`torch.save` it as ckpt.pt).

  `model` is the state dict of nanoGPT's `GPT` (`torch_models.GPT2`, the same names, the tied
  `lm_head.weight` included); the optimizer entry is a fresh AdamW state (no moments yet) grouped as
  `GPT.configure_optimizers` groups parameters (matrices decay, vectors do not), because
  train.py's resume reads it; the Adam moments restart from zero. best_val_loss defaults to
  train.py's own starting value.
  """
  import torch  # pylint: disable=import-outside-toplevel

  from mosaics_jax.port import torch_models  # pylint: disable=import-outside-toplevel

  args = model_args(config)
  module = torch_models.build(config)
  torch_models.load_weights(
      module, {name: torch.tensor(x) for name, x in layout.to_torch(config, params).items()}
  )
  # GPT.configure_optimizers: matrices decay, vectors do not.
  named = list(module.named_parameters())
  groups = [
      {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
      {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
  ]
  optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
  return {
      "model": module.state_dict(),
      "optimizer": optimizer.state_dict(),
      "model_args": args,
      "iter_num": iter_num,
      "best_val_loss": best_val_loss,
      "config": {"model_type": "gpt", **args},
  }
