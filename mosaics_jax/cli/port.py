"""`mosaics-port`: move weights between this project and PyTorch.

    mosaics-port from-torch --format nanomosaics ckpt.pt exported/   # nanoMosaics -> export
    mosaics-port to-torch --format nanomosaics runs/mm1 ckpt.pt      # -> nanoMosaics' train.py
    mosaics-port from-torch --format nanogpt ckpt.pt exported/       # nanoGPT (GPT-2) -> export
    mosaics-port to-torch --format nanogpt runs/gpt2 ckpt.pt         # -> nanoGPT's train.py
    mosaics-port from-torch --format library ckpt.pt exported/       # the v1 paper's Library/
    mosaics-port to-torch --format library runs/lib ckpt.pt          # -> StackAssoMem's state
    mosaics-port to-safetensors runs/mm2 torch-dir/                  # -> mosaics_jax.torch_models
    mosaics-port from-safetensors torch-dir/ exported/               # and back
    mosaics-port to-hf runs/llama hf-dir/                            # -> Hugging Face transformers
    mosaics-port from-hf hf-dir/ exported/                           # and back

Sources (CKPT_DIR, DIR) are anything `mosaics_jax.load` reads: a training workdir or an exported
directory. Outputs are exported directories (config.json + model.safetensors), except to-torch
and to-hf (a directory that transformers' `AutoModelForCausalLM.from_pretrained` reads: native
Llama and GPT-2, our own code with trust_remote_code=True for the Memory Mosaics). from-hf reads a
LlamaForCausalLM or GPT2LMHeadModel directory, or one that to-hf wrote, from safetensors only.

Nothing is overwritten unasked: OUT_DIR is new or empty and OUT a new file in an existing
directory; --force replaces OUT, or the export files of a non-empty OUT_DIR (its other files
stay). Never, even forced, is an output a training workdir or the source, inside it or holding it.
Weights with NaN or infinities are refused unless --allow-nonfinite.
"""

from __future__ import annotations

import argparse
import pickle
import sys

from mosaics_jax.cli import common
from mosaics_jax.port import hf, layout, library, nanogpt, nanomosaics, pretrained

# Each PyTorch code base: its checkpoint reader and writer, and what the writer's file holds.
_CODE_BASES = {
    "nanomosaics": (
        nanomosaics.from_nanomosaics,
        nanomosaics.to_nanomosaics,
        "nanoMosaics MemoryMosaic",
    ),
    "nanogpt": (nanogpt.from_nanogpt, nanogpt.to_nanogpt, "nanoGPT GPT"),
    "library": (library.from_library, library.to_library, "Library StackAssoMem"),
}


# What the optional packages that a subcommand may need are called.
_PACKAGES = {"torch": "PyTorch", "transformers": "Hugging Face transformers"}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mosaics-port",
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[1:]),
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for name, source, out, what in (
      ("from-torch", "CHECKPOINT", "OUT_DIR", "a PyTorch checkpoint -> an exported directory"),
      ("to-torch", "CKPT_DIR", "OUT", "a workdir or export -> a PyTorch checkpoint"),
      ("to-safetensors", "CKPT_DIR", "OUT_DIR", "-> model.safetensors with PyTorch names"),
      ("from-safetensors", "DIR", "OUT_DIR", "a to-safetensors directory -> an exported one"),
      ("to-hf", "CKPT_DIR", "OUT_DIR", "-> a Hugging Face transformers directory"),
      ("from-hf", "DIR", "OUT_DIR", "a Hugging Face transformers directory -> an exported one"),
  ):
    p = sub.add_parser(name, help=what)
    if name.endswith("torch"):
      p.add_argument(
          "--format", required=True, choices=sorted(_CODE_BASES), help="the PyTorch code base"
      )
    p.add_argument("source", metavar=source)
    p.add_argument("out", metavar=out)
    p.add_argument(
        "--force",
        action="store_true",
        help=(
            "replace OUT if it exists"
            if out == "OUT"
            else "write into a non-empty OUT_DIR, replacing its export files and no other"
        ),
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="read weights that hold NaN or infinities (refused otherwise)",
    )
  return parser


def _from_torch(args) -> str:
  import torch  # pylint: disable=import-outside-toplevel

  try:
    # weights_only: a checkpoint is data; never run the code a pickle may carry.
    checkpoint = torch.load(args.source, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise layout.PortError(
        f"{args.source} holds more than tensors and plain data: {_torch_reason(e)}"
    ) from None
  except (RuntimeError, EOFError) as e:  # torch's reader of a truncated or non-zip file.
    raise layout.PortError(
        f"{args.source} is not a readable PyTorch checkpoint: {_torch_reason(e)}"
    ) from None
  if not isinstance(checkpoint, dict):
    raise layout.PortError(f"{args.source} holds a {type(checkpoint).__name__}, not a dict")
  read = _CODE_BASES[args.format][0]
  nano = read(checkpoint, allow_nonfinite=args.allow_nonfinite)
  pretrained.save_exported(args.out, nano.config, nano.params, step=nano.iter_num, force=args.force)
  return f"wrote {args.out} ({nano.config.family}, step {nano.iter_num})"


def _torch_reason(error: Exception) -> str:
  """The reason in torch.load's error, on one line, without its advice to load unsafely."""
  text = str(error)
  reason = text.partition("WeightsUnpickler error:")[2] or text
  return " ".join(reason.partition("Check the documentation")[0].split())


def _to_torch(args) -> str:
  import torch  # pylint: disable=import-outside-toplevel

  model = pretrained.load(args.source, allow_nonfinite=args.allow_nonfinite)
  _, write, what = _CODE_BASES[args.format]
  checkpoint = write(model.config, model.params, iter_num=model.step or 0)
  pretrained.write_file(args.out, lambda partial: torch.save(checkpoint, partial))
  return f"wrote {args.out} ({what}, iter_num {checkpoint['iter_num']})"


def _export(args, layout: str) -> str:
  model = pretrained.load(args.source, allow_nonfinite=args.allow_nonfinite)
  pretrained.save_exported(
      args.out,
      model.config,
      model.params,
      step=model.step,
      layout=layout,
      tokenizer=model.tokenizer,
      force=args.force,
  )
  return f"wrote {args.out} ({model.config.family}, {layout} layout)"


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    # Before any work: a refused output is said at once.
    file = args.command == "to-torch"
    pretrained.check_output(args.out, source=args.source, force=args.force, file=file)
    if args.command == "from-torch":
      message = _from_torch(args)
    elif args.command == "to-torch":
      message = _to_torch(args)
    elif args.command == "to-safetensors":
      message = _export(args, "pytorch")
    elif args.command == "to-hf":
      model = hf.to_hf(
          args.source, args.out, force=args.force, allow_nonfinite=args.allow_nonfinite
      )
      message = f"wrote {args.out} ({model.config.family}, Hugging Face transformers)"
    elif args.command == "from-hf":
      config = hf.from_hf(
          args.source, args.out, force=args.force, allow_nonfinite=args.allow_nonfinite
      )
      message = f"wrote {args.out} ({config.family})"
    else:
      message = _export(args, "flax")
  # OSError: a file that cannot be read or written (permissions, a full disk), named in it.
  except (*common.READ_ERRORS, OSError) as e:
    return common.fail("mosaics-port", e)
  except ImportError as e:
    if e.name not in _PACKAGES:
      raise
    return common.fail(
        "mosaics-port",
        f"{args.command} needs {_PACKAGES[e.name]}, which is not installed: pip install {e.name}",
    )
  print(message)
  return 0


if __name__ == "__main__":
  sys.exit(main())
