"""The training loop: steps, evaluation, metrics, and checkpoints with exact resume.

Everything random derives from `train.seed`: the parameters, the data order (Grain), and, at step
n, the dropout masks and the model's per-step arguments (`step.py`). A run restarted from a
checkpoint therefore continues bit for bit as if it had never stopped.

What a run reads is part of the run. Its config.json names its data files by absolute paths, and
`workdir/data.json` (`workdir.record_data`) their sha256: a resume that finds a file changed warns
with both hashes. A text run's tokenizer is written to `workdir/tokenizer.json` at its first start
and read back on every resume, never rebuilt from the file as it is now: a "char" vocabulary keeps
its ids, and a character it lacks is a DataError naming it. `--restart` sets these files aside
with the rest of the run.

On more than one device the run lives on the mesh of `experiment.mesh` (`step.Placement`). In a
multi-process run (`mosaics_jax.distributed`) the mesh spans every process's devices: each process
reads its rows of every global batch, all of them save and restore the checkpoints together, and
process 0 alone writes metrics, progress, the plot, the tokenizer and the data record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any

import jax
import tqdm
from jax.experimental import multihost_utils

from mosaics_jax import checkpoints, config as config_lib, sharding, tokenizers
from mosaics_jax.model import families
from mosaics_jax.train import (
    data,
    metrics,
    optim,
    preemption as preemption_lib,
    step as step_lib,
    workdir as workdir_lib,
)


class TrainingError(RuntimeError):
  """A run that cannot start or cannot go on; the message says why and what was kept."""


class DivergedError(TrainingError):
  """A run stopped at a non-finite loss or update (a learning rate too high, bad data)."""


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Where a finished or stopped run stands."""

  step: int
  workdir: pathlib.Path
  val: dict[str, float] | None  # The last evaluation.
  plot: pathlib.Path | None
  # Set when a signal stopped the run: its `signal` and `exit_code`; the step is checkpointed.
  stopped_by: preemption_lib.Preemption | None = None


def evaluate(
    experiment, eval_step, params, tokenizer: tokenizers.Tokenizer | None = None
) -> dict[str, float]:
  """Mean loss over `eval_batches` validation batches, and answer accuracy on synthetic tasks;
  `tokenizer` is a text run's own (`data.make_iterator`)."""
  cfg = experiment.train
  it = data.make_iterator(
      experiment.data,
      split="val",
      batch_size=cfg.batch_size,
      seed=cfg.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      repeat=True,
      tokenizer=tokenizer,
  )
  totals = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0, "answers": 0.0}
  for _, batch in zip(range(cfg.eval_batches), it):
    for name, value in jax.device_get(eval_step(params, batch)).items():
      totals[name] += float(value)
  out = {"loss": totals["loss_sum"] / max(totals["weight"], 1.0)}
  if totals["answers"]:
    out["accuracy"] = totals["correct"] / totals["answers"]
  return out


def _check_vocab(experiment: config_lib.Experiment, tokenizer: tokenizers.Tokenizer | None) -> None:
  needed = data.vocab_size(experiment.data, tokenizer)
  if needed > experiment.model.vocab_size:
    raise TrainingError(
        f"the data has {needed} token ids but model.vocab_size is"
        f" {experiment.model.vocab_size}; set --set model.vocab_size={needed} (or larger)"
    )


# Bytes per parameter of a training state: float32 parameters, AdamW's two moments, gradients.
STATE_BYTES_PER_PARAM = 16


def _check_memory(experiment: config_lib.Experiment) -> None:
  """Refuses, before anything is allocated, a model whose training state cannot fit the devices
  (on CPU the host's memory), with the estimate (`analysis.memory_plan` plans it per device)."""
  params = families.param_count(experiment.model)
  needed = params * STATE_BYTES_PER_PARAM
  available = sharding.memory_available() * jax.process_count()
  if needed > available:
    raise TrainingError(
        f"{experiment.model.family} with {params:,} parameters needs about {needed / 2**30:,.1f}"
        f" GiB for its parameters, AdamW state and gradients, but the {jax.device_count()}"
        f" {jax.default_backend()} device(s) here have {available / 2**30:,.1f} GiB; plan the run"
        " with `mosaics-info EXPERIMENT --mesh ...` and train it on a larger mesh"
    )


@dataclasses.dataclass(frozen=True)
class InitFrom:
  """Parameters a run starts from instead of random ones (fine-tuning), and where they come from."""

  params: Any
  origin: str  # The workdir or exported directory, for the record.
  step: int | None  # Its training step, when known.


def train(
    experiment: config_lib.Experiment,
    workdir: str | os.PathLike,
    *,
    progress: bool = True,
    init_from: InitFrom | None = None,
    restart: bool = False,
    utilisation: metrics.Utilisation | None = None,
) -> RunResult:
  """Trains `experiment` in `workdir`, resuming from its newest readable checkpoint.

  Args:
    experiment: what to train.
    workdir: the run directory; one run at a time holds it.
    progress: show a progress bar (process 0).
    init_from: parameters to start from when the workdir has no checkpoint (fine-tuning); a run
      that resumes resumes, whatever `init_from` says.
    restart: move the workdir's run files aside (`workdir.set_aside`) and start over.
    utilisation: what MFU is measured against (`analysis.utilisation.of`, as `mosaics-train`
      passes it); the training records carry `mfu` only with it, and each start of the run
      records it once, as a record of split "mfu".

  Raises:
    TrainingError: the run cannot start (the message says why) or cannot go on (a non-finite loss
      or update; the message names the last finite step and the checkpoint that holds it).
  """
  workdir = pathlib.Path(workdir).absolute()  # Orbax wants absolute paths.
  lead = jax.process_index() == 0
  try:
    workdir_lib.prepare(workdir)
    lock = workdir_lib.WorkdirLock(workdir) if lead else contextlib.nullcontext()
    # Signals are recorded from here on: one that comes while the step compiles stops the run
    # after its first step (in a multi-process run its first log step), with a checkpoint.
    # Processes agree on a signal where the loop waits for the step's stats anyway.
    preemption = preemption_lib.Preemption(agree_every=experiment.train.log_every)
    with lock, preemption:
      return _train(experiment, workdir, progress, init_from, restart, preemption, utilisation)
  except (workdir_lib.WorkdirError, checkpoints.CheckpointError) as e:
    raise TrainingError(str(e)) from None


def _train(experiment, workdir, progress, init_from, restart, preemption, utilisation) -> RunResult:
  cfg = experiment.train
  lead = jax.process_index() == 0
  if restart:
    aside = workdir_lib.set_aside(workdir) if lead else None
    if jax.process_count() > 1:  # Moved before any process looks for checkpoints.
      multihost_utils.sync_global_devices("mosaics_restart")
    if aside is not None:
      print(f"mosaics-train: the previous run's files are in {aside}", file=sys.stderr)
  # Relative paths would name other files from another directory (evaluation, a later resume).
  experiment = dataclasses.replace(experiment, data=data.absolute(experiment.data))
  tokenizer, kept = _run_tokenizer(experiment.data, workdir)
  _check_vocab(experiment, tokenizer)
  _check_memory(experiment)
  ckpt_dir = workdir / checkpoints.CHECKPOINTS_DIR
  # Config checks and saves come after every check of the experiment: config.json is written
  # only for a run that can start.
  model = families.build_model(experiment.model)
  tx = optim.make_optimizer(cfg)
  placement = step_lib.make_placement(experiment, model, tx)
  ckpts = checkpoints.Checkpoints(ckpt_dir, cfg.keep_checkpoints)
  try:
    checkpoints.check_or_save_config(workdir, experiment, has_checkpoints=bool(ckpts.steps()))
    saved_layout = None
  except checkpoints.LayoutMismatch as e:  # Restored in the saved layout, then converted.
    saved_layout = e.saved_scan_layers
  if lead and tokenizer is not None and not kept:  # The trained model reads and writes text.
    tokenizers.save(tokenizer, workdir)
  train_step = step_lib.make_train_step(experiment, model, tx, placement)
  eval_step = step_lib.make_eval_step(experiment, model, placement)

  train_it = data.make_iterator(
      experiment.data,
      split="train",
      batch_size=cfg.batch_size,
      seed=cfg.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      tokenizer=tokenizer,
  )
  template = step_lib.abstract_state(experiment, model, tx, placement)
  try:
    restored = ckpts.restore_latest(
        template if saved_layout is None else _layout_template(experiment, tx, saved_layout),
        # One batch per step: the data state of step n is after n batches.
        check_data=lambda step, state: data.check_state(state, batches=step),
    )
  except checkpoints.NoReadableCheckpoint as e:
    ckpts.close()
    raise TrainingError(
        f"{e}. To start over, run the same command with --restart: it moves the old run's files"
        f" aside into {workdir}/restarted-<time>/"
    ) from None
  except checkpoints.CheckpointMismatch:
    ckpts.close()
    raise
  last_saved = None
  if restored is None:
    state = step_lib.init_state(experiment, model, tx, placement)
    if init_from is not None:
      state["params"] = _placed(init_from.params, state["params"])
  else:
    last_saved, state, data_state = restored
    train_it.set_state(data_state)
    if saved_layout is not None:
      state = _placed(_to_layout(state, experiment.model), template)
      checkpoints.check_or_save_config(workdir, experiment, has_checkpoints=False)
      if lead:
        print(
            f"mosaics-train: converted the train state of step {last_saved} from"
            f" model.scan_layers={saved_layout} to {experiment.model.scan_layers}",
            file=sys.stderr,
        )
  start = int(state["step"])
  if lead:
    kept_file = workdir / tokenizers.TOKENIZER_FILE
    goes_on = {  # The data file is read as it is now; the tokenizer file not at all.
        "path": "the run goes on with it as it is now"
        + (f", tokenised by its own tokenizer {kept_file}" if tokenizer else ""),
        "tokenizer_path": f"the run goes on with its own tokenizer, {kept_file}",
    }
    changed = workdir_lib.record_data(workdir, data.files(experiment.data), start)
    for field, change in changed.items():
      warnings.warn(f"{change}: {goes_on[field]}", stacklevel=2)

  writer = metrics.MetricsWriter(workdir, resume_step=start) if lead else None
  if writer and restored is None and init_from is not None:
    writer.write(0, {"split": "init", "init_from": init_from.origin, "init_step": init_from.step})
  if writer and utilisation is not None:  # Each start: a resumed run may run on other devices.
    writer.write(start, {"split": "mfu", **dataclasses.asdict(utilisation)})
  bar = tqdm.tqdm(
      total=cfg.steps, initial=start, disable=not (progress and lead), unit="step", smoothing=0.1
  )
  # Before each save the parameters must give a finite loss on this validation batch: finite
  # parameters can still overflow (a learning rate far too large), and no checkpoint may diverge.
  probe = next(
      data.make_iterator(
          experiment.data,
          split="val",
          batch_size=cfg.batch_size,
          seed=cfg.seed,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
          tokenizer=tokenizer,
      )
  )
  tokens_per_step = cfg.batch_size * experiment.data.seq_len
  devices = jax.device_count()  # The mesh spans every device (`step.make_placement`).
  pending: list[tuple[int, dict]] = []  # Step stats not yet checked on the host.
  val = None
  clock, clock_step = time.perf_counter(), start

  def diverged(step: int, what: str) -> DivergedError:
    ckpts.wait()
    if last_saved:
      kept = (
          f"The newest checkpoint, step {last_saved} in {ckpts.directory}, holds parameters that"
          " are finite and give a finite loss; the run resumes from it"
      )
    else:
      kept = "No checkpoint was saved before it"
    return DivergedError(
        f"stopped at step {step}: {what}. {kept}. Lower train.learning_rate or check the data."
    )

  def flush() -> dict | None:
    """Moves pending stats to the host; stops the run at the first non-finite loss or update.
    Returns the newest step's stats, as they are: the steps between log steps are checked, not
    averaged in."""
    nonlocal clock, clock_step
    if not pending:
      return None
    host = jax.device_get(pending)
    pending.clear()
    for step, stats in host:
      loss, finite = float(stats["loss"]), bool(stats.pop(step_lib.FINITE))
      if not math.isfinite(loss):
        raise diverged(step, f"the loss is {loss}")
      if not finite:
        raise diverged(step, "its update left parameters that are not finite")
    now = time.perf_counter()
    step, stats = host[-1]
    record = {k: float(v) for k, v in stats.items()}
    record["tokens_per_sec"] = tokens_per_step * (step - clock_step) / max(now - clock, 1e-9)
    record["tokens_per_sec_per_device"] = record["tokens_per_sec"] / devices
    if utilisation is not None:
      record["mfu"] = utilisation.mfu(record["tokens_per_sec_per_device"])
    clock, clock_step = now, step
    return {"step": step, **record}

  def save(step: int) -> None:
    nonlocal last_saved, clock
    flush()  # Never save a diverged state.
    if last_saved == step:
      return
    if not math.isfinite(float(jax.device_get(eval_step(state["params"], probe))["loss_sum"])):
      raise diverged(step, "its parameters give a non-finite loss on a validation batch")
    ckpts.save(step, state, train_it.get_state())
    last_saved = step
    clock = time.perf_counter()  # The rates measure training steps, not saves (flush came first).

  stopped_by = None
  try:
    for step in range(start + 1, cfg.steps + 1):
      state, stats = train_step(state, next(train_it))
      pending.append((step, stats))
      bar.update(1)
      if step % cfg.log_every == 0 or step == cfg.steps:
        record = flush()
        postfix = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_sec']:.0f}"}
        if "mfu" in record:
          postfix["mfu"] = f"{record['mfu']:.1%}"
        bar.set_postfix(postfix)
        if writer:
          writer.write(record["step"], record)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        flush()
        val = evaluate(experiment, eval_step, state["params"], tokenizer)
        clock = time.perf_counter()  # The rates measure training steps, not evaluations.
        if writer:
          writer.write(step, {"step": step, "split": "val", **val})
      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        save(step)
      if preemption.should_stop(step):
        save(step)
        stopped_by = preemption
        break
  finally:
    bar.close()
    ckpts.wait()
    ckpts.close()
    if writer:
      writer.close()

  if stopped_by is not None:
    return RunResult(
        step=int(state["step"]), workdir=workdir, val=val, plot=None, stopped_by=stopped_by
    )
  if val is None:  # The run was already complete: report where it stands.
    val = evaluate(experiment, eval_step, state["params"], tokenizer)
  plot = _plot(workdir) if lead else None
  return RunResult(step=int(state["step"]), workdir=workdir, val=val, plot=plot)


def _run_tokenizer(
    cfg: config_lib.DataConfig, workdir: pathlib.Path
) -> tuple[tokenizers.Tokenizer | None, bool]:
  """A text run's tokenizer, and whether it is the one its workdir keeps: a run that has saved a
  checkpoint reads back the tokenizer of its first start. None for data without one."""
  if cfg.source not in data.TEXT_SOURCES:
    return None, False
  if checkpoints.saved_steps(workdir):
    try:
      kept = tokenizers.load(workdir)
    except ValueError as e:
      raise TrainingError(f"{e}: restore it, or start the run over with --restart") from None
    if kept is not None:  # Runs from before tokenizers were kept have none.
      return kept, True
  return data.load_tokenizer(cfg), False


def _layout_template(experiment: config_lib.Experiment, tx, scan_layers: bool) -> step_lib.State:
  """The abstract train state of `experiment` with its layers scanned or not, as saved."""
  saved = dataclasses.replace(
      experiment, model=dataclasses.replace(experiment.model, scan_layers=scan_layers)
  )
  model = families.build_model(saved.model)
  return step_lib.abstract_state(saved, model, tx, step_lib.make_placement(saved, model, tx))


def _to_layout(state: step_lib.State, config: config_lib.ModelConfig) -> step_lib.State:
  """A train state in `config`'s layers' layout (`families.to_layout`): the parameters and every
  subtree of the optimizer state shaped like them (AdamW's moments)."""
  names = set(state["params"])
  like_params = lambda x: isinstance(x, dict) and set(x) == names
  return jax.tree.map(
      lambda x: families.to_layout(x, config) if like_params(x) else x,
      state,
      is_leaf=like_params,
  )


def _placed(params: Any, like: Any) -> Any:
  """`params` (host or device arrays) with the dtypes and shardings of `like`'s leaves."""
  return jax.tree.map(
      lambda x, y: jax.device_put(jax.numpy.asarray(x, y.dtype), y.sharding), params, like
  )


def _plot(workdir: pathlib.Path) -> pathlib.Path | None:
  try:
    from mosaics_jax.train import plots  # matplotlib is the optional `plots` extra.
  except ImportError:
    return None
  path = workdir / "loss.png"
  plots.plot_runs([workdir], path)
  return path
