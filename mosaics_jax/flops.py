"""Parameter counts (from shapes only) and forward FLOPs per token by the v2 paper's convention.

Convention (SPEC §4, after Casson 2023; forward only, default context 256):
    FLOPs/token = 2 * (every matmul weight except the input embedding; the classifier counts)
                + for every memory or attention of every layer, 2 * 2 * width * (context / 2).
The second line assumes every query reads half the context. `band_exact` instead uses the mean
number of pairs each band really reads over the context (the short-term memory reads at most h-1),
which is what long contexts cost.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from mosaics_jax import config as config_lib, models

# Parameter leaves that are matmul weights (Dense kernels, the v1 persistent memories' pairs).
_MATMUL_LEAVES = ("kernel", "P_k", "P_v")
_LABELS = {
    "wte": "embedding (tied classifier)",
    "embed": "embedding",
    "classifier": "classifier",
    "attn": "contextual memory",
    "mlp": "persistent memory",
    "short_term": "short-term memory",
    "long_term": "long-term memory",
    "w_o": "W_o (memory output)",
    "ffn": "persistent memory (SwiGLU)",
    "attention": "attention",
}


@dataclasses.dataclass(frozen=True)
class Component:
  name: str
  params: int
  flops_per_token: float


@dataclasses.dataclass(frozen=True)
class Report:
  params: int
  flops_per_token: float
  flops_per_token_band_exact: float
  context: int
  components: tuple[Component, ...]

  def to_json(self) -> dict:
    return {
        "params": self.params,
        "flops_per_token": self.flops_per_token,
        "flops_per_token_band_exact": self.flops_per_token_band_exact,
        "context": self.context,
        "components": [dataclasses.asdict(c) for c in self.components],
    }


def retrieval_bands(config: config_lib.ModelConfig) -> dict[str, tuple[int, int | None]]:
  """The modules of each layer that read the context, with their band (lo, hi)."""
  if isinstance(config, config_lib.MosaicV1Config):
    return {"attn": (1, None)}
  if isinstance(config, config_lib.MosaicV2Config):
    bands = {"short_term": (1, config.short_term_window - 1)}
    if config.long_term_memory:
      bands["long_term"] = (config.long_term_delay, None)
    return bands
  return {"attention": (0, None)}  # Causal attention reads s <= t.


def param_shapes(config: config_lib.ModelConfig) -> dict:
  """The params pytree as ShapeDtypeStructs (`jax.eval_shape`: nothing is allocated)."""
  model = models.build_model(config)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  return shapes["params"]


def mean_visible(context: int, lo: int, hi: int | None) -> float:
  """Mean over t < context of the number of pairs the band (lo, hi) holds."""
  t = np.arange(context)
  n = t - lo + 1
  if hi is not None:
    n = np.minimum(n, hi - lo + 1)
  return float(np.maximum(n, 0).mean())


def count(config: config_lib.ModelConfig, context: int = 256) -> Report:
  """Parameters and forward FLOPs per token of a model, split by component."""
  tied = isinstance(config, config_lib.MosaicV1Config)
  params: dict[str, int] = {}
  flops: dict[str, float] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
    keys = [p.key for p in path]
    name = _component(keys)
    size = int(np.prod(leaf.shape))
    params[name] = params.get(name, 0) + size
    if keys[-1] in _MATMUL_LEAVES or (tied and keys[-1] == "embedding"):
      flops[name] = flops.get(name, 0.0) + 2.0 * size

  paper_extra, exact_extra = {}, {}
  for module, (lo, hi) in retrieval_bands(config).items():
    label = _LABELS[module]
    per_layer = 2 * 2 * config.width
    paper_extra[label] = config.num_layers * per_layer * context / 2
    exact_extra[label] = config.num_layers * per_layer * mean_visible(context, lo, hi)

  # Input to output: the embedding first, then the layers' components, the classifier last.
  order = lambda name: (name != _LABELS["embed"] and name != _LABELS["wte"], name == "classifier")
  components = tuple(
      Component(name, params[name], flops.get(name, 0.0) + paper_extra.get(name, 0.0))
      for name in sorted(params, key=order)
  )
  weight_flops = sum(flops.values())
  return Report(
      params=sum(params.values()),
      flops_per_token=weight_flops + sum(paper_extra.values()),
      flops_per_token_band_exact=weight_flops + sum(exact_extra.values()),
      context=context,
      components=components,
  )


def _component(keys: list[str]) -> str:
  """The component a parameter belongs to: its module inside a layer, or its top-level module."""
  if re.fullmatch(r"(h|layer)_\d+", keys[0]):
    keys = keys[1:]
  if "norm" in keys[0] or keys[0].startswith("ln_"):
    return "norms"
  return _LABELS.get(keys[0], keys[0])
