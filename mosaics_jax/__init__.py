"""mosaics_jax: Memory Mosaics v1 and v2 and a Llama baseline in JAX/Flax."""

from mosaics_jax.config import (
    DataConfig,
    Experiment,
    LlamaConfig,
    ModelConfig,
    MosaicV1Config,
    MosaicV2Config,
    TrainConfig,
)
from mosaics_jax.models import build_model
from mosaics_jax.pretrained import Pretrained, load

__all__ = [
    "DataConfig",
    "Experiment",
    "LlamaConfig",
    "ModelConfig",
    "MosaicV1Config",
    "MosaicV2Config",
    "Pretrained",
    "TrainConfig",
    "build_model",
    "load",
]
