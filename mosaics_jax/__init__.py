"""mosaics_jax: Memory Mosaics v1 and v2 and a Llama baseline in JAX/Flax.

    from mosaics_jax import build_model, load, registry

The configs (`mosaics_jax.config`) and the experiment registry are plain data and import no Flax or
Orbax; `build_model`, `load` and `Pretrained` are imported on first use, so that importing a config
or an experiment file stays light. The layout is described in docs/design.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from mosaics_jax import registry
from mosaics_jax.config import (
    DataConfig,
    Experiment,
    LlamaConfig,
    MeshConfig,
    ModelConfig,
    MosaicV1Config,
    MosaicV2Config,
    TrainConfig,
)

# Public names whose modules import the model stack, by the module that defines them.
_LAZY = {
    "build_model": "mosaics_jax.model.families",
    "Pretrained": "mosaics_jax.port.pretrained",
    "load": "mosaics_jax.port.pretrained",
}

__all__ = [
    "DataConfig",
    "Experiment",
    "LlamaConfig",
    "MeshConfig",
    "ModelConfig",
    "MosaicV1Config",
    "MosaicV2Config",
    "Pretrained",
    "TrainConfig",
    "build_model",
    "load",
    "registry",
]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'mosaics_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
