"""Tests of the GPU Pallas kernels (`kernels_pallas.pallas_gpu`) against the dense reference.

Off GPU the kernels run in Pallas's interpreter, and one test lowers them to Triton IR for a CUDA
target (which needs no GPU); on GPU every test compiles them with Triton. The cases, inputs and
checks shared with the other implementations are in `kernel_cases`.

lo is passed traced wherever it can be: one compilation then serves every lo of a band, which is
what keeps this file fast (and is itself tested).

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import BlockSelection, pallas_gpu, retrieve_selected, select_blocks

import kernel_cases as kc

B, H = kc.B, kc.H
DIMS = (16, 32)  # (d, e)


class TestAgainstReference(kc.ReferenceTests):
  op = staticmethod(pallas_gpu.retrieve_pallas_gpu)
  dims = DIMS


def test_band_past_the_end_is_all_zeros():
  """lo > T: no tile is live, so no kernel loop runs a step, and everything is exactly 0."""
  case = kc.CASES["long_term_100"]
  band = dict(case.band, lo=2 * case.seq_len)
  y, grads = kc.run(pallas_gpu.retrieve_pallas_gpu, kc.inputs(2, case.seq_len, DIMS), **band)
  for x in (y, *grads):
    assert (np.asarray(x) == 0).all()


@pytest.mark.parametrize("name", ["v1_packed", "short_term"])
def test_traced_lo_compiles_once(name):
  """Several lo through one jitted function: one trace (hence one compilation) serves them all."""
  case = kc.CASES[name]
  los = (1, 3, 64, 100, 256) if case.hi is None else (1, 3, 64, 200)
  kc.assert_traced_lo_compiles_once(pallas_gpu.retrieve_pallas_gpu, case, los, DIMS)


@pytest.mark.parametrize("block_size", [16, 64])
def test_gradients_with_huge_key_norms(block_size):
  """v1 keys are their own queries with norms up to 65535 (q . k ~ 4e9): the backward must keep
  row max and row sum apart, recompute the scores bit for bit and sum D from p dp, or rounding is
  amplified past any tolerance."""
  kernel = functools.partial(pallas_gpu.retrieve_pallas_gpu, block_size=block_size)
  kc.assert_gradients_stable_with_huge_key_norms(kernel, 6e4, DIMS)


@pytest.mark.parametrize("block_size", [None, 16])
def test_short_sequence_and_odd_head_dims(block_size):
  """T = 37 is one block of 64 by default or three of 16; head dims 24 and 8 are zero-padded to
  32 and 16 for Triton and cropped back."""
  case, dims = kc.Case(37, 2, 20, packed=True), (24, 8)
  actual, expected = kc.compare(
      pallas_gpu.retrieve_pallas_gpu,
      kc.inputs(8, case.seq_len, dims),
      **case.band,
      block_size=block_size,
  )
  assert actual[0].shape == (B, case.seq_len, H, dims[1])
  kc.assert_matches(actual, expected)


def test_default_block_size():
  assert pallas_gpu.default_block_size(1) == 16
  assert pallas_gpu.default_block_size(37) == 64
  assert pallas_gpu.default_block_size(1000, 128) == 64
  # float32's tf32x3 dots need smaller tiles to fit in registers.
  assert pallas_gpu.default_block_size(1000, 64, jnp.float32) == 32
  assert pallas_gpu.default_block_size(1000, 128, jnp.float32) == 16
  assert pallas_gpu.default_num_warps(64) == 4
  assert pallas_gpu.default_num_warps(64, jnp.float32) == 8


HIGHEST = (jax.lax.Precision.HIGHEST,) * 2  # `jax.default_matmul_precision("highest")`.


def _dot_precisions(jaxpr) -> list:
  """The precision of every dot_general in the kernels of a jaxpr's pallas_calls."""
  found = []

  def walk(jaxpr, in_kernel):
    for eqn in jaxpr.eqns:
      if in_kernel and eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            walk(sub, in_kernel or eqn.primitive.name == "pallas_call")

  walk(jaxpr.jaxpr, False)
  return found


@pytest.mark.parametrize(
    "dtype, interpret, expected",
    [
        (jnp.float32, False, pallas_gpu.F32_DOT_ALGORITHM),
        (jnp.float32, True, HIGHEST),  # CPU dots take no TF32 algorithm.
        (jnp.bfloat16, False, HIGHEST),  # No effect on bfloat16 products.
    ],
)
def test_every_kernel_dot_has_the_precision_of_its_dtype(dtype, interpret, expected):
  """Compiled float32 kernels run every product (scores, p . v, dq, dk, dv) as tf32x3."""
  q = jax.ShapeDtypeStruct((B, 100, H, 32), dtype)

  def fn(q, k, v):
    kernel = functools.partial(pallas_gpu.retrieve_pallas_gpu, lo=1, hi=40, interpret=interpret)
    y, vjp = jax.vjp(kernel, q, k, v)
    return vjp(y)

  precisions = _dot_precisions(jax.make_jaxpr(fn)(q, q, q))
  # Forward: scores and p . v; dq: scores, dp (twice, over two loops) and dq; dkv: four.
  assert len(precisions) == 2 + 5 + 4
  assert set(precisions) == {expected}


@pytest.mark.parametrize("block_size", [8, 48])
def test_block_size_must_be_a_power_of_two_of_at_least_16(block_size):
  q, k, v, _ = kc.inputs(10, 100, DIMS, batch=1)
  with pytest.raises(ValueError, match="power of two >= 16"):
    pallas_gpu.retrieve_pallas_gpu(q, k, v, lo=1, block_size=block_size)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton(dtype):
  """Forward and backward lower to three Triton kernels for a CUDA target, on any host.

  This checks that every operation has a Triton lowering rule and that every tile has a
  power-of-two size; compiling the Triton IR to PTX happens only on a GPU.
  """
  seq_len, dims = 200, (24, 32)
  kernel = functools.partial(pallas_gpu.retrieve_pallas_gpu, interpret=False)

  def fn(q, k, v, cotangent, lo, segment_ids):
    y, vjp = jax.vjp(lambda *x: kernel(*x, lo=lo, hi=40, segment_ids=segment_ids), q, k, v)
    return y, vjp(cotangent)

  args = kc.abstract_args(seq_len, dims, dtype)
  assert kc.lowered_for_h100(fn, args).count("xla.gpu.triton") == 3


def test_selected_kernels_lower_to_triton():
  """With a block selection (`retrieve_pallas_gpu_selected`) the three kernels lower too."""
  seq_len, dims = 200, (24, 32)
  selection = BlockSelection(blocks=2, block_size=16)

  def fn(q, k, v, cotangent, lo, segment_ids):
    selected = select_blocks(q, k, lo=lo, hi=None, segment_ids=segment_ids, selection=selection)
    kernel = functools.partial(
        pallas_gpu.retrieve_pallas_gpu_selected,
        lo=lo,
        hi=None,
        segment_ids=segment_ids,
        selected=selected,
        block_size=16,
        interpret=False,
    )
    y, vjp = jax.vjp(kernel, q, k, v)
    return y, vjp(cotangent)

  args = kc.abstract_args(seq_len, dims, jnp.bfloat16)
  assert kc.lowered_for_h100(fn, args).count("xla.gpu.triton") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_selected_compiled_on_gpu_matches_the_xla_path(dtype):
  """The block-selection kernels compiled with Triton against the XLA path (and that against the
  dense oracle, tests/test_select.py)."""
  case = kc.CASES["long_term_100_packed"]
  args = kc.inputs(12, case.seq_len, DIMS, dtype=dtype)
  selection = BlockSelection(blocks=3, block_size=32)
  op = lambda impl: functools.partial(retrieve_selected, selection=selection, impl=impl)
  actual = kc.run(op("pallas_gpu"), args, **case.band)
  expected = kc.run(op("xla"), tuple(x.astype(jnp.float32) for x in args), **case.band)
  kc.assert_matches(actual, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v1_packed", "short_term", "long_term_100_packed"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_on_gpu_matches_reference(name, dtype):
  """The kernels compiled with Triton (interpret=False), whatever the default."""
  case = kc.CASES[name]
  args = kc.inputs(11, case.seq_len, DIMS, dtype=dtype)
  actual, expected = kc.compare(pallas_gpu.retrieve_pallas_gpu, args, **case.band, interpret=False)
  kc.assert_matches(actual, expected, dtype)
