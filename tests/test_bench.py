"""`mosaics-bench` prints its tables (tiny sizes: the numbers themselves are not asserted)."""

from __future__ import annotations

import re

from mosaics_jax.cli import bench


def test_ops_table(capsys):
  assert bench.main(
      ["ops", "--seq-lens", "64", "128", "--heads", "2", "--head-dim", "16", "--repeats", "1"]
  ) == 0
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if l.startswith("| short") or l.startswith("| long")]
  assert len(rows) == 4
  # Per-token time of the shortest length is the 1.00x reference of its band.
  assert rows[0].split("|")[5].strip() == "1.00x" and rows[2].split("|")[5].strip() == "1.00x"


def test_train_table(capsys):
  assert bench.main(
      ["train", "mm1-tiny", "--steps", "2", "--repeats", "1", "--matmul-size", "256",
       "--set", "train.batch_size=2", "data.seq_len=32"]
  ) == 0
  out = capsys.readouterr().out
  row = [l for l in out.splitlines() if l.startswith("| mm1-tiny")][0]
  mfu = float(re.search(r"([\d.]+)% \|$", row).group(1))
  tokens_per_second = float(row.split("|")[3])
  assert mfu > 0 and tokens_per_second > 0


def test_train_unknown_key(capsys):
  assert bench.main(["train", "mm1-tiny", "--set", "train.batch=2"]) == 2
  assert "did you mean batch_size" in capsys.readouterr().err
