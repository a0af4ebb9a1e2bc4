"""The chunked loss (`train.loss_chunk`): the sums and gradients of the whole sequence's logits,
computed a chunk of positions at a time, and no [batch, seq, vocab] array along the way."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaics_jax import config as config_lib, overrides
from mosaics_jax.analysis import bench_train, timing
from mosaics_jax.model import families
from mosaics_jax.train import optim, step as step_lib

import sharded_runs

T = 20  # Positions per row: chunks of 7 leave a last chunk of 6.
SUMS = ("loss_sum", "weight", "correct", "answers")


def _experiment(name: str, **sets) -> config_lib.Experiment:
  """A one-layer tiny experiment of the family, rows of T tokens; dropout where it has one."""
  dropout = {} if "library" in name else {"model.dropout": 0.1}
  sets = {"model.num_layers": 1, "data.seq_len": T, "train.batch_size": 4, **dropout, **sets}
  return sharded_runs.tiny(name, **sets)


def _batch(experiment: config_lib.Experiment) -> dict[str, np.ndarray]:
  """Random tokens in two documents per row; rows 1-3 count no target in the first two chunks of
  7; answers in the second and third chunks."""
  batch = bench_train.synthetic_batch(experiment, np.random.default_rng(0))
  batch["segment_ids"][:, 9:] = 1
  batch["loss_mask"][1:, :14] = 0
  batch["answer_mask"][:, 7:18] = 1
  return batch


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sums_and_grads(model, chunks: tuple[int, ...], params, batch, key):
  """{loss_chunk: (the step's loss sums, their gradient)} for each of `chunks`, on `batch` with
  every other target the model's own prediction (so that `correct` counts some)."""
  kwargs = families.of(model.config).step_kwargs(model.config, jax.random.key(1))
  logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], **kwargs)
  even = jnp.arange(batch["targets"].shape[1]) % 2 == 0
  batch = {**batch, "targets": jnp.where(even, jnp.argmax(logits, -1), batch["targets"])}
  grad_fn = jax.value_and_grad(step_lib._loss, has_aux=True)  # pylint: disable=protected-access
  runs = {c: grad_fn(params, model, batch, kwargs, key, c) for c in chunks}
  return {c: (stats, grads) for c, ((_, stats), grads) in runs.items()}


def _assert_equal_grads(reference, grads) -> None:
  """Equal gradients, within 1e-6 of each leaf's largest entry."""
  for (path, g_ref), g in zip(
      jax.tree_util.tree_leaves_with_path(reference), jax.tree.leaves(grads)
  ):
    atol = 1e-6 * np.max(np.abs(g_ref))
    np.testing.assert_allclose(g, g_ref, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "name, sets",
    [
        ("llama-tiny", {}),  # Untied classifier, as mm2's.
        ("gpt2-tiny", {}),  # Tied classifier, biases.
        pytest.param("mm2-tiny", {}, marks=pytest.mark.slow),
        pytest.param("mm1-tiny", {}, marks=pytest.mark.slow),
        pytest.param("mm1-library-tiny", {}, marks=pytest.mark.slow),
        pytest.param("mm1-library-tiny", {"model.weight_tying": False}, marks=pytest.mark.slow),
    ],
)
def test_chunked_sums_and_gradients_equal_the_whole_sequences(name, sets):
  """Chunks of 7 (the last one padded) and one chunk of the whole row give the loss, weight,
  correct and answers sums of the whole row's logits and their gradient, within 1e-6, with
  dropout, packed documents and masks that zero whole chunks."""
  experiment = _experiment(name, **sets)
  model = families.build_model(experiment.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
  key = jax.random.key(2) if experiment.model.dropout else None
  runs = _sums_and_grads(model, (0, 7, 64), params, _batch(experiment), key)
  sums = runs[0][0]
  assert sums["weight"] == T + 3 * (T - 14) and sums["answers"] == 4 * 11
  assert 0 < sums["correct"] < sums["answers"]
  for chunk in (7, 64):
    for name in SUMS:
      np.testing.assert_allclose(runs[chunk][0][name], sums[name], rtol=1e-6, err_msg=name)
    _assert_equal_grads(runs[0][1], runs[chunk][1])


def test_a_train_step_with_chunks_and_micro_batches_is_the_whole_batchs():
  """A train step in 2 micro-batches with chunks of 7 reports the loss and applies the gradient
  of one batch without chunks (without dropout, whose masks depend on the micro-batch shape)."""
  runs = []
  for chunk, accum in ((0, 1), (7, 2)):
    sets = {"train.loss_chunk": chunk, "train.grad_accum": accum, "model.dropout": 0.0}
    experiment = _experiment("llama-tiny", **sets)
    runs.append(sharded_runs.step_gradient(experiment, _batch(experiment), on_mesh=False))
  (loss_ref, grads_ref, _), (loss, grads, _) = runs
  assert loss == pytest.approx(loss_ref, rel=1e-6)
  # Within 1e-6 absolute, as micro-batches are (test_sharding): adding them up reorders sums.
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, atol=1e-6)


def _large_vocab(chunk: int) -> config_lib.Experiment:
  return _experiment(
      "llama-tiny",
      **{"model.vocab_size": 8192, "data.seq_len": 64, "train.loss_chunk": chunk},
  )


def _largest_array(jaxpr: jax.extend.core.Jaxpr) -> int:
  """The most elements of any array in the jaxpr, inner jaxprs (scan, remat, ...) included."""
  sizes = [v.aval.size for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "size")]
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():
      for inner in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(inner, "jaxpr", inner)
        if isinstance(inner, jax.extend.core.Jaxpr):
          sizes.append(_largest_array(inner))
  return max(sizes, default=0)


def test_the_chunked_step_never_holds_the_logits():
  """With a vocabulary of 8192, no array of the chunked train step's program holds b t v elements
  (the unchunked one does), and XLA plans less memory by more than a float32 copy of them."""
  largest, peak = {}, {}
  for chunk in (0, 16):
    experiment = _large_vocab(chunk)
    model = families.build_model(experiment.model)
    tx = optim.make_optimizer(experiment.train)
    state = step_lib.abstract_state(experiment, model, tx)
    batch = jax.tree.map(jnp.asarray, _batch(experiment))
    step = step_lib.train_step_fn(experiment, model, tx)
    largest[chunk] = _largest_array(jax.make_jaxpr(step)(state, batch).jaxpr)
    peak[chunk] = timing.planned_peak_bytes(jax.jit(step).lower(state, batch).compile())
  b, t, v = 4, 64, 8192
  assert largest[0] >= b * t * v > largest[16]
  assert peak[16] + 4 * b * t * v < peak[0]


def test_hidden_states_come_without_a_decode_cache():
  experiment = _experiment("mm2-tiny")
  model = families.build_model(experiment.model)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  tokens = jnp.zeros((1, 4), jnp.int32)
  hidden = jax.eval_shape(lambda p: model.apply(p, tokens, hidden_only=True), params)
  assert hidden.shape == (1, 4, experiment.model.width)
  cache = model.init_cache(1, 8)
  with pytest.raises(ValueError, match="hidden_only returns no decode cache"):
    jax.eval_shape(lambda p: model.apply(p, tokens, cache=cache, hidden_only=True), params)


def test_a_negative_loss_chunk_is_an_error():
  with pytest.raises(config_lib.ConfigError, match="train.loss_chunk must be >= 0.*got -1"):
    overrides.override(_experiment("mm2-tiny"), "train.loss_chunk", -1)
