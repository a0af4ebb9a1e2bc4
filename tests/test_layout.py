"""The architecture holds: which part imports which (docs/design.md, "Layout"), configs without the
stack, and every family's facts behind its family object."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

from mosaics_jax import config as config_lib
from mosaics_jax.model import families

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mosaics_jax"

# Who may import what inside the project: a module under the key may import project modules
# whose dotted name starts with one of the values (besides its own part).
ALLOWED = {
    "kernels_pallas": (),
    "experiments": ("mosaics_jax.config", "mosaics_jax.repro.declaration"),
    "mosaics_jax.config": (),
    "mosaics_jax.overrides": ("mosaics_jax.config",),
    "mosaics_jax.registry": ("mosaics_jax.config", "experiments"),
    "mosaics_jax.model": ("mosaics_jax.config", "kernels_pallas"),
    "mosaics_jax.sharding": ("mosaics_jax.config",),
    "mosaics_jax.distributed": ("mosaics_jax.config",),
    "mosaics_jax.checkpoints": ("mosaics_jax.config",),
    "mosaics_jax.train": (
        "mosaics_jax.config",
        "mosaics_jax.model",
        "mosaics_jax.sharding",
        "mosaics_jax.checkpoints",
        "mosaics_jax.tokenizers",
        "mosaics_jax.regbench",
        "mosaics_jax.moons",
        "mosaics_jax.synthetic",
        "mosaics_jax.icl_data",
        "kernels_pallas",
    ),
    "mosaics_jax.tokenizers": (),
    "mosaics_jax.regbench": (),
    "mosaics_jax.moons": (),
    "mosaics_jax.synthetic": (),
    "mosaics_jax.icl_data": (),
    # Inference needs no optimizer: it never imports training.
    "mosaics_jax.inference": ("mosaics_jax.config", "mosaics_jax.model", "mosaics_jax.sharding"),
    "mosaics_jax.port": (
        "mosaics_jax.config",
        "mosaics_jax.model",
        "mosaics_jax.checkpoints",
        "mosaics_jax.sharding",
        "mosaics_jax.tokenizers",
        "mosaics_jax.inference",
    ),
    # Evaluation reads checkpoints (through port's load) and never trains.
    "mosaics_jax.eval": (
        "mosaics_jax.config",
        "mosaics_jax.checkpoints",
        "mosaics_jax.overrides",
        "mosaics_jax.model",
        "mosaics_jax.inference",
        "mosaics_jax.port",
        "mosaics_jax.sharding",
        "mosaics_jax.tokenizers",
        "mosaics_jax.regbench",
        "mosaics_jax.moons",
        "mosaics_jax.synthetic",
        "mosaics_jax.icl_data",
    ),
    "mosaics_jax.analysis": (
        "mosaics_jax.config",
        "mosaics_jax.overrides",
        "mosaics_jax.model",
        "mosaics_jax.train",
        "mosaics_jax.inference",
        "mosaics_jax.sharding",
        "kernels_pallas",
    ),
    # Reproductions are data (declaration, which experiment files import); running one trains,
    # evaluates and counts FLOPs.
    "mosaics_jax.repro.declaration": (),
    "mosaics_jax.repro": (
        "mosaics_jax.config",
        "mosaics_jax.overrides",
        "mosaics_jax.registry",
        "mosaics_jax.checkpoints",
        "mosaics_jax.train",
        "mosaics_jax.eval",
        "mosaics_jax.port",
        "mosaics_jax.analysis",
    ),
    "mosaics_jax.cli": ("mosaics_jax", "kernels_pallas"),
}


def _part(module: str) -> str:
  """The key of ALLOWED that `module` belongs to (the longest matching prefix)."""
  parts = [k for k in ALLOWED if module == k or module.startswith(k + ".")]
  assert parts, f"{module} belongs to no part of the layout: add it to ALLOWED and design.md"
  return max(parts, key=len)


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for top in ("mosaics_jax", "kernels_pallas", "experiments"):
    for path in (ROOT / top).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = path
  return found


def _project_imports(path: pathlib.Path) -> set[str]:
  """Project modules imported anywhere in the file (inside functions too)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
  roots = ("mosaics_jax", "kernels_pallas", "experiments")
  return {n for n in names if n.split(".")[0] in roots}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_follow_the_layout(module):
  if module == "mosaics_jax":  # The package's lazy public API re-exports from every part.
    return
  modules = _modules()
  part = _part(module)
  allowed = (part, *ALLOWED[part])
  # `from package import name` names a module or an attribute: check the modules only.
  imported = {n for n in _project_imports(modules[module]) if n in modules}
  bad = sorted(
      n
      for n in imported
      if n != "mosaics_jax" and not any(n == a or n.startswith(a + ".") for a in allowed)
  )
  assert not bad, f"{module} ({part}) imports {bad}; it may import only {allowed}"


def test_configs_and_experiments_import_no_flax_or_orbax():
  code = (
      "import sys, mosaics_jax.config, mosaics_jax.overrides\n"
      "from mosaics_jax import registry\n"
      "registry.all_experiments()\n"
      "heavy = [m for m in ('flax', 'orbax', 'optax', 'grain') if m in sys.modules]\n"
      "assert not heavy, heavy\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# A test of a family outside the family's own module (and the configs that define the families).
_FAMILY_BRANCH = re.compile(
    r"isinstance\([^)]*(MosaicV1Config|MosaicV2Config|LlamaConfig|GPT2Config)|\.family\s*[!=]=|"
    r"family\s+in\s*\(|\[\s*[\w.]*\.family\s*\]"
)


# Outside the family modules, only these may name a family: the PyTorch re-implementation of every
# family (torch cannot be imported by the models), nanoMosaics' and nanoGPT's formats, which
# hold v1 alone and GPT-2 alone, and transformers' format, native for Llama and GPT-2 alone.
_FAMILY_SPECIFIC = {"torch_models.py", "nanomosaics.py", "nanogpt.py", "hf.py"}


def test_no_family_branches_outside_the_family_modules():
  homes = {PACKAGE / "config.py", *(PACKAGE / "model").glob("*.py")}
  found = [
      f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
      for path in PACKAGE.rglob("*.py")
      if path not in homes and path.name not in _FAMILY_SPECIFIC
      for number, line in enumerate(path.read_text().splitlines(), 1)
      if _FAMILY_BRANCH.search(line)
  ]
  assert not found, "ask the family object instead:\n" + "\n".join(found)


def test_every_config_class_has_one_family():
  assert set(families.FAMILIES) == set(config_lib.MODEL_CONFIGS)
  for name, family in families.FAMILIES.items():
    assert family.config_class is config_lib.MODEL_CONFIGS[name]
    assert family.name == name


def test_unknown_family_names_close_matches():
  with pytest.raises(config_lib.ConfigError, match="did you mean 'mm2'"):
    families.get("mm3")
