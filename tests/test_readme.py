"""README.md stays true: its zoo table, its commands (as CI runs them) and its code."""

from __future__ import annotations

import pathlib
import re

from mosaics_jax.cli import info

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_zoo_table_is_current():
  table = re.search(r"<!-- zoo-table -->\n(.*?)\n<!-- /zoo-table -->", README, flags=re.S)
  assert table, "README.md lost its zoo-table markers"
  assert table.group(1) == info.zoo_table(), "regenerate with `mosaics-info --list --markdown`"


def test_ci_runs_the_readme_commands():
  install, test = (block.strip() for block in _blocks("bash")[:2])
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert install in ci
  assert test in ci


def test_python_example_runs():
  namespace: dict = {}
  exec(_blocks("python")[0], namespace)  # noqa: S102 - the README's own example.
  assert namespace["logits"].shape == (2, 100, 256)
