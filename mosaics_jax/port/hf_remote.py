"""Memory Mosaics as Hugging Face transformers remote code: our config and params <-> a directory
that `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` loads.

`save` writes
- config.json: transformers' keys (`model_type` MODEL_TYPE, `architectures`, `auto_map` naming the
  classes below, `dtype` float32: the weights', `tie_word_embeddings`) and ours: `family` and the
  family's config fields, `dtype` (the compute dtype) renamed `compute_dtype`;
- model.safetensors: the state dict of `MosaicsForCausalLM`, torch_models' module under `model.`
  (`model.` + the names of `mosaics_jax.port.layout`, with v1's buffers), a tied classifier once;
- configuration_mosaics.py and modeling_mosaics.py (`hf_code/`, templates never imported here) and
  a copy of torch_models.py, which they import: one PyTorch implementation, no mosaics_jax needed.

`read` is its inverse for such a directory. Written for the Memory Mosaics families, which
transformers has no class for (`port.hf` exports Llama and GPT-2 natively); `save` takes any family
of `torch_models.MODELS`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np

from mosaics_jax import checkpoints, config as config_lib
from mosaics_jax.model import families
from mosaics_jax.port import layout, pretrained

MODEL_TYPE = "memory_mosaics"
_HERE = pathlib.Path(__file__).parent
CODE_FILES = (
    _HERE / "hf_code" / "configuration_mosaics.py",
    _HERE / "hf_code" / "modeling_mosaics.py",
    _HERE / "torch_models.py",
)
_AUTO_MAP = {
    "AutoConfig": "configuration_mosaics.MosaicsConfig",
    "AutoModelForCausalLM": "modeling_mosaics.MosaicsForCausalLM",
}
_PREFIX = "model."  # MosaicsForCausalLM's `model`, torch_models' module.
# Our config field whose name transformers' config uses for another meaning, and its name there.
_RENAMED = {"dtype": "compute_dtype"}


def save(directory: pathlib.Path, config: config_lib.ModelConfig, params: layout.Params) -> None:
  """Writes config.json, model.safetensors and the code files (module docstring) into the existing
  `directory`."""
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel

  from mosaics_jax.port import torch_models  # pylint: disable=import-outside-toplevel

  model = torch_models.build(config)
  torch_models.load_weights(
      model, {name: torch.tensor(x) for name, x in layout.to_torch(config, params).items()}
  )
  # state_dict() holds a tied parameter under each of its names; transformers ties it back.
  kept = {name for name, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
  tensors = {
      _PREFIX + name: np.ascontiguousarray(x.numpy())
      for name, x in model.state_dict().items()
      if name in kept
  }
  fields = {_RENAMED.get(k, k): v for k, v in config_lib.to_dict(config).items()}
  hf_config = {
      "model_type": MODEL_TYPE,
      "architectures": ["MosaicsForCausalLM"],
      "auto_map": _AUTO_MAP,
      "dtype": "float32",
      "tie_word_embeddings": len(kept) < len(model.state_dict()),
      "family": config.family,
      **fields,
  }
  config_path = directory / checkpoints.CONFIG_FILE
  config_path.write_text(json.dumps(hf_config, indent=2) + "\n")
  weights = directory / pretrained.WEIGHTS_FILE
  st_numpy.save_file(tensors, weights, metadata={"format": "pt"})
  # safetensors makes its file 0600: give it the mode of a file made the usual way.
  weights.chmod(config_path.stat().st_mode)
  for path in CODE_FILES:
    shutil.copyfile(path, directory / path.name)


def read(
    directory: pathlib.Path, *, allow_nonfinite: bool = False
) -> tuple[config_lib.ModelConfig, layout.Params]:
  """The config and params of a directory `save` wrote (or transformers' `save_pretrained` of the
  model it loaded). Raises PortError for another model type, or weights that do not fit the config
  (`layout.from_torch`, which also refuses NaN unless `allow_nonfinite`)."""
  config_path = directory / checkpoints.CONFIG_FILE
  saved = json.loads(config_path.read_text())
  if saved.get("model_type") != MODEL_TYPE:
    raise layout.PortError(
        f"{config_path}: model_type {saved.get('model_type')!r}, expected {MODEL_TYPE!r}"
    )
  if "family" not in saved:
    raise layout.PortError(f"{config_path} names no mosaics_jax family")
  config_class = families.get(saved["family"]).config_class
  names = {_RENAMED.get(f.name, f.name): f.name for f in dataclasses.fields(config_class)}
  fields = {ours: saved[theirs] for theirs, ours in names.items() if theirs in saved}
  config = config_lib.from_dict(config_lib.ModelConfig, {"family": saved["family"], **fields})
  from mosaics_jax.port import torch_models  # pylint: disable=import-outside-toplevel

  weights = directory / pretrained.WEIGHTS_FILE
  # v1's masks (bool) and leaky-average weights are buffers that `save` writes for transformers'
  # loader; the parameters do not need them.
  buffers = {_PREFIX + name for name, _ in torch_models.build(config).named_buffers()}
  tensors = pretrained.read_safetensors(weights, skip=buffers)[1]
  outside = sorted(name for name in tensors if not name.startswith(_PREFIX))
  if outside:
    raise layout.PortError(f"{weights}: tensors outside {_PREFIX!r}: {', '.join(outside)}")
  tensors = {name.removeprefix(_PREFIX): x for name, x in tensors.items()}
  params = layout.from_torch(config, tensors, source=str(weights), allow_nonfinite=allow_nonfinite)
  return config, params
