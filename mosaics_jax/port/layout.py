"""Weight layouts: our Flax params <-> PyTorch tensor names and shapes.

PyTorch names (`to_torch` / `from_torch`; the files of `mosaics-port to-safetensors` and the state
dicts of `mosaics_jax.port.torch_models`) follow each family's rule (`Family.torch_name`). By
default a Flax path joins with "."; the leaf `kernel` becomes `weight` transposed to PyTorch's
[out, in], `embedding` and the norms' `scale` become `weight`; every other leaf keeps its name and
shape. For Memory Mosaics v2 and Llama that is the whole rule:

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
These names hold each parameter once and no buffers; a nanoMosaics checkpoint
(`nanomosaics.to_nanomosaics`) adds the tied `lm_head.weight` and the buffers `attn.bias` (causal
mask) and `leaky_avg.coef`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from mosaics_jax import config as config_lib
from mosaics_jax.model import families, family as family_lib

Params = dict[str, Any]  # The nested Flax params of a model.


class PortError(ValueError):
  """Weights or a checkpoint that do not fit the model they are given for."""


# The dtypes that weights may come in, by their safetensors names: floats that convert to float32,
# the parameters' dtype (exactly; float64 rounds). Integers, bool, complex and the 8-bit and smaller
# floats (which need their scales) are refused.
FLOAT_DTYPES = {
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}


def as_float32(
    tensors: Mapping[str, Any], source: str, *, allow_nonfinite: bool = False
) -> dict[str, np.ndarray]:
  """`tensors` as float32 numpy arrays.

  A dtype outside FLOAT_DTYPES is refused naming the tensors; a conversion from another float
  dtype is said in one warning. A NaN or an infinity is refused naming the tensors or, with
  `allow_nonfinite`, warned of.
  """
  arrays = {name: np.asarray(x) for name, x in tensors.items()}
  wrong = sorted(
      f"{n}: {x.dtype}" for n, x in arrays.items() if x.dtype not in FLOAT_DTYPES.values()
  )
  if wrong:
    raise PortError(
        f"{source}: weights must be float16, bfloat16, float32 or float64, got {', '.join(wrong)}"
    )
  converted = sorted({str(x.dtype) for x in arrays.values() if x.dtype != np.float32})
  if converted:
    count = sum(x.dtype != np.float32 for x in arrays.values())
    warnings.warn(
        f"{source}: {count} of {len(arrays)} tensors converted to float32, the parameters' dtype,"
        f" from {', '.join(converted)}",
        stacklevel=2,
    )
  arrays = {n: x.astype(np.float32, copy=False) for n, x in arrays.items()}
  non_finite = sorted(n for n, x in arrays.items() if not np.isfinite(x).all())
  if non_finite and not allow_nonfinite:
    raise PortError(
        f"{source}: NaN or infinite values in {', '.join(non_finite)} (allow_nonfinite=True,"
        " or mosaics-port's --allow-nonfinite, reads them anyway)"
    )
  if non_finite:
    warnings.warn(f"{source}: non-finite values in {', '.join(non_finite)}", stacklevel=2)
  return arrays


def param_shapes(config: config_lib.ModelConfig) -> dict[family_lib.Path, tuple[int, ...]]:
  """The shape of every parameter of `config`'s model by path, its layers unrolled (the layout of
  every exported file, whatever model.scan_layers says); nothing is allocated."""
  flat = flax.traverse_util.flatten_dict(families.param_shapes(unroll(config)))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def torch_name(config: config_lib.ModelConfig, path: family_lib.Path) -> str:
  """The PyTorch name of the parameter at Flax `path` (module docstring)."""
  return families.of(config).torch_name(path)


def to_torch(config: config_lib.ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """Our params (of either layout, `families.to_layout`) as float32 numpy arrays under their
  PyTorch names and in PyTorch's layout."""
  family = families.of(config)
  unrolled = families.to_layout(flax.core.meta.unbox(params), unroll(config))
  flat = flax.traverse_util.flatten_dict(unrolled)
  return {
      family.torch_name(path): np.ascontiguousarray(
          family.to_torch_array(path, np.asarray(x, np.float32))
      )
      for path, x in flat.items()
  }


def from_torch(
    config: config_lib.ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    ignored: tuple[str, ...] = (),
    source: str | None = None,
    allow_nonfinite: bool = False,
) -> Params:
  """Inverse of `to_torch`, which also reads full PyTorch state dicts of `torch_models`.

  Every tensor is checked by name, shape, dtype and value (`as_float32`: `source` names the
  weights, `allow_nonfinite` lets NaN through); names in `ignored` (exact or as a ".suffix") are
  skipped, and so are what a family's state dict adds to its parameters
  (`Family.torch_extras`: v1's buffers, and its tied `lm_head.weight`, checked equal to the
  embedding); a `_orig_mod.`
  prefix (torch.compile'd models) is dropped.
  The params come in `config`'s layout (stacked layers if model.scan_layers).
  Raises PortError listing every missing, unexpected and mis-shaped tensor.
  """
  family = families.of(config)
  shapes = param_shapes(config)
  # torch.compile'd models save their parameters under `_orig_mod.`.
  tensors = {name.removeprefix("_orig_mod."): x for name, x in tensors.items()}
  try:
    tensors, extras = family.torch_extras(tensors)
  except ValueError as e:
    raise PortError(str(e)) from None
  ignored = ignored + extras
  expected = {
      family.torch_name(path): (path, family.to_torch_array(path, np.empty(shape, np.bool_)).shape)
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
  origin = _family_of(given)
  if origin not in (None, config.family):
    raise PortError(f"these tensors are a {origin} model's, not a {config.family} model's")
  problems = [
      f"{what} ({len(names)}): {', '.join(names)}"
      for what, names in (
          ("missing", missing),
          ("unexpected", unexpected),
          ("mis-shaped", misshaped),
      )
      if names
  ]
  if problems:
    raise PortError(f"the tensors do not fit this {config.family} model: " + "; ".join(problems))
  given = as_float32(
      {name: given[name] for name in expected},
      source or f"{config.family} weights",
      allow_nonfinite=allow_nonfinite,
  )
  flat = {
      path: family.from_torch_array(path, given[name], shapes[path])
      for name, (path, _) in expected.items()
  }
  return families.to_layout(flax.traverse_util.unflatten_dict(flat), config)


def unroll(config: config_lib.ModelConfig) -> config_lib.ModelConfig:
  """`config` with its layers unrolled: the model of exported files (`param_shapes`)."""
  return dataclasses.replace(config, scan_layers=False)


def _family_of(names) -> str | None:
  """The family whose tensor names these are, if their names tell (`Family.torch_mark`)."""
  found = {f.name for f in families.FAMILIES.values() for n in names if f.torch_mark in n}
  return found.pop() if len(found) == 1 else None
