"""What a run reads is part of the run (issue 29, cases 1, 3 and 7's tokenizer.json): a char run's
tokenizer is fixed at its first start, a resume on a changed text warns with both hashes or names
the characters the tokenizer lacks, `--restart` sets the tokenizer and the data record aside, and
perplexity scores the run's own file from any directory, recording its absolute path and sha256.
The same run's log carries MFU (issue 34).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import warnings

import jax
import pytest
import test_metrics
import tiny_runs

from mosaics_jax import config as config_lib, tokenizers
from mosaics_jax.analysis import flops
from mosaics_jax.cli import eval as eval_cli, train as train_cli
from mosaics_jax.train import metrics

# One "!" at the very end: truncating the text loses a character; no tab anywhere.
BODY = "the cat sat on the mat; the dog sat on the log.\n" * 40
TEXT = BODY + "!"


def _train(workdir: str, *, steps: int = 2, restart: bool = False) -> int:
  """mosaics-train on the tiny char run of input.txt (relative: the current directory's)."""
  argv = ["--experiment", "mm2-tiny", "--workdir", workdir, "--no-progress"]
  return train_cli.main(
      argv
      + (["--restart"] if restart else [])
      + ["--set"]
      + tiny_runs.TINY_SETS
      + ["data.source=text", "data.path=input.txt", "data.tokenizer=char", f"train.steps={steps}"]
  )


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A directory holding input.txt (TEXT) and W, a char run of 2 steps trained there."""
  root = tmp_path_factory.mktemp("trained")
  (root / "input.txt").write_text(TEXT)
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(root)
    assert _train("W") == 0
  return root


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
  """A copy of `trained` of this test's own, the current directory."""
  root = tmp_path / "run"
  shutil.copytree(trained, root)
  monkeypatch.chdir(root)
  return root


def test_the_log_carries_mfu_and_tokens_per_device(trained):
  """`mosaics-train` records what MFU is measured against once, at the start, and each training
  record's `tokens_per_sec_per_device` and `mfu`, in metrics.jsonl and TensorBoard."""
  workdir = trained / "W"
  records = metrics.read_metrics(workdir)
  (basis,) = [r for r in records if r.get("split") == "mfu"]
  assert basis["step"] == 0 and basis["device_kind"] == "cpu"
  assert basis["peak_source"].startswith("float32") and basis["peak_flops_per_second"] > 0
  # The paper convention: 3 x the forward FLOPs `mosaics-info` counts at the run's context.
  config = json.loads((workdir / "config.json").read_text())
  model = config_lib.from_dict(config_lib.ModelConfig, config["model"])
  forward = flops.count(model, context=config["data"]["seq_len"]).flops_per_token
  assert basis["train_flops_per_token"] == 3 * forward
  (record,) = [r for r in records if "split" not in r]
  assert record["tokens_per_sec_per_device"] == record["tokens_per_sec"] / jax.device_count()
  model_rate = record["tokens_per_sec_per_device"] * basis["train_flops_per_token"]
  assert record["mfu"] == pytest.approx(model_rate / basis["peak_flops_per_second"], rel=1e-12)
  assert 0 < record["mfu"] < 1
  events = test_metrics._events(workdir / metrics.TENSORBOARD_DIR)
  scalars = test_metrics._scalars(events)
  assert scalars["train/mfu"] == [(2, pytest.approx(record["mfu"]))]
  assert scalars["train/tokens_per_sec_per_device"] == [
      (2, pytest.approx(record["tokens_per_sec_per_device"]))
  ]


def test_a_resume_keeps_the_runs_tokenizer_when_the_text_loses_a_character(run):
  saved = (run / "W" / "tokenizer.json").read_bytes()
  before = _sha256(run / "input.txt")
  (run / "input.txt").write_text(BODY)  # Truncated: "!" is gone, every id after it would shift.
  with pytest.warns(UserWarning, match="data.path changed") as caught:
    assert _train("W", steps=4) == 0
  message = " ".join(str(w.message) for w in caught)
  assert before in message and _sha256(run / "input.txt") in message
  assert (run / "W" / "tokenizer.json").read_bytes() == saved
  assert tokenizers.load(run / "W") == tokenizers.CharTokenizer.from_text(TEXT)
  record = json.loads((run / "W" / "data.json").read_text())
  assert record["step"] == 2 and record["files"]["path"]["sha256"] == _sha256(run / "input.txt")
  assert [e["files"]["path"]["sha256"] for e in record["earlier"]] == [before]
  assert json.loads((run / "W" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_a_resume_on_a_character_the_tokenizer_lacks_is_named(run, capsys):
  saved = (run / "W" / "tokenizer.json").read_bytes()
  (run / "input.txt").write_text("\t" + TEXT)  # A tab sorts first: every id would shift.
  assert _train("W", steps=4) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("mosaics-train: error: ")
  assert "['\\t']" in err and str(run / "input.txt") in err and "--restart" in err
  assert (run / "W" / "tokenizer.json").read_bytes() == saved
  assert sorted(p.name for p in (run / "W" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_restart_sets_the_tokenizer_and_data_record_aside(run):
  old = {name: (run / "W" / name).read_bytes() for name in ("tokenizer.json", "data.json")}
  (run / "input.txt").write_text("\t" + TEXT)
  assert _train("W", restart=True) == 0
  (aside,) = (run / "W").glob("restarted-*")
  assert {name: (aside / name).read_bytes() for name in old} == old
  assert tokenizers.load(run / "W") == tokenizers.CharTokenizer.from_text("\t" + TEXT)
  record = json.loads((run / "W" / "data.json").read_text())
  assert record == {
      "step": 0,
      "files": {
          "path": {
              "path": str(run / "input.txt"),
              "sha256": _sha256(run / "input.txt"),
              "bytes": len(("\t" + TEXT).encode()),
          }
      },
      "earlier": [],
  }


def _perplexity(workdir: str | pathlib.Path, out: pathlib.Path, *sets: str) -> int:
  return eval_cli.main(
      [str(workdir), "--task", "perplexity", "--no-progress", "--out", str(out), "--set"]
      + ["perplexity.length=64", "perplexity.num_examples=4", "perplexity.num_buckets=1", *sets]
  )


def _records(out: pathlib.Path) -> dict[str, dict]:
  return {r["metric"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_perplexity_reads_the_runs_own_file_from_any_directory(trained, tmp_path, monkeypatch):
  """`cd elsewhere && mosaics-eval ../W --task perplexity`, elsewhere holding another input.txt."""
  text = trained / "input.txt"
  config = json.loads((trained / "W" / "config.json").read_text())
  assert config["data"]["path"] == str(text)  # Absolute, though given as input.txt.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "input.txt").write_text("the log sat on the dog; the mat sat on the cat.\n" * 40)
  monkeypatch.chdir(elsewhere)
  workdir = os.path.relpath(trained / "W")
  assert _perplexity(workdir, elsewhere / "default.jsonl") == 0
  assert _perplexity(workdir, elsewhere / "named.jsonl", f"perplexity.path={text}") == 0
  assert _perplexity(workdir, elsewhere / "decoy.jsonl", "perplexity.path=input.txt") == 0
  default, named, decoy = (
      _records(elsewhere / f) for f in ("default.jsonl", "named.jsonl", "decoy.jsonl")
  )
  assert default["loss"]["settings"]["path"] == str(text)
  assert default["loss"]["settings"]["sha256"] == _sha256(text)
  assert default["loss"]["value"] == named["loss"]["value"] != decoy["loss"]["value"]
  assert decoy["loss"]["settings"]["path"] == str(elsewhere / "input.txt")  # Named: absolute.


def test_perplexity_refuses_the_runs_file_once_it_changed(run, tmp_path, monkeypatch, capsys):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # The file moved, its content did not: nothing to say.
    assert _train("W") == 0  # The copy's record now names the copy's text.
  before = _sha256(run / "input.txt")
  (run / "input.txt").write_text(BODY)
  monkeypatch.chdir(tmp_path)
  assert _perplexity(run / "W", tmp_path / "out.jsonl") == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("mosaics-eval: error: ")
  assert before in err and _sha256(run / "input.txt") in err and "perplexity.path=" in err
  assert not (tmp_path / "out.jsonl").exists()


def test_perplexity_refuses_an_older_runs_relative_path(run, tmp_path, monkeypatch, capsys):
  """A run trained before paths were recorded names input.txt relative to an unknown directory:
  the input.txt of the current directory is not read in its place."""
  config = json.loads((run / "W" / "config.json").read_text())
  config["data"]["path"] = "input.txt"
  (run / "W" / "config.json").write_text(json.dumps(config))
  (run / "W" / "data.json").unlink(missing_ok=True)  # Older runs have none.
  monkeypatch.chdir(run)  # Where an input.txt is: it happens to be the right one, unknowably.
  assert _perplexity(run / "W", tmp_path / "out.jsonl") == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "'input.txt' relative to the directory" in err and "set perplexity.path=FILE" in err


@pytest.mark.parametrize(
    "content, error",
    [
        ("{", "Expecting property name"),
        ("[1, 2]", "it holds a list, not a JSON object"),
        ('{"chars": "ab"}', "it has no 'kind' field"),
        ('{"kind": "words"}', "unknown kind 'words'"),
        ('{"kind": "char", "chars": ""}', "not a non-empty string"),
        ('{"kind": "char", "chars": "ba"}', "'ba' are not sorted and distinct"),  # Wrong ids.
        ('{"kind": "char", "chars": "aab"}', "'aab' are not sorted and distinct"),
        ('{"kind": "char", "chars": "a\\ud800"}', "surrogates not allowed"),
        ('{"kind": "hf", "tokenizer": 5}', "the tokenizers library refuses it"),
        ('{"kind": "hf", "tokenizer": {"model": 3}}', "the tokenizers library refuses it"),
        (b"\xff\xfe", "can't decode byte"),
    ],
)
def test_a_malformed_tokenizer_json_is_a_value_error_naming_it(tmp_path, content, error):
  pytest.importorskip("tokenizers")
  path = tmp_path / tokenizers.TOKENIZER_FILE
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not a tokenizer: ") as caught:
    tokenizers.load(tmp_path)
  assert error in str(caught.value)
