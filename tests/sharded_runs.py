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
"""

from __future__ import annotations

import json
import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np

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


if __name__ == "__main__":
  assert jax.device_count() == 8, f"needs 8 devices, has {jax.device_count()}"
  {"specs": specs, "restore": restore, "steps": steps, "generate": generate}[sys.argv[1]](
      pathlib.Path(sys.argv[2]).absolute(), *sys.argv[3:]
  )
