"""The training loop: steps, evaluation, metrics, and checkpoints with exact resume.

Everything random derives from `train.seed`: the parameters, the data order (Grain), and, at step
n, the dropout masks and the model's per-step arguments (`step.py`). A run restarted from a
checkpoint therefore continues bit for bit as if it had never stopped.

On more than one device the run lives on the mesh of `experiment.mesh` (`step.Placement`). In a
multi-process run (`mosaics_jax.distributed`) the mesh spans every process's devices: each process
reads its rows of every global batch, all of them save and restore the checkpoints together, and
process 0 alone writes metrics, progress and the plot.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time

import jax
import tqdm

from mosaics_jax import checkpoints, config as config_lib
from mosaics_jax.model import families
from mosaics_jax.train import data, metrics, optim, step as step_lib


class TrainingError(RuntimeError):
  """A run that cannot start or cannot go on; the message says why and what was kept."""


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Where a finished run stands."""

  step: int
  workdir: pathlib.Path
  val: dict[str, float] | None  # The last evaluation.
  plot: pathlib.Path | None


def evaluate(experiment, eval_step, params) -> dict[str, float]:
  """Mean loss over `eval_batches` validation batches, and answer accuracy on synthetic tasks."""
  cfg = experiment.train
  it = data.make_iterator(
      experiment.data,
      split="val",
      batch_size=cfg.batch_size,
      seed=cfg.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      repeat=True,
  )
  totals = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0, "answers": 0.0}
  for _, batch in zip(range(cfg.eval_batches), it):
    for name, value in jax.device_get(eval_step(params, batch)).items():
      totals[name] += float(value)
  out = {"loss": totals["loss_sum"] / max(totals["weight"], 1.0)}
  if totals["answers"]:
    out["accuracy"] = totals["correct"] / totals["answers"]
  return out


def _prepare_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-probe-{jax.process_index()}"  # Processes may share the workdir.
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise TrainingError(f"cannot write to workdir {workdir}: {e.strerror or e}") from None


def _check_vocab(experiment: config_lib.Experiment) -> None:
  needed = data.vocab_size(experiment.data)
  if needed > experiment.model.vocab_size:
    raise TrainingError(
        f"the data has {needed} token ids but model.vocab_size is"
        f" {experiment.model.vocab_size}; set --set model.vocab_size={needed} (or larger)"
    )


def train(
    experiment: config_lib.Experiment, workdir: str | os.PathLike, *, progress: bool = True
) -> RunResult:
  """Trains `experiment` in `workdir`, resuming from its newest readable checkpoint."""
  workdir = pathlib.Path(workdir).absolute()  # Orbax wants absolute paths.
  cfg = experiment.train
  _prepare_workdir(workdir)
  _check_vocab(experiment)
  try:
    checkpoints.check_or_save_config(workdir, experiment)
  except checkpoints.CheckpointError as e:
    raise TrainingError(str(e)) from None

  model = families.build_model(experiment.model)
  tx = optim.make_optimizer(cfg)
  placement = step_lib.make_placement(experiment, model, tx)
  train_step = step_lib.make_train_step(experiment, model, tx, placement)
  eval_step = step_lib.make_eval_step(experiment, model, placement)
  lead = jax.process_index() == 0

  train_it = data.make_iterator(
      experiment.data,
      split="train",
      batch_size=cfg.batch_size,
      seed=cfg.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  ckpts = checkpoints.Checkpoints(workdir / "checkpoints", cfg.keep_checkpoints)
  restored = ckpts.restore_latest(step_lib.abstract_state(experiment, model, tx, placement))
  last_saved = None
  if restored is None:
    state = step_lib.init_state(experiment, model, tx, placement)
  else:
    last_saved, state, data_state = restored
    train_it.set_state(data_state)
  start = int(state["step"])

  writer = metrics.MetricsWriter(workdir, resume_step=start) if lead else None
  bar = tqdm.tqdm(
      total=cfg.steps, initial=start, disable=not (progress and lead), unit="step", smoothing=0.1
  )
  tokens_per_step = cfg.batch_size * experiment.data.seq_len
  pending: list[tuple[int, dict]] = []  # Step stats not yet checked on the host.
  val = None
  clock, clock_step = time.perf_counter(), start

  def flush() -> dict | None:
    """Moves pending stats to the host; stops the run on a NaN or Inf loss."""
    nonlocal clock, clock_step
    if not pending:
      return None
    host = jax.device_get(pending)
    pending.clear()
    for step, stats in host:
      if not math.isfinite(float(stats["loss"])):
        ckpts.wait()
        kept = f"step {last_saved} in {ckpts.directory}" if last_saved else "none was saved"
        raise TrainingError(
            f"the loss is {float(stats['loss'])} at step {step}: stopped. The last good"
            f" checkpoint is {kept}; lower train.learning_rate or check the data."
        )
    now = time.perf_counter()
    step, stats = host[-1]
    record = {k: float(v) for k, v in stats.items()}
    record["tokens_per_sec"] = tokens_per_step * (step - clock_step) / max(now - clock, 1e-9)
    clock, clock_step = now, step
    return {"step": step, **record}

  try:
    for step in range(start + 1, cfg.steps + 1):
      state, stats = train_step(state, next(train_it))
      pending.append((step, stats))
      bar.update(1)
      if step % cfg.log_every == 0 or step == cfg.steps:
        record = flush()
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
        if writer:
          writer.write(record["step"], record)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        flush()
        val = evaluate(experiment, eval_step, state["params"])
        if writer:
          writer.write(step, {"step": step, "split": "val", **val})
      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        flush()  # Never save a diverged state.
        ckpts.save(step, state, train_it.get_state())
        last_saved = step
  finally:
    bar.close()
    ckpts.wait()
    ckpts.close()
    if writer:
      writer.close()

  if val is None:  # The run was already complete: report where it stands.
    val = evaluate(experiment, eval_step, state["params"])
  plot = None
  if lead:
    plot = _plot(workdir)
  return RunResult(step=int(state["step"]), workdir=workdir, val=val, plot=plot)


def _plot(workdir: pathlib.Path) -> pathlib.Path | None:
  try:
    from mosaics_jax.train import plots  # matplotlib is the optional `plots` extra.
  except ImportError:
    return None
  path = workdir / "loss.png"
  plots.plot_runs([workdir], path)
  return path
