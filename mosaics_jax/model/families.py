"""The model families of the zoo by name, and what every caller does with one: build a model.

family = families.of(config)               # mm1.FAMILY, mm2.FAMILY, llama.FAMILY, ...
model = families.build_model(config)       # a Flax Linen module
shapes = families.param_shapes(config)     # the params pytree as ShapeDtypeStructs
params = families.to_layout(params, config)  # unrolled or stacked layers, as config.scan_layers
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mosaics_jax import config as config_lib
from mosaics_jax.model import family as family_lib, gpt2, llama, lm, mm1, mm1_library, mm2

FAMILIES: dict[str, family_lib.Family] = {
    f.name: f for f in (mm1.FAMILY, mm1_library.FAMILY, mm2.FAMILY, llama.FAMILY, gpt2.FAMILY)
}


def get(name: str) -> family_lib.Family:
  """The family called `name`; an unknown name is an error that suggests close names."""
  if name not in FAMILIES:
    close = difflib.get_close_matches(name, FAMILIES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise config_lib.ConfigError(f"unknown model family {name!r}; {hint}known: {sorted(FAMILIES)}")
  return FAMILIES[name]


def of(config: config_lib.ModelConfig) -> family_lib.Family:
  """The family of a model config."""
  return get(config.family)


def build_model(config: config_lib.ModelConfig) -> lm.LanguageModel:
  """The Flax module of a model config."""
  return of(config).build(config)


def param_count(config: config_lib.ModelConfig) -> int:
  """The number of parameters, from the shapes of a one- and a two-layer model: exact (the layers
  of a model have one shape) and as fast for 10^9 layers as for one."""
  one, two = (
      sum(
          math.prod(x.shape)
          for x in jax.tree.leaves(param_shapes(dataclasses.replace(config, num_layers=n)))
      )
      for n in (1, 2)
  )
  return one + (config.num_layers - 1) * (two - one)


def param_shapes(config: config_lib.ModelConfig, *, boxed: bool = False):
  """The params pytree as `jax.ShapeDtypeStruct`s (nothing is allocated); with `boxed`, each leaf
  in an `nn.LogicallyPartitioned` holding its logical axis names. Shapes do not depend on the
  sequence length."""
  model = build_model(config)
  init = model.init_boxed if boxed else model.init
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: init(jax.random.key(0), t)["params"], tokens)


def _boxed(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def _stack(*xs: Any) -> Any:
  if not _boxed(xs[0]):
    return jnp.stack(xs)
  value = jnp.stack([x.value for x in xs])
  return xs[0].replace(value=value, names=(lm.SCANNED, *xs[0].names))


def _take(x: Any, i: int) -> Any:
  return x.replace(value=x.value[i], names=tuple(x.names[1:])) if _boxed(x) else x[i]


def _layer_names(config: config_lib.ModelConfig, params: dict[str, Any]) -> list[str]:
  names = [of(config).layer_name(i) for i in range(config.num_layers)]
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(
        f"these params have no layers {missing} of a {config.num_layers}-layer {config.family}"
        f" model (top-level keys: {sorted(params)})"
    )
  return names


def stack_layers(params: dict[str, Any], config: config_lib.ModelConfig) -> dict[str, Any]:
  """Unrolled params (plain or boxed) as scanned ones (`model.scan_layers`): the layers' subtrees
  `family.layer_name(i)` become one subtree `lm.SCANNED`, each leaf stacked on a leading layer
  axis (named `lm.SCANNED` in a boxed leaf)."""
  names = _layer_names(config, params)
  stacked = jax.tree.map(_stack, *(params[n] for n in names), is_leaf=_boxed)
  out = {}
  for key, value in params.items():
    if key == names[0]:
      out[lm.SCANNED] = stacked
    elif key not in names:
      out[key] = value
  return out


def unstack_layers(params: dict[str, Any], config: config_lib.ModelConfig) -> dict[str, Any]:
  """Inverse of `stack_layers`: scanned params as unrolled ones."""
  if lm.SCANNED not in params:
    raise ValueError(f"these params have no stacked layers {lm.SCANNED!r}: {sorted(params)}")
  stacked = params[lm.SCANNED]
  sizes = {x.shape[0] for x in jax.tree.leaves(stacked)}
  if sizes != {config.num_layers}:
    raise ValueError(
        f"stacked layers of {sorted(sizes)} layers do not fit a {config.num_layers}-layer"
        f" {config.family} model"
    )
  out = {}
  for key, value in params.items():
    if key != lm.SCANNED:
      out[key] = value
      continue
    for i in range(config.num_layers):
      out[of(config).layer_name(i)] = jax.tree.map(
          lambda x, i=i: _take(x, i), value, is_leaf=_boxed
      )
  return out


def to_layout(params: dict[str, Any], config: config_lib.ModelConfig) -> dict[str, Any]:
  """`params` of either layout in `config`'s: stacked if config.scan_layers, else unrolled."""
  if config.scan_layers and lm.SCANNED not in params:
    return stack_layers(params, config)
  if not config.scan_layers and lm.SCANNED in params:
    return unstack_layers(params, config)
  return params
