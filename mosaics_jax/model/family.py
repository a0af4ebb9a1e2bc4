"""What the rest of the project knows about a model family, behind one object per family.

    family = families.of(config)  # or families.get("mm2")
    model = family.build(config)
    family.bands(config)         # {"short_term": Band(1, 255), "long_term": Band(64, None)}

A family object (`mm1.FAMILY`, `mm2.FAMILY`, `llama.FAMILY`, `gpt2.FAMILY`) holds its config class
and Flax module, and answers every question that depends on the family:

- `bands`: the memories (or attention) of each layer and the band each reads. This is the one table
  of bands: the model builds its memories from it, and FLOP counts and memory plans read it.
- `step_kwargs`: the model's arguments at a training step (v2 draws its long-term delay there) or
  at inference.
- `max_length`: the longest sequence the model accepts, if it has a limit.
- `output_logits`: the output layer alone, from the final hidden states (`hidden_only=True`) of a
  chunk of the sequence to its logits (the train step's chunked loss).
- `tied_embedding` and `labels`: what FLOP tables count and call each parameter.
- `layer_activations` and `layer_temporaries`: the tensors one layer keeps for its backward pass
  and the transient buffers it needs beyond retrieval, for memory plans.
- `torch_name`, `to_torch_array`, `from_torch_array`, `torch_extras`, `torch_mark`: how its
  parameters are named and laid out in PyTorch, for porting.
- `init_cache`: the empty decode cache of its memories (`cache.py`).
- `layer_name`: the name of each layer in the params, which `families.stack_layers` stacks.

Adding a family is a config class in `mosaics_jax.config`, a module here with its Flax model and
its `Family` subclass, and one line in `families.FAMILIES`; adding a memory to a family touches that
family's module only.

Axis legend: b = batch, t = time, h = heads, d = head dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from mosaics_jax import config as config_lib

Path = tuple[str, ...]  # A parameter's path in the params pytree.

# Flax leaf names that PyTorch calls "weight".
_TORCH_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
# Logical axes of per-head activations [b, t, h, d] (`layers.constrain`).
HEADS = ("batch", "length", "heads", "kv")


@dataclasses.dataclass(frozen=True)
class Band:
  """The pairs a query at time t reads: s with t - hi <= s <= t - lo, in its document.

  `lo` may be traced (v2's long-term delay m changes at every training step without recompiling);
  `hi` is a Python int or None (unbounded). design.md, "Bands".
  """

  lo: int | jax.Array
  hi: int | None
  # Reads only the blocks of pairs this picks per query (`kernels_pallas.select`); None: all.
  selection: kernels_pallas.BlockSelection | None = None


@dataclasses.dataclass(frozen=True)
class Activation:
  """`count` arrays of a global shape whose dimensions carry logical axis names (memory plans)."""

  names: tuple[str | None, ...]
  shape: tuple[int, ...]
  itemsize: int
  count: int = 1

  @classmethod
  def heads(
      cls, config: config_lib.ModelConfig, b: int, t: int, itemsize: int, count: int
  ) -> Activation:
    """`count` per-head arrays [b, t, h, d]."""
    return cls(HEADS, (b, t, config.num_heads, config.head_dim), itemsize, count)

  @classmethod
  def mlp(cls, width: int, b: int, t: int, itemsize: int, count: int) -> Activation:
    """`count` arrays [b, t, width] of a feed-forward hidden layer."""
    return cls(("batch", "length", "mlp"), (b, t, width), itemsize, count)


def itemsize(config: config_lib.ModelConfig) -> int:
  """Bytes per element of the compute dtype."""
  return jnp.dtype(config.dtype).itemsize


class Family:
  """The facts of one model family; subclasses set the class attributes and override as needed."""

  config_class: ClassVar[type[config_lib.ModelConfig]]
  module_class: ClassVar[type[nn.Module]]
  # The classifier is the transposed input embedding: FLOP counts count the embedding's matmul.
  tied_embedding: ClassVar[bool] = False
  # Human-readable names of the model's top-level and per-layer modules, for FLOP tables.
  labels: ClassVar[Mapping[str, str]]
  # A substring that only this family's PyTorch tensor names contain.
  torch_mark: ClassVar[str]

  @property
  def name(self) -> str:
    return self.config_class.family

  def build(self, config: config_lib.ModelConfig) -> nn.Module:
    """The Flax module of `config`."""
    self.check_config(config)
    return self.module_class(config)

  def check_config(self, config: config_lib.ModelConfig) -> None:
    if not isinstance(config, self.config_class):
      raise TypeError(
          f"the {self.name} family takes a {self.config_class.__name__}, got {config!r}"
      )

  def bands(
      self, config: config_lib.ModelConfig, ltm_delay: int | jax.Array | None = None
  ) -> dict[str, Band]:
    """The band of each module of a layer that reads the context, by module name.

    `ltm_delay` is v2's long-term delay m (None: the config's inference delay); other families
    ignore it.
    """
    raise NotImplementedError

  def step_kwargs(self, config: config_lib.ModelConfig, key: jax.Array | None) -> dict[str, Any]:
    """The model's keyword arguments at a training step drawn with `key`, or at inference (None)."""
    del config, key
    return {}

  def layer_name(self, index: int) -> str:
    """The name of layer `index`'s module in the unrolled params (`lm.layer_name`, or v1's and
    GPT-2's `h_{i}`)."""
    raise NotImplementedError

  def init_cache(self, config: config_lib.ModelConfig, batch: int, max_len: int, dtype: Any) -> Any:
    """The empty decode cache (`cache.Cache`) of `batch` rows of at most `max_len` tokens."""
    raise NotImplementedError

  def max_length(self, config: config_lib.ModelConfig) -> int | None:
    """The longest sequence the model accepts, or None."""
    del config
    return None

  def output_logits(self, config: config_lib.ModelConfig, params: Any, x: jax.Array) -> jax.Array:
    """The float32 logits [b, t, vocab] of final hidden states x [b, t, width] (what the model
    returns with `hidden_only=True`), through the output layer in the model's `params`: the
    model's own logits, for any slice of the sequence."""
    raise NotImplementedError

  def layer_activations(self, config: config_lib.ModelConfig, b: int, t: int) -> list[Activation]:
    """The tensors one layer keeps for its backward pass, for b sequences of t tokens, besides its
    input, its norms and the residuals of its retrievals (which `analysis.memory_plan` adds)."""
    raise NotImplementedError

  def layer_temporaries(self, config: config_lib.ModelConfig, b: int, t: int) -> list[Activation]:
    """Transient buffers of one layer's calls other than retrieval's."""
    del config, b, t
    return []

  # PyTorch layout: a Flax path joins with "."; `kernel` becomes `weight` transposed to PyTorch's
  # [out, in]; `embedding` and the norms' `scale` become `weight`; other leaves keep name and shape.

  def torch_name(self, path: Path) -> str:
    """The PyTorch name of the parameter at Flax `path`."""
    return ".".join([*path[:-1], _TORCH_LEAF_NAMES.get(path[-1], path[-1])])

  def to_torch_array(self, path: Path, x: np.ndarray) -> np.ndarray:
    """The parameter at `path` in PyTorch's layout."""
    return x.T if path[-1] == "kernel" else x

  def from_torch_array(self, path: Path, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_torch_array`, given the Flax `shape`."""
    return x.T if path[-1] == "kernel" else x.reshape(shape)

  def torch_extras(
      self, tensors: Mapping[str, np.ndarray]
  ) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """(the tensors without those a PyTorch state dict adds to the parameters, names or ".suffix"es
    to skip): tied copies are checked and dropped, buffers skipped."""
    return dict(tensors), ()
