"""Library checkpoints (the official `Library/train_memory_mosaics.py`'s `ckpt.pt`) <-> our
mm1-library config and params.

`from_library` reads the dict that `torch.load(..., weights_only=True)` gives: `model` (the
`StackAssoMem` state dict), `model_args` (train.py's arguments, the constructor's among them),
`iter_num` and an `optimizer` that is not read. `to_library` gives such a dict, its `model` loadable
by `StackAssoMem.load_state_dict(strict=True)`. Tensor names and layouts are
`mosaics_jax.model.mm1_library`'s (`MosaicV1LibraryFamily.torch_name`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mosaics_jax import config as config_lib
from mosaics_jax.model import mm1_library
from mosaics_jax.port import layout, nanogpt

# StackAssoMem.__init__ argument -> MosaicV1LibraryConfig field, for arguments of the same meaning.
_ARGS = {
    "vocab_size": "vocab_size",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_embd": "width",
    **{
        name: name
        for name in (
            "v_shift",
            "block_size",
            "k_fe_type",
            "v_fe_type",
            "k_kernel_size",
            "v_kernel_size",
            "ic_dropout",
            "hd_dropout",
            "bias",
            "pmem_count",
            "pmem_size",
            "pre_ln",
            "weight_tying",
            "skip_tokens",
            "attn_only",
        )
    },
}
_REQUIRED = ("vocab_size",)  # The constructor's only argument without a default.
# train.py's argument that the model ignores, but whose other values mean another model.
_IGNORED_IF = {"att_shift": 0}
# Fields whose values StackAssoMem hard-codes: other values cannot be exported.
_FIXED = {
    "layer_norm_eps": 1e-5,
    "exp_scaling": 10.0,
    "kernel_beta_max": 5.0,
    "kernel_beta_init": 0.1,
    "value_beta_init": -0.05,
    "leaky_init": (0.5, 5.0),
}
_EMBEDDING, _HEAD = mm1_library.TIED_NAMES


def config_from_model_args(model_args: Mapping[str, Any]) -> config_lib.MosaicV1LibraryConfig:
  """The config of a Library `model_args` dict. train.py's other arguments (data, optimiser,
  logging) are ignored; a missing vocab_size or an unsupported option is a PortError."""
  missing = [name for name in _REQUIRED if name not in model_args]
  if missing:
    raise layout.PortError(f"model_args do not describe a Library StackAssoMem: missing {missing}")
  for name, value in _IGNORED_IF.items():
    if model_args.get(name, value) != value:
      raise layout.PortError(
          f"model_args {name}={model_args[name]!r}: StackAssoMem is built with {name} {value}"
      )
  kwargs = {ours: model_args[theirs] for theirs, ours in _ARGS.items() if theirs in model_args}
  try:
    return config_lib.MosaicV1LibraryConfig(**kwargs)
  except config_lib.ConfigError as e:
    raise layout.PortError(f"model_args {kwargs}: {e}") from None


def model_args(config: config_lib.ModelConfig) -> dict[str, Any]:
  """StackAssoMem's constructor arguments of a config; PortError if the Library cannot express
  it."""
  return nanogpt.export_args(
      config, "library", "mm1-library", "Library Memory Mosaics", "StackAssoMem", _FIXED, _ARGS
  )


def from_library(
    checkpoint: Mapping[str, Any], *, allow_nonfinite: bool = False
) -> nanogpt.Checkpoint:
  """Reads the dict of a Library `ckpt.pt` (torch tensors) into our config and params; NaN or
  infinite weights are refused by name unless `allow_nonfinite` (`layout.as_float32`)."""
  return nanogpt.read_checkpoint(checkpoint, config_from_model_args, "Library", allow_nonfinite)


def to_library(
    config: config_lib.ModelConfig, params: layout.Params, *, iter_num: int = 0
) -> dict[str, Any]:
  """The dict Library's train.py saves (`torch.save` it as ckpt.pt), with no optimizer state:
  its `model` loads into `StackAssoMem(**model_args)` with `load_state_dict(strict=True)`."""
  import torch  # pylint: disable=import-outside-toplevel

  args = model_args(config)
  state = {name: torch.tensor(x) for name, x in layout.to_torch(config, params).items()}
  if config.weight_tying:
    state[_HEAD] = state[_EMBEDDING]
  return {"model": state, "optimizer": None, "model_args": args, "iter_num": iter_num}
