"""The config of a Memory Mosaics model exported for transformers (`mosaics-port to-hf`).

A copy of this file sits in each export beside modeling_mosaics.py, which transformers loads with
`trust_remote_code=True`. It holds mosaics_jax's `family` and that family's config fields under
their own names, but for `dtype`, which is `compute_dtype` here: transformers' `dtype` is the
weights' (float32). The standard names transformers and its tools read (`hidden_size`,
`num_hidden_layers`, `num_attention_heads`, `max_position_embeddings` where the family has a
`block_size`) map to ours.
"""

from transformers import PretrainedConfig


class MosaicsConfig(PretrainedConfig):
  """mosaics_jax's model config (`family` and its fields) as a transformers config."""

  model_type = "memory_mosaics"
  attribute_map = {
      "hidden_size": "width",
      "num_hidden_layers": "num_layers",
      "num_attention_heads": "num_heads",
      "max_position_embeddings": "block_size",
  }

  def __init__(
      self,
      family: str = "mm2",
      compute_dtype: str = "float32",
      tie_word_embeddings: bool = False,
      **fields,
  ):
    """`fields`: the family's config fields (mosaics_jax.config), with transformers' own keys."""
    self.family = family
    self.compute_dtype = compute_dtype
    self.tie_word_embeddings = tie_word_embeddings
    super().__init__(**fields)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads
