"""Parameter counts (from shapes only) and forward FLOPs per token by the v2 paper's convention.

Convention (design.md, "FLOP counts", after Casson 2023; forward only, default context 256):
    FLOPs/token = 2 * (every matmul weight except the input embedding; the classifier counts)
                + for every memory or attention of every layer, 2 * 2 * width * (context / 2).
The second line assumes every query reads half the context. `band_exact` instead uses the mean
number of pairs each band really reads over the context (the short-term memory reads at most h-1),
which is what long contexts cost.

A training step costs the forward, a backward of twice its FLOPs, and what its remat policy
recomputes of the blocks' forward (`step_flops`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import numpy as np

import kernels_pallas
from mosaics_jax import config as config_lib
from mosaics_jax.model import families, family as family_lib, lm

# Parameter leaves that are matmul weights (Dense kernels, the v1 persistent memories' pairs).
_MATMUL_LEAVES = ("kernel", "P_k", "P_v")
# The v1 persistent memories' pairs, read by `kernels_pallas.retrieve_persistent`: a retrieval.
_PERSISTENT_LEAVES = ("P_k", "P_v")
# The module of layer i: nanoMosaics' and nanoGPT's `h_{i}`, v2's and Llama's `layer_{i}`; or of
# every layer, scanned (`model.scan_layers`), its parameters stacked.
_LAYER = re.compile(rf"(h|layer)_\d+|{lm.SCANNED}")


@dataclasses.dataclass(frozen=True)
class Component:
  """A part of the model (embedding, a memory, norms, ...) with its size and cost."""

  name: str
  params: int
  flops_per_token: float


@dataclasses.dataclass(frozen=True)
class Report:
  """Parameters and forward FLOPs per token of a model, by the paper's convention and by bands."""

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


def mean_visible(context: int, band: family_lib.Band) -> float:
  """Mean over t < context of the number of pairs the band reads (`visible_counts`).

  A band with a block selection reads at most (K + R) B of them, and scores one block summary
  per B positions, counted as half a pair (a q . k product without its p . v).
  """
  counts = np.asarray(kernels_pallas.visible_counts(None, context, band.lo, band.hi), float)
  if band.selection is not None:
    size = band.selection.block_size
    counts = np.minimum(counts, band.selection.per_query * size) + counts / size / 2
  return float(np.mean(counts))


def count(config: config_lib.ModelConfig, context: int = 256) -> Report:
  """Parameters and forward FLOPs per token of a model, split by component."""
  family = families.of(config)
  params: dict[str, int] = {}
  flops: dict[str, float] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(families.param_shapes(config))[0]:
    keys = [p.key for p in path]
    name = _component(keys, family.labels)
    size = int(np.prod(leaf.shape))
    params[name] = params.get(name, 0) + size
    if keys[-1] in _MATMUL_LEAVES or _tied(family, keys):
      flops[name] = flops.get(name, 0.0) + 2.0 * size

  paper_extra, exact_extra = {}, {}
  for module, band in family.bands(config).items():
    label = family.labels[module]
    per_layer = 2 * 2 * config.width
    paper_extra[label] = config.num_layers * per_layer * context / 2
    exact_extra[label] = config.num_layers * per_layer * mean_visible(context, band)

  # Input to output: the embedding first, then the layers' components, the classifier last.
  embedding = family.labels.get("embed", family.labels.get("wte"))
  order = lambda name: (name != embedding, name == family.labels.get("classifier"))
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


def _tied(family: family_lib.Family, keys: list[str]) -> bool:
  """Whether the parameter at `keys` is a tied embedding, the classifier's matmul too; a position
  embedding (gpt2's wpe) is a lookup only."""
  return family.tied_embedding and keys[-1] == "embedding" and keys[0] != "wpe"


def _component(keys: list[str], labels: Mapping[str, str]) -> str:
  """The component a parameter belongs to: its module inside a layer, or its top-level module."""
  if _LAYER.fullmatch(keys[0]):
    keys = keys[1:]
  if "norm" in keys[0] or keys[0].startswith("ln_"):
    return "norms"
  return labels.get(keys[0], keys[0])


def step_flops(
    config: config_lib.ModelConfig, context: int = 256, loss_chunk: int = 0
) -> dict[str, float]:
  """FLOPs per token of a training step under each remat policy (`lm.REMAT_POLICIES`), band-exact.

  A step is the forward (F), the backward (2 F: the gradients of each matmul's two operands) and
  the recomputation of what the policy does not save: the blocks' forward (all of F but the
  classifier) for "full", less the retrieval (every band's q . k and p . v, and the v1 persistent
  memories' pairs) for "save_retrieval", less the projections (the blocks' Dense and convolution
  kernels) for "save_dots", less both for "save_dots_and_retrieval". Elementwise work (norms,
  softmax, key recurrences) counts nothing here, as in the forward's convention. A chunked loss
  (`train.loss_chunk` > 0) recomputes the classifier's forward as well, under every policy.
  """
  family = families.of(config)
  outer = dots = retrieval = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(families.param_shapes(config))[0]:
    keys = [p.key for p in path]
    flops = 2.0 * int(np.prod(leaf.shape))
    if keys[-1] in _PERSISTENT_LEAVES:
      retrieval += flops
    elif keys[-1] == "kernel" and _LAYER.fullmatch(keys[0]):
      dots += flops
    elif keys[-1] == "kernel" or _tied(family, keys):
      outer += flops  # The classifier.
  for band in family.bands(config).values():
    retrieval += config.num_layers * 2 * 2 * config.width * mean_visible(context, band)
  forward = count(config, context).flops_per_token_band_exact
  blocks = forward - outer
  recomputed = {
      "none": 0.0,
      "full": blocks,
      "save_retrieval": blocks - retrieval,
      "save_dots": blocks - dots,
      "save_dots_and_retrieval": blocks - dots - retrieval,
  }
  loss = outer if loss_chunk else 0.0
  return {policy: 3 * forward + r + loss for policy, r in recomputed.items()}
