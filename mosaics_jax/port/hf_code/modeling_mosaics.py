"""Memory Mosaics as a transformers causal LM (`mosaics-port to-hf`), loaded with
`AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)`.

The network is mosaics_jax's PyTorch implementation, torch_models.py, copied into each export
beside this file and configuration_mosaics.py, so that there is one PyTorch implementation and an
export needs no mosaics_jax. Inference in float32.

`generate()` keeps no KV cache: each step recomputes the whole prefix (quadratic in its length),
for these memories' keys are recurrences that transformers' caches do not hold. An attention mask
marks a padded batch: each row's tokens must be one run of ones (left or right padding), computed
as its own document, so its logits equal those of the row alone; a mask with a hole in a row is
refused. Positions, input embeddings, caches and attention or hidden-state outputs are refused.

Shapes: b = batch, t = time, v = vocabulary.
"""

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mosaics import MosaicsConfig
from .torch_models import build

# What generate() passes that this model has no use for (no cache; outputs always as a dataclass).
_IGNORED = ("use_cache", "cache", "past_key_values", "cache_position", "return_dict")


class MosaicsForCausalLM(PreTrainedModel, GenerationMixin):
  """`model` is torch_models' module of the config's family; its tied classifier (v1's) is
  `_tied_weights_keys` for transformers."""

  config_class = MosaicsConfig
  base_model_prefix = "model"

  def __init__(self, config: MosaicsConfig):
    super().__init__(config)
    self.model = build(config)
    # A parameter registered under several names is tied to its first name (v1's classifier).
    names = {}
    for name, param in self.named_parameters(remove_duplicate=False):
      names.setdefault(param, []).append(name)
    self._tied_weights_keys = {tied: n[0] for n in names.values() for tied in n[1:]}
    self.post_init()

  def _init_weights(self, module):
    """Nothing: every weight comes from the export (torch_models' modules start at zero)."""

  def forward(
      self,
      input_ids: torch.LongTensor,
      attention_mask: torch.Tensor | None = None,
      labels: torch.LongTensor | None = None,
      **kwargs,
  ) -> CausalLMOutputWithPast:
    """Logits [b, t, v] of int `input_ids` [b, t]; with `labels` [b, t], the loss of predicting
    labels[:, i + 1] at position i, mean over the labels other than -100 (transformers' causal LM
    loss)."""
    unknown = sorted(
        k for k, x in kwargs.items() if x is not None and x is not False and k not in _IGNORED
    )
    if unknown:
      raise ValueError(
          f"MosaicsForCausalLM takes input_ids, attention_mask and labels, not {unknown}"
      )
    segment_ids = None if attention_mask is None else _documents(attention_mask)
    # torch_models makes its masks on the default device: the inputs'.
    with torch.device(input_ids.device):
      logits = self.model(input_ids, segment_ids)
    loss = None
    if labels is not None:
      loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
    return CausalLMOutputWithPast(loss=loss, logits=logits)

  def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
    """The whole sequence at every step: no cache."""
    del kwargs
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _documents(attention_mask: torch.Tensor) -> torch.Tensor:
  """Segment ids [b, t]: 1 on each row's tokens, 0 on its padding. Raises ValueError for a row
  whose tokens are not one run (a hole in the mask): torch_models would take them for two
  documents."""
  mask = attention_mask.to(torch.long)
  runs = (mask[:, 1:] > mask[:, :-1]).sum(1) + mask[:, 0]
  bad = torch.nonzero(runs > 1).flatten().tolist()
  if bad:
    raise ValueError(
        f"attention_mask rows {bad} have holes: only left or right padding is supported (each"
        " row's tokens one run of ones)"
    )
  return mask
