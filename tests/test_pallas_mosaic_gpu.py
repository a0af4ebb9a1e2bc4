"""Tests of the Mosaic GPU Pallas kernels (`kernels_pallas.pallas_mosaic_gpu`) against the dense
reference.

Off GPU the kernels run in Pallas's Mosaic GPU interpreter, which jax >= 0.12 exports (on older JAX
these tests skip, but the error saying so is tested): it simulates shared memory, TMA copies,
barriers and warpgroup MMAs on the CPU, one host callback per operation. The band cases of
`kernel_cases` run there in bfloat16, the kernels' dtype, and so do block selections. Three tests
lower the kernels for an H100, which needs no GPU; on a GPU every test compiles them. The cases,
inputs and checks are shared with the other implementations (`kernel_cases`).

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import (
    BlockSelection,
    pallas_mosaic_gpu,
    retrieve,
    retrieve_selected,
    select_blocks,
)

import kernel_cases as kc

B, H = kc.B, kc.H
DIMS = (16, 32)  # (d, e), zero-padded to 64 in the kernels.
DTYPE = jnp.bfloat16

runs = pytest.mark.skipif(
    not pallas_mosaic_gpu.can_run(), reason="needs a GPU or the Mosaic GPU interpreter (jax>=0.12)"
)


@runs
class TestAgainstReference(kc.ReferenceTests):
  op = staticmethod(pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu)
  dims = DIMS
  dtype = DTYPE


@runs
def test_float16_inputs():
  case = kc.CASES["short_term_packed"]
  args = kc.inputs(3, case.seq_len, DIMS, dtype=jnp.float16)
  actual, expected = kc.compare(pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu, args, **case.band)
  kc.assert_matches(actual, expected, jnp.float16)


@runs
def test_band_past_the_end_is_all_zeros():
  """lo > T: no tile is live, so no kernel loop runs a step, and everything is exactly 0."""
  case = kc.CASES["long_term_100"]
  band = dict(case.band, lo=2 * case.seq_len)
  args = kc.inputs(2, case.seq_len, DIMS, dtype=DTYPE)
  y, grads = kc.run(pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu, args, **band)
  for x in (y, *grads):
    assert (np.asarray(x) == 0).all()


@runs
@pytest.mark.parametrize("hi", [None, 20])
def test_traced_lo_compiles_once(hi):
  """Several lo (one of them past short documents) through one jitted function, one trace; T = 37
  is one block, padded."""
  case = kc.Case(37, 1, hi, packed=True)
  op = pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu
  kc.assert_traced_lo_compiles_once(op, case, (1, 3, 20), DIMS, dtype=DTYPE)


@runs
def test_blocks_of_128_and_odd_head_dims():
  """B = 128 (two warpgroup MMA row groups) over T = 300; head dims 72 and 8, padded to 128 and
  64."""
  case, dims = kc.Case(300, 2, 150), (72, 8)
  op = functools.partial(pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu, block_size=128)
  actual, expected = kc.compare(op, kc.inputs(8, case.seq_len, dims, dtype=DTYPE), **case.band)
  assert actual[0].shape == (B, case.seq_len, H, dims[1])
  kc.assert_matches(actual, expected, DTYPE)


@runs
def test_gradients_with_huge_key_norms():
  """v1 keys that are their own queries with norms up to 65535 (q . k ~ 4e9): every kernel forms
  the scores as the same q . k^T product, so the backward recomputes p bit for bit; keeping row
  max and row sum apart and summing D from p dp keeps the gradients finite and close."""
  kernel = pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu
  kc.assert_gradients_stable_with_huge_key_norms(kernel, 6e4, DIMS, dtype=DTYPE, tol=5e-2)


def _selected_op(impl, selection, **kwargs):
  return functools.partial(retrieve_selected, selection=selection, impl=impl, **kwargs)


@runs
@pytest.mark.parametrize("name", ["v1_packed", "long_term_100"])
def test_block_selection_matches_the_dense_oracle(name):
  """The same kernels visit the blocks some query selected (K = 2 of 16 and the newest) and mask
  the rows that did not select them: forward and gradients equal the dense oracle's on the same
  selection (bfloat16 inputs: both select on them)."""
  case = kc.CASES[name]
  args = kc.inputs(9, case.seq_len, DIMS, dtype=DTYPE)
  selection = BlockSelection(blocks=2, block_size=64)
  actual = kc.run(_selected_op("pallas_mosaic_gpu", selection), args, **case.band)
  expected = kc.run(_selected_op("reference", selection), args, **case.band)
  kc.assert_matches(actual, expected, DTYPE)
  # The selection reads fewer pairs than the band: the output differs from the full band's.
  full = kc.run(retrieve, args, **case.band, impl="reference")
  assert not np.allclose(np.asarray(actual[0], np.float32), np.asarray(full[0], np.float32), 1e-2)


def test_refuses_float32_with_the_alternatives():
  q, k, v, _ = kc.inputs(10, 100, DIMS, batch=1)
  with pytest.raises(TypeError, match="bfloat16 or float16.*TF32.*'pallas_gpu' or 'xla'"):
    retrieve(q, k, v, lo=1, impl="pallas_mosaic_gpu")


@pytest.mark.parametrize(
    "block_size, dims, match",
    [
        (32, DIMS, "multiple of 64"),
        (96, DIMS, "multiple of 64"),
        (64, (320, 16), "head dims up to 256, got d = 320"),
    ],
)
def test_refuses_blocks_and_head_dims_it_cannot_tile(block_size, dims, match):
  q, k, v, _ = kc.inputs(10, 100, dims, batch=1, dtype=DTYPE)
  with pytest.raises(ValueError, match=match):
    pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu(q, k, v, lo=1, block_size=block_size)


@pytest.mark.skipif(pallas_mosaic_gpu.can_run(), reason="this JAX runs the kernels")
def test_interpreting_needs_jax_0_12():
  q, k, v, _ = kc.inputs(10, 100, DIMS, batch=1, dtype=DTYPE)
  with pytest.raises(RuntimeError, match=r"Mosaic GPU interpreter, public from jax 0\.12"):
    pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu(q, k, v, lo=1)


@runs
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_lowers_to_mosaic_gpu(dtype):
  """Forward and backward lower to three Mosaic GPU kernels for an H100, on any host.

  This runs Mosaic GPU's layout inference, its checks of every TMA copy and warpgroup MMA, and its
  shared-memory budget (227 KiB), at the widest head dims it takes; compiling to SASS happens only
  on a GPU.
  """
  seq_len, dims = 200, (256, 200)
  kernel = functools.partial(pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu, interpret=False)

  def fn(q, k, v, cotangent, lo, segment_ids):
    y, vjp = jax.vjp(lambda *x: kernel(*x, lo=lo, hi=40, segment_ids=segment_ids), q, k, v)
    return y, vjp(cotangent)

  args = kc.abstract_args(seq_len, dims, dtype)
  assert kc.lowered_for_h100(fn, args).count("stablehlo.custom_call @mosaic_gpu_v2(") == 3


@runs
def test_selected_kernels_lower_to_mosaic_gpu():
  """With a block selection the three kernels lower too."""
  seq_len, dims = 300, (64, 64)
  selection = BlockSelection(blocks=2, block_size=64)

  def fn(q, k, v, cotangent, lo, segment_ids):
    selected = select_blocks(q, k, lo=lo, hi=None, segment_ids=segment_ids, selection=selection)
    kernel = functools.partial(
        pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu_selected,
        lo=lo,
        hi=None,
        segment_ids=segment_ids,
        selected=selected,
        block_size=64,
        interpret=False,
    )
    y, vjp = jax.vjp(kernel, q, k, v)
    return y, vjp(cotangent)

  args = kc.abstract_args(seq_len, dims, DTYPE)
  assert kc.lowered_for_h100(fn, args).count("stablehlo.custom_call @mosaic_gpu_v2(") == 3


@pytest.mark.gpu
def test_selected_compiled_on_gpu_matches_the_xla_path():
  """The block-selection kernels compiled with Mosaic GPU against the XLA path."""
  case = kc.CASES["long_term_100_packed"]
  args = kc.inputs(12, case.seq_len, DIMS, dtype=DTYPE)
  selection = BlockSelection(blocks=3, block_size=64)
  actual = kc.run(_selected_op("pallas_mosaic_gpu", selection), args, **case.band)
  expected = kc.run(_selected_op("xla", selection), args, **case.band)
  kc.assert_matches(actual, expected, DTYPE)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["v1_packed", "short_term", "long_term_100_packed"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_compiled_on_gpu_matches_reference(name, dtype):
  """The kernels compiled with Mosaic GPU (interpret=False), whatever the default."""
  case = kc.CASES[name]
  args = kc.inputs(11, case.seq_len, DIMS, dtype=dtype)
  op = functools.partial(pallas_mosaic_gpu.retrieve_pallas_mosaic_gpu, interpret=False)
  actual, expected = kc.compare(op, args, **case.band)
  kc.assert_matches(actual, expected, dtype)
