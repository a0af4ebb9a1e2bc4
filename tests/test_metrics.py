"""Run metrics: the jsonl record, resume truncation, TensorBoard events, and `mosaics-plot`."""

from __future__ import annotations

import json
import math
import pathlib
import struct
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mosaics_jax.cli import plot as plot_cli
from mosaics_jax.train import metrics


def _strict_lines(run: pathlib.Path) -> list[dict]:
  """The lines of metrics.jsonl parsed as strict JSON: NaN or Infinity fail."""

  def reject(constant):
    raise AssertionError(f"not strict JSON: {constant}")

  text = (run / metrics.METRICS_FILE).read_text()
  return [json.loads(line, parse_constant=reject) for line in text.splitlines()]


def _write_steps(run: pathlib.Path, steps, **kwargs) -> None:
  with metrics.MetricsWriter(run, tensorboard=False, **kwargs) as writer:
    for step in steps:
      writer.write(
          step, {"loss": 10.0 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 100.0}
      )


def test_round_trip_of_python_numpy_and_jax_scalars(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write(
        np.int64(3),
        {
            "loss": np.float32(2.5),
            "lr": jnp.asarray(1e-3, jnp.float32),
            "grad_norm": jnp.asarray(0.5, jnp.bfloat16),
            "tokens_per_sec": 1234.5,
            "tokens": jnp.asarray(4096, jnp.int32),
            "skipped": np.bool_(False),
            "nan": float("nan"),
            "inf": np.float64(-np.inf),
            "note": "warm-up",
        },
    )
    writer.write(4, {"step": 4, "split": "val", "loss": 2.25, "accuracy": jnp.asarray(0.75)})
  lines = _strict_lines(tmp_path)
  assert lines == metrics.read_metrics(tmp_path)
  train, val = lines
  assert train["step"] == 3 and type(train["step"]) is int
  assert "split" not in train and train["time"] > 0
  assert train["loss"] == 2.5 and train["lr"] == pytest.approx(1e-3)
  assert train["grad_norm"] == 0.5
  assert train["tokens"] == 4096 and type(train["tokens"]) is int
  assert train["skipped"] is False and train["note"] == "warm-up"
  assert train["nan"] is None and train["inf"] is None
  assert {k: val[k] for k in ("step", "split", "loss", "accuracy")} == {
      "step": 4,
      "split": "val",
      "loss": 2.25,
      "accuracy": 0.75,
  }


def test_write_rejects_what_it_cannot_record(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match="not a scalar"):
      writer.write(1, {"loss": np.ones(2)})
    with pytest.raises(ValueError, match="differs"):
      writer.write(1, {"step": 2, "loss": 1.0})
    with pytest.raises(ValueError, match="time"):
      writer.write(1, {"time": 1.0})
  with pytest.raises(ValueError, match="closed"):
    writer.write(1, {"loss": 1.0})
  assert metrics.read_metrics(tmp_path) == []


def test_two_writers_append_to_one_file(tmp_path):
  _write_steps(tmp_path, [1, 2])
  _write_steps(tmp_path, [3, 4])
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_truncate_after_drops_later_steps_and_a_torn_line(tmp_path):
  _write_steps(tmp_path, range(1, 6))
  path = tmp_path / metrics.METRICS_FILE
  with path.open("a") as f:
    f.write('{"step": 6, "split": "tr')
  assert metrics.truncate_after(tmp_path, 3) == 3  # Steps 4 and 5, and the torn line.
  assert [r["step"] for r in _strict_lines(tmp_path)] == [1, 2, 3]
  assert path.read_text().endswith("\n")
  assert metrics.truncate_after(tmp_path, 3) == 0
  assert metrics.truncate_after(tmp_path / "elsewhere", 3) == 0


def test_resumed_writer_leaves_no_duplicate_steps(tmp_path):
  _write_steps(tmp_path, range(1, 6))  # Checkpointed at step 2, then killed after step 5.
  with (tmp_path / metrics.METRICS_FILE).open("a") as f:
    f.write('{"step": 6')
  _write_steps(tmp_path, range(3, 8), resume_step=2)
  assert [r["step"] for r in _strict_lines(tmp_path)] == list(range(1, 8))


def test_a_new_writer_repairs_a_torn_line_before_appending(tmp_path):
  _write_steps(tmp_path, [1])
  with (tmp_path / metrics.METRICS_FILE).open("a") as f:
    f.write('{"step": 2, "loss"')
  _write_steps(tmp_path, [2])
  assert [r["step"] for r in _strict_lines(tmp_path)] == [1, 2]


def test_read_metrics_tolerates_only_a_torn_last_line(tmp_path):
  _write_steps(tmp_path, [1, 2])
  path = tmp_path / metrics.METRICS_FILE
  with path.open("a") as f:
    f.write('{"step": 3, "loss": 0.')
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2]
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
    metrics.read_metrics(tmp_path)
  with pytest.raises(FileNotFoundError):
    metrics.read_metrics(tmp_path / "missing")


def _events(logdir: pathlib.Path) -> list:
  """The events of every TensorBoard file under `logdir`, read with tensorboardX's protos."""
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    # TFRecord framing: length (uint64), its CRC (uint32), payload, the payload's CRC (uint32).
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      offset += 12
      events.append(event_pb2.Event.FromString(data[offset : offset + length]))
      offset += length + 4
  return events


def _scalars(events) -> dict[str, list[tuple[int, float]]]:
  scalars = {}
  for event in events:
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_events_hold_the_same_scalars(tmp_path):
  pytest.importorskip("tensorboardX")
  with metrics.MetricsWriter(tmp_path) as writer:
    for step in (1, 2):
      writer.write(
          step,
          {
              "loss": 3.0 - step,
              "lr": 0.1 * step,
              "grad_norm": np.float32(0.5),
              "tokens_per_sec": 1e4,
              "note": "text is not a scalar",
          },
      )
    writer.write(2, {"split": "val", "loss": 1.5, "accuracy": 0.25})
  logdir = tmp_path / metrics.TENSORBOARD_DIR
  files = list(logdir.glob("events.out.tfevents.*"))
  assert files and all(f.stat().st_size > 0 for f in files)
  scalars = _scalars(_events(logdir))
  assert scalars["train/loss"] == [(1, 2.0), (2, 1.0)]
  assert scalars["train/lr"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
  assert scalars["train/grad_norm"] == [(1, 0.5), (2, 0.5)]
  assert scalars["val/loss"] == [(2, 1.5)]
  assert scalars["val/accuracy"] == [(2, 0.25)]
  assert "train/note" not in scalars


def test_resumed_tensorboard_writer_purges_the_lost_steps(tmp_path):
  pytest.importorskip("tensorboardX")
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  with metrics.MetricsWriter(tmp_path, resume_step=7):
    pass
  starts = [
      e.step
      for e in _events(tmp_path / metrics.TENSORBOARD_DIR)
      if e.session_log.status == event_pb2.SessionLog.START
  ]
  assert starts == [8]


def test_without_tensorboardx_it_warns_and_writes_jsonl(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # Makes the import fail.
  with pytest.warns(UserWarning, match="tensorboardX"):
    writer = metrics.MetricsWriter(tmp_path)
  with writer:
    writer.write(1, {"loss": 1.0})
  assert [r["loss"] for r in metrics.read_metrics(tmp_path)] == [1.0]
  assert not (tmp_path / metrics.TENSORBOARD_DIR).exists()


def test_ema_is_debiased_and_skips_gaps():
  plots = pytest.importorskip("mosaics_jax.plots")
  np.testing.assert_allclose(plots.ema([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])
  np.testing.assert_array_equal(plots.ema([1.0, 3.0], 0.0), [1.0, 3.0])
  smoothed = plots.ema([1.0, math.nan, 3.0], 0.5)
  assert smoothed[0] == 1.0 and math.isnan(smoothed[1])
  assert smoothed[2] == pytest.approx((0.5 * 0.5 * 1.0 + 0.5 * 3.0) / 0.75)
  with pytest.raises(ValueError, match="smoothing"):
    plots.ema([1.0], 1.0)


def _fake_run(run: pathlib.Path, scale: float) -> None:
  with metrics.MetricsWriter(run, tensorboard=False) as writer:
    for step in range(1, 101):
      writer.write(
          step,
          {"loss": scale * (1 + 5 / step), "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1e3},
      )
      if step % 25 == 0:
        writer.write(step, {"split": "val", "loss": scale * (1.1 + 5 / step), "accuracy": 0.5})


def _png_size(path: pathlib.Path) -> tuple[int, int]:
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def test_plot_of_two_runs_is_a_png_of_the_requested_size(tmp_path, capsys):
  pytest.importorskip("matplotlib")
  _fake_run(tmp_path / "mm2-tiny", 1.0)
  _fake_run(tmp_path / "llama-tiny", 1.2)
  out = tmp_path / "figures" / "loss.png"
  argv = [
      str(tmp_path / "mm2-tiny"),
      str(tmp_path / "llama-tiny"),
      "-o",
      str(out),
      "--log-y",
      "--title",
      "tiny runs",
      "--smooth",
      "0.9",
  ]
  assert plot_cli.main(argv) == 0
  assert capsys.readouterr().out.strip() == str(out)
  assert _png_size(out) == (800, 500)


def test_plot_runs_sizes_the_figure(tmp_path):
  plots = pytest.importorskip("mosaics_jax.plots")
  _fake_run(tmp_path / "run", 1.0)
  out = plots.plot_runs([tmp_path / "run"], tmp_path / "loss.png", size=(4.0, 3.0), dpi=50)
  assert _png_size(out) == (200, 150)


def test_plot_of_a_directory_without_metrics_fails_naming_it(tmp_path, capsys):
  pytest.importorskip("matplotlib")
  _fake_run(tmp_path / "good", 1.0)
  (tmp_path / "empty-run").mkdir()
  out = tmp_path / "loss.png"
  argv = [str(tmp_path / "good"), str(tmp_path / "empty-run"), "-o", str(out)]
  assert plot_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert str(tmp_path / "empty-run") in err and "metrics.jsonl" in err
  assert not out.exists()
