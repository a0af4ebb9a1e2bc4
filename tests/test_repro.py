"""Reproductions: every declaration validates, bad ones are named, the dry run counts FLOPs as
mosaics-info does, a report's numbers are the runs' own results, and a tiny reproduction trains,
resumes after an interruption, evaluates and reports."""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics

import numpy as np
import pytest

from mosaics_jax import registry
from mosaics_jax.cli import info as info_cli, repro as repro_cli
from mosaics_jax.repro import declaration as decl, plan as plan_lib, report as report_lib, runner
from mosaics_jax.train import metrics, preemption

# A tiny reproduction: the quickstart task in a few steps, two architectures of equal size.
_BUDGET = ("train.steps=8", "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=4")
TINY = decl.Reproduction(
    name="tiny",
    claim="a claim",
    source="nowhere",
    scale="cpu",
    runs=(
        decl.Run(name="mm1", experiment="quickstart", overrides=_BUDGET),
        decl.Run(
            name="llama", experiment="quickstart-llama", overrides=("model.ffn_width=48", *_BUDGET)
        ),
    ),
    evaluations=(
        decl.Evaluation(task=decl.TRAINING),
        decl.Evaluation(
            task="synthetic", settings=("synthetic.lengths=[64,128]", "synthetic.num_examples=8")
        ),
    ),
    checks=(
        decl.Check(
            description="mm1 ahead at 128",
            left=decl.Quantity(
                run="mm1", evaluation="synthetic", metric="accuracy", where=(("length", 128),)
            ),
            op=">=",
            right=decl.Quantity(
                run="llama", evaluation="synthetic", metric="accuracy", where=(("length", 128),)
            ),
        ),
    ),
    paper=(
        decl.PaperNumber(
            what="mm1 at 64",
            value=1.0,
            ours=decl.Quantity(
                run="mm1", evaluation="synthetic", metric="accuracy", where=(("length", 64),)
            ),
        ),
    ),
    equal_params=(("mm1", "llama"),),
)


@functools.cache
def _planned(name: str) -> list[plan_lib.PlannedRun]:
  """The plan of a declared reproduction (the paper-scale ones take seconds to count)."""
  return plan_lib.plan(registry.get_reproduction(name))


def _scale_marks(name: str):
  """The paper-scale plans count 2B-10B-parameter models (seconds each): the slow suite's."""
  slow = registry.get_reproduction(name).scale == "paper"
  return pytest.param(name, marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize("name", [_scale_marks(n) for n in sorted(registry.all_reproductions())])
def test_every_declared_reproduction_validates(name):
  repro = registry.get_reproduction(name)
  planned = _planned(name)
  assert [p.run.name for p in planned] == [r.name for r in repro.runs]
  assert repro.checks, "a reproduction without a criterion has no verdict"
  for p in planned:
    assert (
        p.tokens
        == p.experiment.train.steps * p.experiment.train.batch_size * p.experiment.data.seq_len
    )


def test_cpu_reproductions_compare_equal_sizes_on_equal_budgets():
  for repro in registry.all_reproductions().values():
    if repro.scale != "cpu":
      continue
    planned = {p.run.name: p for p in _planned(repro.name)}
    for group in repro.equal_params:
      budgets = {(planned[n].tokens, planned[n].experiment.train) for n in group}
      trains = {dataclasses.replace(t, seed=0) for _, t in budgets}
      assert len({tokens for tokens, _ in budgets}) == 1 and len(trains) == 1, (repro.name, group)


def _with(**changes) -> decl.Reproduction:
  return dataclasses.replace(TINY, **changes)


_Q = decl.Quantity(run="mm1", evaluation="synthetic", metric="accuracy")


@pytest.mark.parametrize(
    "bad, error",
    [
        (_with(runs=(decl.Run(name="a", experiment="quickstrat"),)), "did you mean quickstart"),
        (
            _with(
                runs=(decl.Run(name="mm1", experiment="quickstart", overrides=("model.widht=8",)),)
            ),
            "did you mean width",
        ),
        (_with(evaluations=(decl.Evaluation(task="synthetc"),)), "did you mean synthetic"),
        (
            _with(
                evaluations=(
                    decl.Evaluation(task="synthetic", settings=("synthetic.lenghts=[4]",)),
                )
            ),
            "did you mean lengths",
        ),
        (
            _with(evaluations=(decl.Evaluation(task="synthetic", model=("width=8",)),)),
            "not a field that changes evaluation only",
        ),
        (_with(evaluations=(decl.Evaluation(task="synthetic"),) * 2), "set a label"),
        (
            _with(
                checks=(
                    decl.Check(
                        description="", left=dataclasses.replace(_Q, run="gpt"), op=">=", right=0.0
                    ),
                )
            ),
            "unknown run 'gpt'",
        ),
        (
            _with(
                checks=(
                    decl.Check(
                        description="",
                        left=dataclasses.replace(_Q, evaluation="ppl"),
                        op=">=",
                        right=0.0,
                    ),
                )
            ),
            "unknown evaluation 'ppl'",
        ),
        (
            _with(
                checks=(
                    decl.Check(
                        description="",
                        left=dataclasses.replace(_Q, where=(("lenght", 4),)),
                        op=">=",
                        right=0.0,
                    ),
                )
            ),
            "unknown settings ['lenght']",
        ),
        (
            _with(
                runs=(
                    *TINY.runs[:1],
                    dataclasses.replace(TINY.runs[1], overrides=("model.ffn_width=256",)),
                )
            ),
            "equal parameter counts",
        ),
        (
            _with(runs=(decl.Run(name="a", experiment="mm2-small-32k"),)),
            "declare the run it starts from",
        ),
        (
            _with(
                runs=(
                    decl.Run(name="a", experiment="mm2-small-32k", init_from="b"),
                    decl.Run(name="b", experiment="mm2-small"),
                )
            ),
            "not an earlier run",
        ),
        (_with(accelerator="tpu-v9"), "unknown accelerator"),
        (
            _with(checks=(dataclasses.replace(TINY.checks[0], precondition=True),)),
            "the claim needs one of its own",
        ),
        (_with(sweep=decl.Sweep(runs=("gpt",), values=(1e-3, 3e-3))), "unknown runs ['gpt']"),
        (_with(sweep=decl.Sweep(runs=("mm1",), values=(1e-3, 1e-3))), "2 or more distinct"),
        (_with(sweep=decl.Sweep(runs=("mm1",), values=(1e-3, 3e-3), seed=1)), "report's seeds"),
        (
            _with(
                sweep=decl.Sweep(runs=("mm1",), values=(1e-3, 3e-3), overrides=("train.seed=5",))
            ),
            "its own",
        ),
        (
            _with(sweep=decl.Sweep(runs=("mm1",), values=(1e-3, 3e-3), key="train.lerning_rate")),
            "did you mean learning_rate",
        ),
        (
            _with(
                runs=(
                    decl.Run(name="a", experiment="mm2-small"),
                    decl.Run(name="b", experiment="mm2-small-32k", init_from="a"),
                ),
                checks=(),
                paper=(),
                equal_params=(),
                sweep=decl.Sweep(runs=("b",), values=(1e-3, 3e-3)),
            ),
            "a three-moons run or a fine-tune",
        ),
    ],
)
def test_bad_declarations_are_named(bad, error):
  with pytest.raises(plan_lib.ReproError, match=None) as e:
    plan_lib.plan(bad)
  assert error in str(e.value)


@pytest.mark.parametrize(
    "name", ["regbench-short", pytest.param("v2-table-12", marks=pytest.mark.slow)]
)
def test_dry_run_flops_are_mosaics_info_counts(name, capsys):
  planned = _planned(name)
  for p in planned:
    info_cli.main([p.run.experiment, "--context", str(p.experiment.data.seq_len), "--json"])
    counted = json.loads(capsys.readouterr().out)
    assert p.flops_per_token == counted["flops_per_token"]
    assert p.params == counted["params"]
    assert p.train_flops == 3 * counted["flops_per_token"] * p.tokens
  assert repro_cli.main([name, "--dry-run"]) == 0
  out = capsys.readouterr().out
  for p in planned:
    assert f"| {p.run.name} | {p.run.experiment} |" in out and f"{p.flops_per_token:.4g}" in out
  assert "tpu-v5p chip-hours" in out


def _fake_results(root, repro, values):
  """Writes evaluation files as the runner does: values[run][k][length] of `synthetic`, of the
  k-th seed of `repro`."""
  for run, by_seed in values.items():
    for seed, by_length in zip(repro.train_seeds(len(by_seed)), by_seed):
      records = [
          {
              "task": "synthetic",
              "metric": "accuracy",
              "value": v,
              "num_examples": 8,
              "settings": {"length": n},
              "seed": 0,
              "model": {},
              "date": None,
          }
          for n, v in by_length.items()
      ]
      runner.write_jsonl(runner.results_path(root, repro, run, seed, "synthetic"), records)


def test_the_report_averages_the_runs_results_and_decides(tmp_path):
  repro = _with(evaluations=TINY.evaluations[1:])
  values = {
      "mm1": [{64: 1.0, 128: 0.9}, {64: 0.8, 128: 0.7}],
      "llama": [{64: 0.5, 128: 0.1}, {64: 0.3, 128: 0.2}],
  }
  _fake_results(tmp_path, repro, values)
  report = report_lib.write(repro, tmp_path, seeds=2)
  assert report.verdict == "reproduced"
  (outcome,) = report.outcomes
  assert outcome.left.mean == pytest.approx(np.mean([0.9, 0.7]))
  assert outcome.bound == pytest.approx(np.mean([0.1, 0.2]))
  text = report.path.read_text()
  assert "**Verdict: reproduced**" in text
  assert f"{statistics.stdev([0.9, 0.7]):.4g}" in text  # The spread over seeds.
  gathered = [json.loads(line) for line in (tmp_path / report_lib.RESULTS).read_text().splitlines()]
  assert len(gathered) == 8 and {r["run"] for r in gathered} == {"mm1", "llama"}
  # The check fails when the numbers say so, and a missing seed's quantity is incomplete.
  values["llama"][1][128] = 1.9
  _fake_results(tmp_path, repro, values)
  assert report_lib.write(repro, tmp_path, seeds=2).verdict == "not reproduced"
  runner.results_path(tmp_path, repro, "llama", 0, "synthetic").unlink()
  runner.results_path(tmp_path, repro, "llama", 1, "synthetic").unlink()
  assert report_lib.write(repro, tmp_path, seeds=2).verdict == "incomplete"


def test_a_redesign_reports_its_own_fresh_seeds(tmp_path):
  old = _with(evaluations=TINY.evaluations[1:])
  _fake_results(tmp_path, old, {"mm1": [{64: 1.0, 128: 0.9}], "llama": [{64: 0.5, 128: 0.1}]})
  fresh = dataclasses.replace(old, first_seed=10)
  # The old seed 0 holds no result of the redesign: its check waits for seeds 10 and 11.
  report = report_lib.write(fresh, tmp_path, seeds=2)
  assert report.verdict == "incomplete" and report.outcomes[0].missing == (10, 11)
  values = {"mm1": [{64: 1.0, 128: 0.2}] * 2, "llama": [{64: 0.5, 128: 0.6}] * 2}
  _fake_results(tmp_path, fresh, values)
  assert runner.results_path(tmp_path, fresh, "mm1", 11, "synthetic").exists()
  report = report_lib.write(fresh, tmp_path, seeds=2)
  assert report.verdict == "not reproduced" and report.outcomes[0].left.seeds == (10, 11)
  assert "over seeds 10-11" in report.path.read_text()
  with pytest.raises(plan_lib.ReproError, match=r"one of the report's seeds \[10, 11\]"):
    plan_lib.plan(
        dataclasses.replace(fresh, sweep=decl.Sweep(runs=("mm1",), values=(1, 2), seed=11))
    )


def test_a_failed_precondition_makes_the_verdict_inconclusive(tmp_path):
  at = lambda run, n: decl.Quantity(
      run=run, evaluation="synthetic", metric="accuracy", where=(("length", n),)
  )
  learnt = decl.Check(
      description="llama learnt at 64", left=at("llama", 64), op=">=", right=0.9, precondition=True
  )
  repro = _with(evaluations=TINY.evaluations[1:], checks=(learnt, *TINY.checks))
  values = {"mm1": [{64: 1.0, 128: 0.9}], "llama": [{64: 0.5, 128: 0.1}]}
  _fake_results(tmp_path, repro, values)
  report = report_lib.write(repro, tmp_path, seeds=1)
  # The claim's check holds, but the baseline never learnt: the experiment cannot answer.
  assert report.verdict == "inconclusive (precondition failed: llama learnt at 64)"
  text = report.path.read_text()
  assert "1 of 1 checks hold, 0 of 1 preconditions" in text
  preconditions, checks = text.split("## Preconditions")[1].split("## Checks")
  assert "llama learnt at 64" in preconditions and "mm1 ahead at 128" not in preconditions
  assert "mm1 ahead at 128" in checks.split("##")[0]
  # Once it holds, the claim's checks decide; a failed precondition decides even while a
  # claim's quantity has no result yet.
  values["llama"][0][64] = 0.95
  _fake_results(tmp_path, repro, values)
  assert report_lib.write(repro, tmp_path, seeds=1).verdict == "reproduced"
  values["llama"][0][128] = 0.95
  _fake_results(tmp_path, repro, values)
  assert report_lib.write(repro, tmp_path, seeds=1).verdict == "not reproduced"
  values["llama"][0][64] = 0.5
  _fake_results(tmp_path, repro, values)
  runner.results_path(tmp_path, repro, "mm1", 0, "synthetic").unlink()
  assert report_lib.write(repro, tmp_path, seeds=1).verdict.startswith("inconclusive")


def _sweep_result(run, value, loss, diverged=None):
  return {"run": run, "value": value, "val_loss": loss, "diverged": diverged, "seconds": 1.0}


def test_the_sweep_chooses_the_lowest_final_validation_loss_of_each_run():
  repro = _with(sweep=decl.Sweep(runs=("mm1", "llama"), values=(1e-3, 3e-3, 1e-2)))
  results = [
      _sweep_result("mm1", 1e-3, 2.0),
      _sweep_result("mm1", 3e-3, 1.5),
      _sweep_result("mm1", 1e-2, None, diverged="stopped at step 3"),
      _sweep_result("llama", 1e-3, 1.2),
      _sweep_result("llama", 3e-3, float("nan")),
      _sweep_result("llama", 1e-2, 1.9),
  ]
  assert runner.chosen_values(repro, results) == {"mm1": 3e-3, "llama": 1e-3}
  unfinished = [*results[:5], _sweep_result("llama", 1e-2, None)]
  with pytest.raises(plan_lib.ReproError, match="neither finished nor diverged"):
    runner.chosen_values(repro, unfinished)
  diverged = [r if r["run"] == "mm1" else {**r, "val_loss": None, "diverged": "x"} for r in results]
  with pytest.raises(plan_lib.ReproError, match="every value of the sweep of llama"):
    runner.chosen_values(repro, diverged)


def test_a_report_written_before_the_sweep_ends_shows_it_unfinished(tmp_path):
  # As after a command stopped (SIGTERM) during the sweep: the report is written all the same.
  repro = _with(
      evaluations=TINY.evaluations[1:], sweep=decl.Sweep(runs=("mm1",), values=(1e-3, 3e-3))
  )
  report = report_lib.write(repro, tmp_path, seeds=1)
  assert report.verdict == "incomplete"
  text = report.path.read_text()
  assert "| mm1 | 0.001 | not trained yet |" in text and "**yes**" not in text


def test_the_sweep_is_planned_apart_from_the_seeds(capsys):
  sweep = decl.Sweep(runs=("llama",), values=(1e-3, 3e-3), overrides=("train.steps=4",))
  repro = _with(sweep=sweep)
  planned = plan_lib.plan(repro)
  swept = plan_lib.sweep_plan(repro, planned)
  assert [(p.run.name, p.swept) for p in swept] == [("llama", 1e-3), ("llama", 3e-3)]
  for p in swept:
    assert p.experiment.train.learning_rate == p.swept
    assert p.experiment.train.seed == sweep.seed and p.experiment.train.steps == 4
  with pytest.raises(plan_lib.ReproError, match="the reproduction's sweep chooses it"):
    plan_lib.plan(repro, ("train.learning_rate=0.1",))
  text = plan_lib.format_plan(repro, planned, 2, 1e9)
  assert "| llama (sweep train.learning_rate=0.003) |" in text
  total = 2 * sum(p.train_flops for p in planned) + sum(p.train_flops for p in swept)
  assert f"and the sweep's 2 training(s): {total:.3g} training FLOPs" in text


def test_a_corrupt_results_file_is_named_and_left_as_it_is(tmp_path):
  repro = _with(evaluations=TINY.evaluations[1:])
  _fake_results(tmp_path, repro, {"mm1": [{64: 1.0}], "llama": [{64: 0.5}]})
  path = runner.results_path(tmp_path, repro, "llama", 0, "synthetic")
  for text in ('{"metric": "accuracy"\n', "[1, 2]\n"):
    path.write_text(text)
    with pytest.raises(plan_lib.ReproError, match="delete it and run the command again"):
      report_lib.gather(repro, tmp_path, seeds=1)
    assert path.read_text() == text


def test_a_key_set_twice_is_refused(capsys):
  assert (
      repro_cli.main(["regbench-short", "--dry-run", "--set", "train.steps=5", "train.steps=6"])
      == 2
  )
  assert "--set gives train.steps more than once" in capsys.readouterr().err


def test_a_quantity_that_selects_several_results_is_named(tmp_path):
  repro = _with(evaluations=TINY.evaluations[1:])
  _fake_results(tmp_path, repro, {"mm1": [{64: 1.0, 128: 0.9}], "llama": [{64: 0.5, 128: 0.1}]})
  records = report_lib.gather(repro, tmp_path, seeds=1)
  with pytest.raises(plan_lib.ReproError, match="selects 2 results of seed 0"):
    report_lib.quantity(records, _Q)


def test_a_directory_of_another_reproduction_is_refused(tmp_path):
  runner.write_json(tmp_path / runner.MANIFEST, {"reproduction": "other", "set": []})
  with pytest.raises(plan_lib.ReproError, match="use another --workdir"):
    runner.run(TINY, tmp_path, seeds=1, progress=False, log=lambda _: None)
  # Other --set assignments: refused once a run has trained, not before (a failed first try).
  runner.write_json(tmp_path / runner.MANIFEST, {"reproduction": "tiny", "set": ["a.b=1"]})
  runner._check_manifest(tmp_path, TINY, ())
  assert json.loads((tmp_path / runner.MANIFEST).read_text())["set"] == []
  (runner.run_dir(tmp_path, "mm1", 0) / "checkpoints" / "4").mkdir(parents=True)
  with pytest.raises(plan_lib.ReproError, match="would mix their results"):
    runner._check_manifest(tmp_path, TINY, ("a.b=1",))
  (tmp_path / runner.MANIFEST).write_text("[1, 2]\n")  # JSON, but not a manifest.
  with pytest.raises(plan_lib.ReproError, match="holds a list, not this project's manifest"):
    runner._check_manifest(tmp_path, TINY, ())


@pytest.mark.slow
def test_a_tiny_reproduction_trains_resumes_evaluates_and_reports(tmp_path, monkeypatch, capsys):
  # The first run stops (as on SIGTERM) after its 3rd step, checkpointed.
  calls = {"n": 0}

  def agreed(self):
    calls["n"] += 1
    return calls["n"] == 3

  monkeypatch.setattr(preemption.Preemption, "agreed", agreed)
  stopped = runner.run(TINY, tmp_path, seeds=2, progress=False, log=lambda _: None)
  assert stopped.stopped_by is not None and stopped.stopped_run == runner.run_dir(
      tmp_path, "mm1", 0
  )
  assert not (tmp_path / report_lib.REPORT).exists()
  monkeypatch.undo()

  monkeypatch.setattr(registry, "all_reproductions", lambda: {"tiny": TINY})
  assert repro_cli.main(["tiny", "--workdir", str(tmp_path), "--seeds", "2", "--no-progress"]) == 0
  assert "trained 4 run(s), ran 8 evaluation(s)" in capsys.readouterr().out
  resumed = metrics.read_metrics(runner.run_dir(tmp_path, "mm1", 0))
  assert [r["step"] for r in resumed if "split" not in r] == [4, 8]  # Trained on from step 3.
  # Each run's own results, averaged over seeds, are the report's.
  records = report_lib.gather(TINY, tmp_path, seeds=2)
  for run in ("mm1", "llama"):
    own = [
        [
            json.loads(line)
            for line in runner.results_path(tmp_path, TINY, run, s, "synthetic")
            .read_text()
            .splitlines()
        ]
        for s in range(2)
    ]
    mean = np.mean(
        [
            r["value"]
            for rows in own
            for r in rows
            if r["metric"] == "accuracy" and r["settings"]["length"] == 128
        ]
    )
    value = report_lib.quantity(records, dataclasses.replace(_Q, run=run, where=(("length", 128),)))
    assert value.mean == pytest.approx(mean)
    assert (
        f"| {run} | accuracy | length=128 | {mean:.4g} |"
        in (tmp_path / report_lib.REPORT).read_text()
    )
  # Run again: nothing to do, the same report.
  before = (tmp_path / report_lib.RESULTS).read_text()
  assert repro_cli.main(["tiny", "--workdir", str(tmp_path), "--seeds", "2", "--no-progress"]) == 0
  assert "trained 0 run(s), ran 0 evaluation(s)" in capsys.readouterr().out
  assert (tmp_path / report_lib.RESULTS).read_text() == before
  assert (tmp_path / report_lib.PLOTS).exists()


@pytest.mark.slow
def test_a_sweep_trains_first_skips_a_diverged_value_and_trains_the_seeds_at_its_choice(
    tmp_path, monkeypatch, capsys
):
  last = decl.Quantity(
      run="mm1", evaluation=decl.TRAINING, metric="val_loss", where=(("last", True),)
  )
  repro = _with(
      name="tiny-sweep",
      runs=TINY.runs[:1],
      evaluations=TINY.evaluations[:1],
      checks=(decl.Check(description="finite", left=last, op="<=", right=1e9),),
      paper=(),
      equal_params=(),
      sweep=decl.Sweep(runs=("mm1",), values=(3e-3, 1e30)),  # 1e30 overflows float32 at once.
  )
  monkeypatch.setattr(registry, "all_reproductions", lambda: {"tiny-sweep": repro})
  command = ["tiny-sweep", "--workdir", str(tmp_path), "--seeds", "1", "--no-progress"]
  assert repro_cli.main(command) == 0
  assert "trained 2 run(s)" in capsys.readouterr().out  # The finite value, then seed 0.
  diverged = runner.sweep_dir(tmp_path, "mm1", 1e30) / runner.RESULTS_DIR / runner.DIVERGED
  assert "the loss is nan" in json.loads(diverged.read_text())["error"]
  swept = json.loads((tmp_path / runner.SWEEP).read_text())
  assert [(r["value"], r["chosen"]) for r in swept] == [(3e-3, True), (1e30, False)]
  own = metrics.read_metrics(runner.sweep_dir(tmp_path, "mm1", 3e-3))
  assert swept[0]["val_loss"] == [r["loss"] for r in own if r.get("split") == "val"][-1]
  seed_config = json.loads((runner.run_dir(tmp_path, "mm1", 0) / "config.json").read_text())
  assert seed_config["train"]["learning_rate"] == 3e-3 and seed_config["train"]["seed"] == 0
  text = (tmp_path / report_lib.REPORT).read_text()
  assert "## Sweep of train.learning_rate" in text and "| mm1 | 1.000e+30 | diverged |" in text
  assert repro_cli.main(command) == 0
  assert "trained 0 run(s)" in capsys.readouterr().out
