"""Tests of the TPU Pallas kernels (`kernels_pallas.pallas_tpu`) against the dense reference.

Off TPU the kernels run in Pallas's interpreter; one test runs its TPU simulator, and one checks
that they lower to Mosaic kernels for TPU. The cases, inputs and checks shared with the other
implementations are in `kernel_cases`.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import BlockSelection, pallas_tpu, retrieve_selected, select_blocks

import kernel_cases as kc

B, H = kc.B, kc.H
D, E = DIMS = (16, 8)


class TestAgainstReference(kc.ReferenceTests):
  op = staticmethod(pallas_tpu.retrieve_pallas_tpu)
  dims = DIMS
  static_lo = True


def test_short_sequence_is_one_block():
  """T = 37 is one block of 40 by default (a block need not be 128 when it is the whole T)."""
  assert pallas_tpu.default_block_size(37) == 40
  assert pallas_tpu.default_block_size(1000) == 128
  case = kc.Case(37, 2, 20, packed=True)
  args = kc.inputs(2, case.seq_len, DIMS)
  kc.assert_matches(*kc.compare(pallas_tpu.retrieve_pallas_tpu, args, **case.band, static_lo=True))


@pytest.mark.parametrize("hi, los", [(None, (1, 64, 100, 256)), (255, (1, 64, 200))])
def test_traced_lo_compiles_once(hi, los):
  case = kc.Case(1000, 1, hi, packed=True)
  kc.assert_traced_lo_compiles_once(pallas_tpu.retrieve_pallas_tpu, case, los, DIMS, batch=1)


@pytest.mark.parametrize("scale", [3e3, 6e4])
def test_gradients_with_huge_key_norms(scale):
  """v1 keys are their own queries with norms up to 65535 (q . k ~ 4e9): the backward must keep
  row max and row sum apart and sum D from p dp, or rounding is amplified past any tolerance."""
  kc.assert_gradients_stable_with_huge_key_norms(pallas_tpu.retrieve_pallas_tpu, scale, DIMS)


def test_tpu_simulator():
  """The TPU interpreter simulates VMEM, DMAs and SMEM and checks every read is in bounds."""
  seq_len = 256
  segment_ids = kc.segments([[100, 1, 155], [256]])
  op = functools.partial(pallas_tpu.retrieve_pallas_tpu, interpret=pltpu.InterpretParams())
  args = kc.inputs(8, seq_len, DIMS)
  kc.assert_matches(*kc.compare(op, args, 1, None, segment_ids, static_lo=True))


@pytest.mark.slow  # test_select.py checks the interpreted kernels with selections.
def test_tpu_simulator_with_a_block_selection():
  """The block-selection kernels read their per-head lists in bounds too, and match the XLA path
  (itself tested against the dense oracle, tests/test_select.py)."""
  seq_len = 100
  segment_ids = kc.segments([[40, 1, 59], [100]])
  selection = BlockSelection(blocks=2, block_size=16)

  args = kc.inputs(9, seq_len, DIMS)
  selected = lambda q, k, v, **band: pallas_tpu.retrieve_pallas_tpu_selected(
      q,
      k,
      v,
      selected=select_blocks(q, k, selection=selection, **band),
      block_size=16,
      interpret=pltpu.InterpretParams(),
      **band,
  )
  kc.assert_matches(
      kc.run(selected, args, 5, None, segment_ids, static_lo=True),
      kc.run(
          functools.partial(retrieve_selected, selection=selection, impl="xla"),
          args,
          5,
          None,
          segment_ids,
          static_lo=True,
      ),
  )


@pytest.mark.parametrize(
    "block_size, interpret, match",
    [
        (12, True, r"multiple of 8"),
        (64, False, r"multiple of 128 or cover the whole sequence"),
    ],
)
def test_block_size_must_respect_tpu_tiling(block_size, interpret, match):
  q, k, v, _ = kc.inputs(10, 1000, DIMS, batch=1)
  with pytest.raises(ValueError, match=match):
    pallas_tpu.retrieve_pallas_tpu(q, k, v, lo=1, block_size=block_size, interpret=interpret)


@pytest.mark.parametrize(
    "seq_len, hi, packed, dtype",
    [
        (1000, None, True, jnp.float32),
        (1000, 255, False, jnp.bfloat16),
        (37, None, True, jnp.float32),
    ],
)
def test_lowers_to_mosaic(seq_len, hi, packed, dtype):
  """Forward and backward lower to Mosaic kernels for TPU (what runs there is not checked here:
  Mosaic's own compilation happens in the TPU runtime)."""
  q = jax.ShapeDtypeStruct((B, seq_len, H, D), dtype)
  v = jax.ShapeDtypeStruct((B, seq_len, H, E), dtype)
  segment_ids = jax.ShapeDtypeStruct((B, seq_len), jnp.int32) if packed else None

  def loss(q, k, v, segment_ids, lo):
    y = pallas_tpu.retrieve_pallas_tpu(
        q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, interpret=False
    )
    return jnp.sum(y.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  lo = jax.ShapeDtypeStruct((), jnp.int32)
  exported = jax.export.export(grad, platforms=["tpu"])(q, q, v, segment_ids, lo)
  # The forward, D, dq and dk/dv kernels.
  assert exported.mlir_module().count("tpu_custom_call") == 4


def test_selected_kernels_lower_to_mosaic():
  """With a block selection, forward and backward lower to the same four Mosaic kernels."""
  seq_len = 1000
  selection = BlockSelection(blocks=2, block_size=128)
  q = jax.ShapeDtypeStruct((B, seq_len, H, D), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((B, seq_len, H, E), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((B, seq_len), jnp.int32)

  def loss(q, k, v, segment_ids, lo):
    band = dict(lo=lo, hi=None, segment_ids=segment_ids)
    y = pallas_tpu.retrieve_pallas_tpu_selected(
        q,
        k,
        v,
        selected=select_blocks(q, k, selection=selection, **band),
        block_size=128,
        interpret=False,
        **band,
    )
    return jnp.sum(y.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  lo = jax.ShapeDtypeStruct((), jnp.int32)
  exported = jax.export.export(grad, platforms=["tpu"])(q, q, v, segment_ids, lo)
  assert exported.mlir_module().count("tpu_custom_call") == 4
