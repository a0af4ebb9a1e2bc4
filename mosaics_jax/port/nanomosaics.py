"""nanoMosaics checkpoints (the official v1 code's `ckpt.pt`) <-> our mm1 config and params.

`from_nanomosaics` reads the dict that `torch.load(..., weights_only=True)` gives; `to_nanomosaics`
gives the dict that nanoMosaics' `train.py` saves and resumes from. Tensor names and layouts are
`mosaics_jax.model.mm1`'s (`MosaicV1Family.torch_name`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mosaics_jax import config as config_lib
from mosaics_jax.port import layout, nanogpt

# MemoryMosaicConfig field -> MosaicV1Config field. nanoMosaics' train.py writes all of these.
_NANO_ARGS = {
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_embd": "width",
    "vocab_size": "vocab_size",
    "block_size": "block_size",
    "bias": "bias",
    "pmem_size": "pmem_size",
    "pmem_count": "pmem_count",
    "dropout": "dropout",
}
_NANO_OPTIONAL = {"dropout", "leaky_cuda"}  # leaky_cuda picks a CUDA kernel, not the numerics.
# Fields whose values nanoMosaics hard-codes: other values cannot be exported.
_NANO_FIXED = {
    "layer_norm_eps": 1e-5,
    "feature_eps": 1e-10,
    "exp_scaling": 10.0,
    "key_scale_max": math.log(2**16 - 1),
}


def config_from_model_args(model_args: Mapping[str, Any]) -> config_lib.MosaicV1Config:
  """The MosaicV1Config of a nanoMosaics `model_args` dict; unknown or missing args are errors."""
  unknown = sorted(set(model_args) - set(_NANO_ARGS) - _NANO_OPTIONAL)
  missing = sorted(set(_NANO_ARGS) - _NANO_OPTIONAL - set(model_args))
  if unknown or missing:
    hint = (
        " (a nanoMosaics GPT checkpoint? only MemoryMosaic checkpoints are Memory Mosaics)"
        if {"pmem_size", "pmem_count"} & set(missing)
        else ""
    )
    raise layout.PortError(
        f"model_args do not describe a nanoMosaics MemoryMosaic: unknown {unknown}, missing"
        f" {missing}{hint}"
    )
  kwargs = {ours: model_args[theirs] for theirs, ours in _NANO_ARGS.items() if theirs in model_args}
  try:
    return config_lib.MosaicV1Config(**kwargs)
  except config_lib.ConfigError as e:
    raise layout.PortError(f"model_args {dict(model_args)}: {e}") from None


def model_args(config: config_lib.ModelConfig) -> dict[str, Any]:
  """nanoMosaics' `model_args` of a MosaicV1Config; PortError if nanoMosaics cannot express it."""
  return nanogpt.export_args(
      config, "nanomosaics", "mm1", "Memory Mosaics v1", "nanoMosaics", _NANO_FIXED, _NANO_ARGS
  )


def from_nanomosaics(
    checkpoint: Mapping[str, Any], *, allow_nonfinite: bool = False
) -> nanogpt.Checkpoint:
  """Reads the dict of a nanoMosaics `ckpt.pt` (torch tensors) into our config and params; NaN
  or infinite weights are refused by name unless `allow_nonfinite` (`layout.as_float32`)."""
  return nanogpt.read_checkpoint(checkpoint, config_from_model_args, "nanoMosaics", allow_nonfinite)


def to_nanomosaics(
    config: config_lib.ModelConfig,
    params: layout.Params,
    *,
    iter_num: int = 0,
    best_val_loss: float = 1e9,
    learning_rate: float = 6e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
) -> dict[str, Any]:
  """The dict nanoMosaics' train.py saves and resumes from (`torch.save` it as ckpt.pt).

  The optimizer entry is a fresh AdamW state (no moments yet) grouped as nanoMosaics groups
  parameters, because train.py's resume reads it; the Adam moments restart from zero.
  best_val_loss defaults to train.py's own starting value.
  """
  import torch  # pylint: disable=import-outside-toplevel

  from mosaics_jax.port import torch_models  # pylint: disable=import-outside-toplevel

  args = model_args(config)
  module = torch_models.build(config)
  torch_models.load_weights(
      module, {name: torch.tensor(x) for name, x in layout.to_torch(config, params).items()}
  )
  # nanoMosaics' configure_optimizers: no weight decay on vectors and per-head scalars.
  no_decay = lambda p: p.dim() < 2 or tuple(p.shape[-2:]) == (1, 1)
  named = list(module.named_parameters())
  groups = [
      {"params": [p for _, p in named if not no_decay(p)], "weight_decay": weight_decay},
      {"params": [p for _, p in named if no_decay(p)], "weight_decay": 0.0},
  ]
  optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
  return {
      "model": module.state_dict(),
      "optimizer": optimizer.state_dict(),
      "model_args": args,
      "iter_num": iter_num,
      "best_val_loss": best_val_loss,
      "config": {"model_type": "mosaic", **args},
  }
