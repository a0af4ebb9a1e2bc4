"""Weight layouts: our Flax params <-> PyTorch tensor names and shapes, and nanoMosaics checkpoints.

PyTorch names (`to_torch` / `from_torch`; the files of `mosaics-port to-safetensors` and the state
dicts of `mosaics_jax.torch_models`). A Flax path joins with "."; the leaf `kernel` becomes `weight`
transposed to PyTorch's [out, in], `embedding` and the norms' `scale` become `weight`; every other
leaf keeps its name and shape. For Memory Mosaics v2 and Llama that is the whole rule:

    embed.weight                                   [vocab, d]
    layer_{i}.norm1.weight                         [d]            (Llama: attn_norm, ffn_norm)
    layer_{i}.{short_term,long_term}.key.W_phi.weight      [d, d]
    layer_{i}.{short_term,long_term}.key.w_g.weight        [H, d] (and .bias if gate_bias)
    layer_{i}.{short_term,long_term}.key.w_lambda.weight   [H, d]
    layer_{i}.{short_term,long_term}.value.W_psi.weight    [d, d]
    layer_{i}.{short_term,long_term}.value.{gamma,theta}   [H]
    layer_{i}.{short_term,long_term}.bandwidth.{theta0,theta1,theta_a}   [H]
    layer_{i}.w_o.weight                           [d, 2d] ([d, d] without long-term memory)
    layer_{i}.norm2.weight                         [d]
    layer_{i}.ffn.{w1,w3}.weight, layer_{i}.ffn.w2.weight   [d', d], [d, d']
    layer_{i}.attention.{wq,wk,wv,wo}.weight       [d, d]         (Llama)
    final_norm.weight [d], classifier.weight [vocab, d]

Memory Mosaics v1 takes nanoMosaics' names instead (`mosaic.` prefix, `h.{i}`), with its per-head
scalars as [1, H, 1, 1] and P_k, P_v as [pmem_count, 1, H, pmem_size, d]: e.g.
`mosaic.h.0.attn.k_featurizer.leaky_avg.leaky_key_beta`, `mosaic.h.0.mlp.P_k`, `mosaic.ln_f.bias`.
These names hold each parameter once and no buffers; a nanoMosaics checkpoint (`to_nanomosaics`)
adds the tied `lm_head.weight` and the buffers `attn.bias` (causal mask) and `leaky_avg.coef`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mosaics_jax import config as config_lib, models

Params = dict[str, Any]  # The nested Flax params of a model.
Path = tuple[str, ...]

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
_V1_PER_HEAD = {"leaky_key_beta", "key_scale", "coef", "val_scale", "out_scale"}


class PortError(ValueError):
  """Weights or a checkpoint that do not fit the model they are given for."""


def param_shapes(config: config_lib.ModelConfig) -> dict[Path, tuple[int, ...]]:
  """The shape of every parameter of `config`'s model, from shapes only (nothing is allocated)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(
      lambda: models.build_model(config).init(jax.random.key(0), tokens)["params"]
  )
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(shapes))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def torch_name(config: config_lib.ModelConfig, path: Path) -> str:
  """The PyTorch name of the parameter at Flax `path` (module docstring)."""
  parts = list(path[:-1]) + [_LEAF_NAMES.get(path[-1], path[-1])]
  if config.family != "mm1":
    return ".".join(parts)
  layer = re.fullmatch(r"h_(\d+)", parts[0])
  if layer:
    parts[:1] = ["h", layer.group(1)]
  return "mosaic." + ".".join(parts)


def _to_torch_array(config: config_lib.ModelConfig, path: Path, x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return x.T
  if config.family == "mm1" and path[-1] in _V1_PER_HEAD:
    return x.reshape(1, -1, 1, 1)
  if config.family == "mm1" and path[-1] in ("P_k", "P_v"):
    return x[:, None]
  return x


def to_torch(config: config_lib.ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """Our params as float32 numpy arrays under their PyTorch names and in PyTorch's layout."""
  flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))
  return {
      torch_name(config, path): np.ascontiguousarray(
          _to_torch_array(config, path, np.asarray(x, np.float32))
      )
      for path, x in flat.items()
  }


def from_torch(
    config: config_lib.ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    ignored: tuple[str, ...] = (),
) -> Params:
  """Inverse of `to_torch`, which also reads full PyTorch state dicts of `torch_models`.

  Every tensor is checked by name and shape; names in `ignored` (exact or as a ".suffix") are
  skipped, and so are v1's buffers and its tied `lm_head.weight` (checked equal to the embedding);
  a `_orig_mod.` prefix (torch.compile'd models) is dropped.
  Raises PortError listing every missing, unexpected and mis-shaped tensor.
  """
  shapes = param_shapes(config)
  tensors = _strip_compile_prefix(tensors)
  if config.family == "mm1":
    tensors = _untie_v1(tensors)
    ignored = ignored + _NANO_BUFFERS
  expected = {
      torch_name(config, path): (
          path, _to_torch_array(config, path, np.empty(shape, np.bool_)).shape
      )
      for path, shape in shapes.items()
  }
  is_ignored = lambda name: any(name == i or name.endswith("." + i) for i in ignored)
  given = {name: x for name, x in tensors.items() if not is_ignored(name)}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  misshaped = sorted(
      f"{name}: {tuple(given[name].shape)}, expected {shape}"
      for name, (_, shape) in expected.items()
      if name in given and tuple(given[name].shape) != shape
  )
  family = _family_of(given)
  if family not in (None, config.family):
    raise PortError(f"these tensors are a {family} model's, not a {config.family} model's")
  problems = [
      f"{what} ({len(names)}): {', '.join(names)}"
      for what, names in (
          ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)
      )
      if names
  ]
  if problems:
    raise PortError(f"the tensors do not fit this {config.family} model: " + "; ".join(problems))
  flat = {}
  for name, (path, _) in expected.items():
    x = np.asarray(given[name], np.float32)
    flat[path] = x.T if path[-1] == "kernel" else x.reshape(shapes[path])
  return flax.traverse_util.unflatten_dict(flat)


# A tensor name that only one family has.
_FAMILY_MARKS = {"mm1": "mosaic.", "mm2": ".short_term.", "llama": ".attention."}


def _family_of(names) -> str | None:
  """The family whose tensor names these are, if their names tell."""
  found = {f for f, mark in _FAMILY_MARKS.items() for n in names if mark in n}
  return found.pop() if len(found) == 1 else None


def _untie_v1(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """v1 tensors without `lm_head.weight`, which nanoMosaics ties to `mosaic.wte.weight`."""
  tensors = dict(tensors)
  head = tensors.pop("lm_head.weight", None)
  wte = tensors.get("mosaic.wte.weight")
  if head is not None and (wte is None or not np.array_equal(head, wte)):
    raise PortError("lm_head.weight differs from mosaic.wte.weight: nanoMosaics ties them")
  return tensors


# nanoMosaics checkpoints -------------------------------------------------------------------------

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
# Buffers that nanoMosaics saves but that are functions of block_size: regenerated on export.
_NANO_BUFFERS = ("attn.bias", "leaky_avg.coef")
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
    raise PortError(
        f"model_args do not describe a nanoMosaics MemoryMosaic: unknown {unknown}, missing"
        f" {missing}{hint}"
    )
  kwargs = {ours: model_args[theirs] for theirs, ours in _NANO_ARGS.items() if theirs in model_args}
  try:
    return config_lib.MosaicV1Config(**kwargs)
  except config_lib.ConfigError as e:
    raise PortError(f"model_args {dict(model_args)}: {e}") from None


def model_args(config: config_lib.MosaicV1Config) -> dict[str, Any]:
  """nanoMosaics' `model_args` of a MosaicV1Config; PortError if nanoMosaics cannot express it."""
  if config.family != "mm1":
    raise PortError(
        f"the nanomosaics format holds Memory Mosaics v1 (mm1) models, this one is"
        f" {config.family}: use `mosaics-port to-safetensors`"
    )
  differing = {
      f: getattr(config, f)
      for f, v in _NANO_FIXED.items()
      if not math.isclose(getattr(config, f), v)
  }
  if differing:
    raise PortError(f"nanoMosaics hard-codes these fields to other values: {differing}")
  return {theirs: getattr(config, ours) for theirs, ours in _NANO_ARGS.items()}


def _strip_compile_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  # torch.compile'd models save their parameters under `_orig_mod.`.
  return {name.removeprefix("_orig_mod."): x for name, x in state.items()}


@dataclasses.dataclass(frozen=True)
class NanoCheckpoint:
  """What a nanoMosaics checkpoint holds that a Flax model needs."""

  config: config_lib.MosaicV1Config
  params: Params
  iter_num: int | None
  best_val_loss: float | None


def from_nanomosaics(checkpoint: Mapping[str, Any]) -> NanoCheckpoint:
  """Reads the dict of a nanoMosaics `ckpt.pt` (torch tensors) into our config and params."""
  for key in ("model", "model_args"):
    if key not in checkpoint:
      raise PortError(
          f"not a nanoMosaics checkpoint: no {key!r} entry (it has {sorted(checkpoint)})"
      )
  config = config_from_model_args(checkpoint["model_args"])
  state = {name: x.detach().float().numpy() for name, x in checkpoint["model"].items()}
  params = from_torch(config, state)
  best = checkpoint.get("best_val_loss")
  return NanoCheckpoint(
      config=config,
      params=params,
      iter_num=checkpoint.get("iter_num"),
      best_val_loss=None if best is None else float(best),
  )


def to_nanomosaics(
    config: config_lib.MosaicV1Config,
    params: Params,
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

  from mosaics_jax import torch_models  # pylint: disable=import-outside-toplevel

  args = model_args(config)
  module = torch_models.build(config)
  torch_models.load_weights(
      module, {name: torch.tensor(x) for name, x in to_torch(config, params).items()}
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
