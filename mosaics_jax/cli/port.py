"""`mosaics-port`: move weights between this project and PyTorch.

    mosaics-port from-torch --format nanomosaics ckpt.pt exported/   # nanoMosaics -> export
    mosaics-port to-torch --format nanomosaics runs/mm1 ckpt.pt      # -> nanoMosaics' train.py
    mosaics-port to-safetensors runs/mm2 torch-dir/                  # -> mosaics_jax.torch_models
    mosaics-port from-safetensors torch-dir/ exported/               # and back

Sources (CKPT_DIR, DIR) are anything `mosaics_jax.load` reads: a training workdir or an exported
directory. Outputs are exported directories (config.json + model.safetensors), except to-torch.
"""

from __future__ import annotations

import argparse
import pickle
import sys

from mosaics_jax import config as config_lib
from mosaics_jax.cli import common
from mosaics_jax.port import layout, nanomosaics, pretrained

FORMATS = ("nanomosaics", "library")

# Why Library/ checkpoints are refused: its StackAssoMem is a different v1, not a relabelling.
_LIBRARY = (
    "--format library is not supported: the official Library/ (StackAssoMem) model computes a"
    " different function from nanoMosaics' MemoryMosaic, which our mm1 reproduces. Its leaky"
    " average is multiplied by (1 - lambda), its key scale is clamped at 5 instead of"
    " log(65535), its features are normalised without eps, and its key and value extractors"
    " may be convolutions (kernel sizes > 1); no renaming of its tensors gives our logits."
    " Use --format nanomosaics (nanoMosaics/train.py checkpoints)."
)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mosaics-port",
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[1:]),
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for name, src, dst, what in (
      ("from-torch", "checkpoint", "out_dir", "a PyTorch checkpoint -> an exported directory"),
      ("to-torch", "ckpt_dir", "out", "a workdir or export -> a PyTorch checkpoint"),
  ):
    p = sub.add_parser(name, help=what)
    p.add_argument("--format", required=True, choices=FORMATS, help="the PyTorch code base")
    p.add_argument(src)
    p.add_argument(dst)
  p = sub.add_parser("to-safetensors", help="-> config.json + model.safetensors, PyTorch names")
  p.add_argument("ckpt_dir")
  p.add_argument("out_dir")
  p = sub.add_parser("from-safetensors", help="a to-safetensors directory -> an exported one")
  p.add_argument("dir")
  p.add_argument("out_dir")
  return parser


def _from_torch(args) -> str:
  import torch  # pylint: disable=import-outside-toplevel

  try:
    # weights_only: a checkpoint is data; never run the code a pickle may carry.
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise layout.PortError(
        f"{args.checkpoint} holds more than tensors and plain data: {e}"
    ) from None
  if not isinstance(checkpoint, dict):
    raise layout.PortError(f"{args.checkpoint} holds a {type(checkpoint).__name__}, not a dict")
  nano = nanomosaics.from_nanomosaics(checkpoint)
  pretrained.save_exported(args.out_dir, nano.config, nano.params, step=nano.iter_num)
  return f"wrote {args.out_dir} ({nano.config.family}, step {nano.iter_num})"


def _to_torch(args) -> str:
  import torch  # pylint: disable=import-outside-toplevel

  model = pretrained.load(args.ckpt_dir)
  checkpoint = nanomosaics.to_nanomosaics(model.config, model.params, iter_num=model.step or 0)
  torch.save(checkpoint, args.out)
  return f"wrote {args.out} (nanoMosaics MemoryMosaic, iter_num {checkpoint['iter_num']})"


def _export(args, source: str, layout: str) -> str:
  model = pretrained.load(source)
  pretrained.save_exported(
      args.out_dir,
      model.config,
      model.params,
      step=model.step,
      layout=layout,
      tokenizer=model.tokenizer,
  )
  return f"wrote {args.out_dir} ({model.config.family}, {layout} layout)"


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if getattr(args, "format", None) == "library":
      raise layout.PortError(_LIBRARY)
    if args.command == "from-torch":
      message = _from_torch(args)
    elif args.command == "to-torch":
      message = _to_torch(args)
    elif args.command == "to-safetensors":
      message = _export(args, args.ckpt_dir, "pytorch")
    else:
      message = _export(args, args.dir, "flax")
  except (layout.PortError, config_lib.ConfigError, FileNotFoundError) as e:
    return common.fail("mosaics-port", e)
  print(message)
  return 0


if __name__ == "__main__":
  sys.exit(main())
