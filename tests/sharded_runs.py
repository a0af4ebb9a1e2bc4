"""Multi-device halves of tests/test_sharding.py, run in a subprocess with 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_runs.py specs OUT
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_runs.py restore WORKDIR

`specs` writes OUT (JSON): per family, every parameter's and optimizer-state leaf's logical axis
names, shape and actual sharding on a (data=2, fsdp=2, tensor=2) mesh. `steps NAME` takes three
steps of the NAME experiment (one layer) on one device and on (data=2, fsdp=2, tensor=2) and
writes both runs' losses and params to OUT (npz). `restore` takes a step on
fsdp=8 and saves it in WORKDIR/checkpoints, restores it onto fsdp=8, onto (data=2, tensor=4) and
onto one device, checks each against the saved values (exactly) and its target's shardings, and
writes the saved params to WORKDIR/saved_params.npz. `generate` generates greedily with every
family on one device and on (data=4, tensor=2) and writes both runs' tokens to OUT (JSON).
`grad_accum` takes the first step of mm1 on a batch of uneven loss masks on (data=2, fsdp=2,
tensor=2) with 1, 2 and 4 micro-batches, and writes each run's loss and gradient, with the
token-weighted mean loss of the batch and its gradient computed directly, to OUT (npz).
`loss_chunk` takes that first step with the chunked loss (chunks of 12 of the 32 positions) and 2
micro-batches on (data=2, fsdp=2, tensor=2), and without chunks in one batch on one device, and
writes both runs' losses and gradients to OUT (npz). `scan` trains and generates with mm2 scanned
and unrolled on (data=2, fsdp=2, tensor=2) and writes both runs' losses, params (unrolled) and
tokens to OUT (npz).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mosaics_jax import checkpoints, config as config_lib, overrides, registry, sharding
from mosaics_jax.analysis import bench_train
from mosaics_jax.inference import generate as generate_lib
from mosaics_jax.model import families
from mosaics_jax.train import optim, step as step_lib

FAMILIES = ("mm1-tiny", "mm2-tiny", "llama-tiny")
TINY_SETS = {
    "data": config_lib.DataConfig(source="synthetic_induction", seq_len=32, task_vocab=32),
    "train.batch_size": 8,
    "train.log_every": 1,
    "train.eval_every": 1000,
    "train.eval_batches": 1,
}


def tiny(name: str, **sets) -> config_lib.Experiment:
  exp = registry.get(name)
  for key, value in {**TINY_SETS, **sets}.items():
    exp = overrides.override(exp, key, value)
  return exp


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _spec(array: jax.Array) -> list[list[str]]:
  """The array's PartitionSpec, one list of mesh axes per dimension."""
  spec = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
  return [[] if s is None else [s] if isinstance(s, str) else list(s) for s in spec]


def specs(out: pathlib.Path) -> None:
  report = {}
  for name in FAMILIES:
    exp = tiny(name, mesh=config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
    model = families.build_model(exp.model)
    tx = optim.make_optimizer(exp.train)
    placement = step_lib.make_placement(exp, model, tx)
    state = step_lib.init_state(exp, model, tx, placement)
    tokens = np.zeros((1, 32), np.int32)
    expected = sharding.param_shardings(model, tokens, placement.mesh, exp.mesh.rules)
    for x, s in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(expected)):
      assert x.sharding == s, (x.sharding, s)
    boxed = jax.eval_shape(model.init_boxed, jax.random.key(0), tokens)
    names = {
        _path(p): list(leaf.names)
        for p, leaf in jax.tree_util.tree_leaves_with_path(
            boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
    }
    report[name] = {
        "mesh": dict(placement.mesh.shape),
        "params": {
            _path(p): {"names": names[_path(p)], "shape": list(x.shape), "spec": _spec(x)}
            for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
        },
        "opt_state": {
            _path(p): {"shape": list(x.shape), "spec": _spec(x)}
            for p, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
        },
    }
  out.write_text(json.dumps(report))


def restore(workdir: pathlib.Path) -> None:
  saved_on = config_lib.MeshConfig(data=1, fsdp=8, tensor=1)
  exp = tiny("mm2-tiny", mesh=saved_on, **{"model.num_layers": 1})
  model = families.build_model(exp.model)
  tx = optim.make_optimizer(exp.train)
  placement = step_lib.make_placement(exp, model, tx)
  state = step_lib.init_state(exp, model, tx, placement)
  # A step, so that the optimizer moments are not all zeros.
  batch = bench_train.synthetic_batch(exp, np.random.default_rng(0))
  state, _ = step_lib.make_train_step(exp, model, tx, placement)(state, batch)
  saved = jax.tree.map(np.asarray, state)
  ckpts = checkpoints.Checkpoints(workdir / "checkpoints", 3)
  ckpts.save(1, state, {"position": 0})
  ckpts.wait()
  for label, mesh in [
      ("fsdp=8", saved_on),
      ("data=2, tensor=4", config_lib.MeshConfig(data=2, fsdp=1, tensor=4)),
      ("one device", None),
  ]:
    target = (
        None
        if mesh is None
        else step_lib.make_placement(overrides.override(exp, "mesh", mesh), model, tx)
    )
    template = step_lib.abstract_state(exp, model, tx, target)
    step, restored, data_state = ckpts.restore_latest(template)
    assert step == 1 and data_state == {"position": 0}, (step, data_state)
    for x, t, s in zip(*(jax.tree.leaves(z) for z in (restored, template, saved))):
      assert x.sharding == t.sharding, (label, x.sharding, t.sharding)
      np.testing.assert_array_equal(x, s, err_msg=label)
  ckpts.close()
  flat = {_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved["params"])}
  np.savez(workdir / "saved_params.npz", **flat)


def steps(out: pathlib.Path, name: str, impl: str = "auto") -> None:
  """Three steps on one device and on (data=2, fsdp=2, tensor=2): losses and final params."""
  mesh = config_lib.MeshConfig(data=2, fsdp=2, tensor=2)
  exp = tiny(name, mesh=mesh, **{"model.num_layers": 1, "model.retrieve_impl": impl})
  model = families.build_model(exp.model)
  tx = optim.make_optimizer(exp.train)
  rng = np.random.default_rng(0)
  batches = [bench_train.synthetic_batch(exp, rng) for _ in range(3)]
  for batch in batches:  # Two documents per row, so document masks are exercised too.
    batch["segment_ids"][:, 20:] = 1
  report = {}
  for label, placement in [("one", None), ("mesh", step_lib.make_placement(exp, model, tx))]:
    state = step_lib.init_state(exp, model, tx, placement)
    step = step_lib.make_train_step(exp, model, tx, placement)
    losses = []
    for batch in batches:
      state, stats = step(state, batch)
      losses.append(float(stats["loss"]))
    report[label] = {"losses": losses, "params": jax.tree.map(np.asarray, state["params"])}
  flat = {
      f"{label}:{_path(p)}": x
      for label in report
      for p, x in jax.tree_util.tree_leaves_with_path(report[label]["params"])
  }
  np.savez(out, losses_one=report["one"]["losses"], losses_mesh=report["mesh"]["losses"], **flat)


# Loss-mask lengths of the 16 rows of `uneven_batch`: micro-batches of 4 rows count 0, 128, 6 and
# 61 targets, micro-batches of 8 rows 128 and 67.
MASK_LENGTHS = (0, 0, 0, 0, 32, 32, 32, 32, 3, 1, 0, 2, 17, 9, 30, 5)


def accum_experiment(grad_accum: int, **sets) -> config_lib.Experiment:
  """A one-layer mm1 (no per-step arguments, no dropout) of `uneven_batch`'s batch size."""
  return tiny(
      "mm1-tiny",
      **{"model.num_layers": 1, "train.batch_size": len(MASK_LENGTHS)},
      **{"train.grad_accum": grad_accum, **sets},
  )


def uneven_batch(experiment) -> dict[str, np.ndarray]:
  """A batch of random tokens whose rows' loss masks cover the first MASK_LENGTHS targets."""
  batch = bench_train.synthetic_batch(experiment, np.random.default_rng(0))
  positions = np.arange(experiment.data.seq_len)
  batch["loss_mask"] = (positions < np.array(MASK_LENGTHS)[:, None]).astype(np.float32)
  batch["segment_ids"][:, 20:] = 1
  return batch


def gradient_keeper() -> optax.GradientTransformation:
  """An optimizer that leaves the parameters as they are and keeps the gradient as its state."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


def step_gradient(experiment, batch, on_mesh: bool) -> tuple[float, dict, dict]:
  """(loss, gradient, initial params) of the first train step on `batch`, on one device or on
  `experiment.mesh`: the loss the step reports and the gradient its optimizer receives."""
  model = families.build_model(experiment.model)
  tx = gradient_keeper()
  placement = step_lib.make_placement(experiment, model, tx) if on_mesh else None
  state = step_lib.init_state(experiment, model, tx, placement)
  params = jax.tree.map(np.asarray, state["params"])  # Before the step donates them.
  state, stats = step_lib.make_train_step(experiment, model, tx, placement)(state, batch)
  return float(stats["loss"]), jax.tree.map(np.asarray, state["opt_state"]), params


def token_weighted_reference(experiment, params, batch) -> tuple[float, dict]:
  """The mean cross-entropy over the batch's masked targets, and its gradient, in one pass."""
  model = families.build_model(experiment.model)

  def loss(params):
    logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["loss_mask"]) / max(batch["loss_mask"].sum(), 1.0)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), jax.tree.map(np.asarray, grads)


def grad_accum(out: pathlib.Path) -> None:
  """Loss and gradient of the first step on a mesh with 1, 2 and 4 micro-batches, and directly."""
  mesh = config_lib.MeshConfig(data=2, fsdp=2, tensor=2)
  report = {}
  for accum in (1, 2, 4):
    exp = accum_experiment(accum, mesh=mesh)
    loss, grads, params = step_gradient(exp, uneven_batch(exp), on_mesh=True)
    report[f"loss:{accum}"] = loss
    report.update(_flat(f"grad:{accum}", grads))
  loss, grads = token_weighted_reference(exp, params, uneven_batch(exp))
  report["loss:reference"] = loss
  report.update(_flat("grad:reference", grads))
  np.savez(out, **report)


def loss_chunk(out: pathlib.Path) -> None:
  """Loss and gradient of the first step chunked on a mesh, and whole on one device."""
  mesh = config_lib.MeshConfig(data=2, fsdp=2, tensor=2)
  chunked = accum_experiment(2, mesh=mesh, **{"train.loss_chunk": 12})
  loss, grads, _ = step_gradient(chunked, uneven_batch(chunked), on_mesh=True)
  whole = accum_experiment(1)
  loss_ref, grads_ref, _ = step_gradient(whole, uneven_batch(whole), on_mesh=False)
  report = {"loss:chunked": loss, "loss:reference": loss_ref}
  report.update(_flat("grad:chunked", grads))
  report.update(_flat("grad:reference", grads_ref))
  np.savez(out, **report)


def _flat(prefix: str, tree) -> dict[str, np.ndarray]:
  return {f"{prefix}:{_path(p)}": x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def scan(out: pathlib.Path) -> None:
  """mm2 (two layers) scanned and unrolled on (data=2, fsdp=2, tensor=2): the stacked params'
  shardings, two steps' losses and params, greedy generation's tokens."""
  mesh_config = config_lib.MeshConfig(data=2, fsdp=2, tensor=2)
  report = {}
  for label in ("unrolled", "scan"):
    exp = tiny("mm2-tiny", mesh=mesh_config, **{"model.num_layers": 2})
    exp = overrides.override(exp, "model.scan_layers", label == "scan")
    model = families.build_model(exp.model)
    tx = optim.make_optimizer(exp.train)
    placement = step_lib.make_placement(exp, model, tx)
    state = step_lib.init_state(exp, model, tx, placement)
    if label == "scan":
      for path, x in jax.tree_util.tree_leaves_with_path(state["params"]["layers"]):
        assert x.shape[0] == 2 and _spec(x)[0] == [], (_path(path), x.sharding)
      assert any(any(axes) for x in jax.tree.leaves(state["params"]["layers"]) for axes in _spec(x))
    step = step_lib.make_train_step(exp, model, tx, placement)
    losses = []
    for batch in [bench_train.synthetic_batch(exp, np.random.default_rng(i)) for i in range(2)]:
      state, stats = step(state, batch)
      losses.append(float(stats["loss"]))
    params = families.to_layout(jax.tree.map(np.asarray, state["params"]), exp.model)
    report[f"losses_{label}"] = losses
    report.update(
        _flat(label, families.unstack_layers(params, exp.model) if label == "scan" else params)
    )
    mesh = sharding.make_mesh(mesh_config)
    tokens = generate_lib.Generator(model, mesh=mesh, rules=mesh_config.rules)(
        params, [[1, 2, 3, 4, 5], [6], [7, 8, 9], [10, 11]], 12
    )
    report[f"tokens_{label}"] = np.asarray(tokens)
  np.savez(out, **report)


def generate(out: pathlib.Path) -> None:
  """Greedy generation on one device and on (data=4, tensor=2), ragged prompts."""
  mesh_config = config_lib.MeshConfig(data=4, fsdp=1, tensor=2)
  mesh = sharding.make_mesh(mesh_config)
  prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9], [10, 11]]
  report = {}
  for name in FAMILIES:
    model = families.build_model(registry.get(name).model)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    one = generate_lib.Generator(model)(params, prompts, 20)
    sharded = generate_lib.Generator(model, mesh=mesh, rules=mesh_config.rules)(params, prompts, 20)
    report[name] = {"one": one, "mesh": sharded}
  out.write_text(json.dumps(report))


def run_on_8_devices(*args) -> None:
  """Runs this file with `args` in a process of 8 simulated CPU devices; asserts it succeeds."""
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  here = pathlib.Path(__file__).resolve()
  result = subprocess.run(
      [sys.executable, str(here), *map(str, args)],
      env=env,
      cwd=here.parent.parent,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]


if __name__ == "__main__":
  assert jax.device_count() == 8, f"needs 8 devices, has {jax.device_count()}"
  {
      "specs": specs,
      "restore": restore,
      "steps": steps,
      "generate": generate,
      "grad_accum": grad_accum,
      "loss_chunk": loss_chunk,
      "scan": scan,
  }[sys.argv[1]](pathlib.Path(sys.argv[2]).absolute(), *sys.argv[3:])
