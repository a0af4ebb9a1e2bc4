"""The model families of the zoo by name, and what every caller does with one: build a model.

family = families.of(config)               # mm1.FAMILY, mm2.FAMILY, llama.FAMILY, ...
model = families.build_model(config)       # a Flax Linen module
shapes = families.param_shapes(config)     # the params pytree as ShapeDtypeStructs
"""

from __future__ import annotations

import dataclasses
import difflib
import math

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
