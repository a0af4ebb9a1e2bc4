"""README.md stays true: its zoo table, its commands (as CI runs them), its code and its outputs.

Every ```python block runs and prints what its `# prints:` comments say. Every command of the
project's CLIs in a ```bash block (also inside `gcloud ... --command=` and `srun`) is parsed by that
CLI with its experiment and `--set` keys resolved; the quickstart commands run for real (slow), and
the `mosaics-info` outputs shown in ```text blocks are what the command prints.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex

import pytest

from mosaics_jax import registry
from mosaics_jax.cli import (
    bench,
    common,
    eval as eval_cli,
    generate,
    info,
    plot,
    port,
    repro,
    train,
)
from mosaics_jax.eval import tasks
from mosaics_jax.repro import plan
from mosaics_jax.train import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CLIS = {
    "mosaics-train": train,
    "mosaics-info": info,
    "mosaics-bench": bench,
    "mosaics-plot": plot,
    "mosaics-port": port,
    "mosaics-generate": generate,
    "mosaics-eval": eval_cli,
    "mosaics-repro": repro,
}


def _blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
  """Every command of our CLIs in the bash blocks, as argv (the CLI's name first)."""
  found = []
  for block in _blocks("bash"):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if not line or line.startswith("#"):
        continue
      words = shlex.split(line)
      # gcloud's --command="mosaics-train ..." holds the command as one word.
      words = [w for word in words for w in (shlex.split(word) if " " in word else [word])]
      for start, word in enumerate(words):
        if word.split("=")[-1] in CLIS:
          name = word.split("=")[-1]
          # Shell variables stand for a value of their flag's type: 0 does for every one here.
          found.append([name] + [re.sub(r"^\$\w+$", "0", w) for w in words[start + 1 :]])
          break
  return found


@pytest.mark.slow
def test_zoo_table_is_current():
  table = re.search(r"<!-- zoo-table -->\n(.*?)\n<!-- /zoo-table -->", README, flags=re.S)
  assert table, "README.md lost its zoo-table markers"
  assert table.group(1) == info.zoo_table(), "regenerate with `mosaics-info --list --markdown`"


def test_ci_runs_the_readme_commands():
  install, test = (block.strip() for block in _blocks("bash")[:2])
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert install in ci
  assert any(line.strip() == test for line in ci)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_examples_print_what_they_say(index):
  block = _blocks("python")[index]
  for optional in ("torch", "transformers"):  # The [hf] extra's, which CI's newest JAX lacks.
    if re.search(rf"^(from|import) {optional}\b", block, flags=re.M):
      pytest.importorskip(optional)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(block, {})  # noqa: S102 - the README's own example.
  claims = re.findall(r"# prints: (.*)", block)
  assert claims, "a README example should print something a reader can check"
  printed = out.getvalue().splitlines()
  for claim in claims:
    assert claim.strip() in printed


@pytest.mark.parametrize("argv", _commands(), ids=lambda argv: " ".join(argv)[:60])
def test_shell_commands_parse(argv):
  """Flags, experiment names and --set keys of every README command are real."""
  name, *args = argv
  parsed = CLIS[name]._parser().parse_args(args)
  experiment = getattr(parsed, "experiment", None)
  if name != "mosaics-plot" and (experiment or name == "mosaics-train"):
    common.experiment(experiment or train.DEFAULT_EXPERIMENT, getattr(parsed, "set", []))
  if name == "mosaics-eval" and parsed.task:
    tasks.settings(parsed.task, [a for a in parsed.set if not a.startswith("model.")])
  if name == "mosaics-repro" and parsed.name:
    plan.plan(registry.get_reproduction(parsed.name), tuple(parsed.set))


def test_every_cli_appears():
  assert {argv[0] for argv in _commands()} == set(CLIS)


@pytest.mark.slow
def test_memory_plans_shown_are_printed(capsys):
  """Each ```text block that follows a `mosaics-info ...` command is in that command's output."""
  shown = re.findall(r"`(mosaics-info [^`]*)` predicts[^\n]*:\n\n```text\n(.*?)```", README, re.S)
  assert len(shown) == 2
  for command, text in shown:
    assert info.main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    for line in text.splitlines():
      assert line in out, f"{command} no longer prints {line!r}"


@pytest.mark.slow
def test_quickstart_commands_run(tmp_path, monkeypatch, capsys):
  """The first command's training, then the Training section's quickstart commands (the Transformer
  beside it, the plot of both, a fine-tune from it), in order."""
  monkeypatch.chdir(tmp_path)
  quickstart = [argv for argv in _commands() if "quickstart" in " ".join(argv)]
  names = [argv[0] for argv in quickstart]
  assert names == ["mosaics-train", "mosaics-train", "mosaics-plot", "mosaics-train"]
  for name, *args in quickstart:
    extra = ["--no-progress"] if name == "mosaics-train" else []
    assert CLIS[name].main(args + extra) == 0, capsys.readouterr().err
  assert (tmp_path / "induction.png").stat().st_size > 0
  origin = [
      r for r in metrics.read_metrics(tmp_path / "runs/quickstart-longer") if "init_from" in r
  ]
  assert origin[0]["init_from"] == "runs/quickstart"
