"""The official nanoMosaics training step (PyTorch), for `mosaics-bench train --official PATH`
(timed by `analysis.bench_train` as its baseline).

PATH is the user's checkout of github.com/facebookresearch/MemoryMosaics (or its nanoMosaics/
folder). Its `mosaic_model.py` is imported from there, never copied into this project, and builds
nanoMosaics' `MemoryMosaic` at our mm1 experiment's sizes (`port.nanomosaics.model_args`, the same
mapping the checkpoint port uses): one step is its forward with targets, backward, gradient
clipping and the AdamW of its `configure_optimizers`, as its `train.py` runs them, on random tokens.
Torch comes from the `[torch]` extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib
from collections.abc import Callable
from types import ModuleType

import jax

from mosaics_jax.port import layout, nanomosaics

MODEL_FILE = "mosaic_model.py"


class OfficialError(ValueError):
  """--official PATH cannot give the official training step."""


def model_file(path: str | pathlib.Path) -> pathlib.Path:
  """PATH/nanoMosaics/mosaic_model.py or PATH/mosaic_model.py, whichever exists."""
  path = pathlib.Path(path)
  for candidate in (path / "nanoMosaics" / MODEL_FILE, path / MODEL_FILE):
    if candidate.is_file():
      return candidate
  raise OfficialError(
      f"--official {path}: no nanoMosaics/{MODEL_FILE} there; give a checkout of"
      " https://github.com/facebookresearch/MemoryMosaics (or its nanoMosaics folder)"
  )


def load_module(path: str | pathlib.Path) -> ModuleType:
  """The official `mosaic_model` module, imported from the user's checkout."""
  file = model_file(path)
  spec = importlib.util.spec_from_file_location("nanomosaics_mosaic_model", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for name in ("MemoryMosaic", "MemoryMosaicConfig"):
    if not hasattr(module, name):
      raise OfficialError(f"--official: {file} defines no {name}: not nanoMosaics' model file")
  return module


def torch_version() -> str:
  import torch  # The [torch] extra: imported on use.

  return torch.__version__


def train_step(experiment, path: str | pathlib.Path) -> tuple[Callable[[], None], str]:
  """(one official training step on the experiment's batch shape, the device it runs on).

  The model takes our mm1 experiment's sizes; other families have no official v1 counterpart
  (OfficialError). It runs on CUDA when JAX runs on a GPU, on the CPU otherwise, in float32.
  """
  model_file(path)
  try:
    args = nanomosaics.model_args(experiment.model)
  except layout.PortError as e:
    raise OfficialError(f"--official compares nanoMosaics' MemoryMosaic with mm1: {e}") from None
  try:
    import torch  # The [torch] extra: imported on use.
  except ImportError:
    raise OfficialError("--official needs PyTorch: pip install -e '.[torch]'") from None
  module = load_module(path)
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  model = module.MemoryMosaic(module.MemoryMosaicConfig(**args)).to(device)
  model.train()
  train = experiment.train
  # configure_optimizers prints its parameter counts; the bench's table is the output.
  with contextlib.redirect_stdout(io.StringIO()):
    optimizer = model.configure_optimizers(
        train.weight_decay, train.learning_rate, (train.b1, train.b2), device
    )
  generator = torch.Generator().manual_seed(0)
  shape = (train.batch_size, experiment.data.seq_len)
  vocab = experiment.model.vocab_size
  tokens, targets = (torch.randint(vocab, shape, generator=generator).to(device) for _ in "xy")

  def step():
    _, loss = model(tokens, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()

  return step, device
