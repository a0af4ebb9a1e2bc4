"""Tests of `kernels_pallas.shift.retrieve_shift` (library attention over shifted queries) against
the dense reference.

The cases, inputs and checks shared with the other implementations are in `kernel_cases`.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import shift

import kernel_cases as kc

DIMS = (8, 4)  # (d, e), e != d: the libraries' common head dim is padding.

# Bands narrower than the shared cases', with and without documents.
NARROW_CASES = {
    "short_term_narrow": kc.Case(1024, 1, 7),
    "short_term_narrow_packed": kc.Case(1000, 1, 7, packed=True),
}


class TestAgainstReference(kc.ReferenceTests):
  op = staticmethod(shift.retrieve_shift)
  dims = DIMS
  static_lo = True


def _check_against_reference(case, dtype=jnp.float32, seed=0, **kwargs):
  args = kc.inputs(seed, case.seq_len, DIMS, dtype=dtype)
  actual, expected = kc.compare(shift.retrieve_shift, args, **case.band, static_lo=True, **kwargs)
  kc.assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("name", NARROW_CASES)
def test_narrow_band_matches_reference(name):
  _check_against_reference(NARROW_CASES[name])


@pytest.mark.parametrize("name", ["short_term_packed", "long_term_100_packed"])
def test_bfloat16_matches_reference(name):
  _check_against_reference(kc.CASES[name], jnp.bfloat16, seed=1)


@pytest.mark.parametrize("hi", [None, 40])
def test_traced_lo_compiles_once(hi):
  case = kc.Case(1000, 1, hi, packed=True)
  kc.assert_traced_lo_compiles_once(shift.retrieve_shift, case, (1, 3, 40, 300), DIMS, seed=2)


def test_traced_lo_with_finite_hi_needs_xla():
  q, k, v, _ = kc.inputs(3, 16, DIMS)
  with pytest.raises(ValueError, match=r"traced lo with a finite hi needs implementation 'xla'"):
    jax.jit(lambda lo: shift.retrieve_shift(q, k, v, lo=lo, hi=4, implementation="splash"))(
        jnp.int32(1)
    )


# Splash attention runs interpreted off TPU: small cases only. T = 200 pads to 256 (two blocks).
@pytest.mark.parametrize(
    "lo, hi, segment_ids",
    [
        (1, None, kc.segments([[120, 1, 79], [200]])),
        (1, 100, None),
        (30, None, kc.segments([[120, 1, 79], [50, 150]])),
    ],
)
def test_splash_matches_reference(lo, hi, segment_ids):
  args = kc.inputs(4, 200, DIMS)
  band = dict(lo=lo, hi=hi, segment_ids=segment_ids, static_lo=True)
  kc.assert_matches(*kc.compare(shift.retrieve_shift, args, **band, implementation="splash"))


def test_default_implementation_per_backend():
  backend = jax.default_backend()
  picked = shift.default_implementation(jnp.bfloat16, 64, packed=False)
  if backend == "tpu":
    assert picked == "splash"
  elif backend == "gpu":
    assert picked in ("cudnn", "xla")  # cuDNN only on CUDA GPUs.
  else:
    assert picked == "xla"
  # Neither splash nor cuDNN takes a traced window; cuDNN takes no float32 or documents.
  assert shift.default_implementation(jnp.bfloat16, 64, False, static_window=False) == "xla"
  if backend == "gpu":
    assert shift.default_implementation(jnp.float32, 64, packed=False) == "xla"
    assert shift.default_implementation(jnp.bfloat16, 64, packed=True) == "xla"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["short_term", "long_term_256"])
def test_cudnn_matches_reference(name):
  _check_against_reference(kc.CASES[name], jnp.bfloat16, seed=5, implementation="cudnn")
