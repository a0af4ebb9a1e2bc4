"""Cases, inputs and checks shared by the tests of the retrieve implementations.

Every implementation is checked against `kernels_pallas.reference.retrieve_reference` on the same
band cases, with the same tolerances, through one cached jitted forward and backward per function
and band. `ReferenceTests` holds the tests every implementation passes on `CASES`; a test file
subclasses it (as a class named Test*) with the function under test.

Import it as `import kernel_cases`: pytest's default import mode puts tests/ on sys.path.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import mesh as mesh_lib

from kernels_pallas.reference import retrieve_reference

B, H = 2, 2

# Max abs error allowed, relative to max(1, |expected|max): (forward, gradients) per input dtype.
TOLERANCES = {
    jnp.dtype(jnp.float32): (1e-5, 2e-4),
    jnp.dtype(jnp.bfloat16): (2e-2, 5e-2),
    jnp.dtype(jnp.float16): (5e-3, 1e-2),
}


def segments(lengths_per_row):
  """[b, t] document ids from the document lengths of every row."""
  return np.stack([np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row]).astype(np.int32)


# Several documents per row, one of a single token. 1024's second row splits on a block boundary;
# 1000's first row ends with a document shorter than the widest lo. 37 is a short sequence.
SEGMENTS = {
    37: segments([[10, 1, 20, 6], [3, 34]]),
    1000: segments([[300, 1, 450, 249], [640, 360]]),
    1024: segments([[129, 1, 600, 294], [512, 512]]),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """The band lo <= t - s <= hi (hi None: no bound) over T = seq_len, packed: in SEGMENTS's
  documents."""

  seq_len: int
  lo: int
  hi: int | None
  packed: bool = False

  @property
  def segment_ids(self):
    return SEGMENTS[self.seq_len] if self.packed else None

  @property
  def band(self):
    """lo, hi and segment_ids, as keyword arguments."""
    return dict(lo=self.lo, hi=self.hi, segment_ids=self.segment_ids)


# hi = 255 puts the band's far edge inside a block of 64 or 128; lo = 100 does too.
CASES = {
    "v1": Case(1024, 1, None),
    "v1_packed": Case(1000, 1, None, packed=True),
    "short_term": Case(1000, 1, 255),
    "short_term_packed": Case(1024, 1, 255, packed=True),
    "long_term_64": Case(1024, 64, None),
    "long_term_64_packed": Case(1000, 64, None, packed=True),
    "long_term_100": Case(1000, 100, None),
    "long_term_100_packed": Case(1024, 100, None, packed=True),
    "long_term_256": Case(1024, 256, None),
    "long_term_256_packed": Case(1000, 256, None, packed=True),
}


# Degenerate bands, on short sequences: one delay (hi = lo, 0 included), lo past the end (every row
# empty; unbounded, it is test_retrieve.py's long_term_past_end), a single position.
DEGENERATE_CASES = {
    "self_only": Case(37, 0, 0),
    "one_delay_packed": Case(37, 3, 3, packed=True),
    "past_the_end_bounded": Case(37, 40, 45),
    "one_position": Case(1, 0, 0),
    "one_position_empty": Case(1, 1, None),
}


def inputs(seed, seq_len, dims, batch=B, heads=H, dtype=jnp.float32):
  """(q, k, v, cotangent of the output), standard normal in `dtype`; dims = (d, e)."""
  rng = np.random.default_rng(seed)
  dim, value_dim = dims
  return tuple(
      jnp.asarray(rng.normal(size=(batch, seq_len, heads, n)), dtype)
      for n in (dim, dim, value_dim, value_dim)
  )


def assert_close(actual, expected, tol):
  """Finite, and max abs error within tol, relative to the scale of `expected` (at least 1)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  assert np.isfinite(actual).all()
  scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


@functools.cache
def forward_and_grads(op, hi, static_lo=False, **kwargs):
  """Jitted (q, k, v, cotangent, segment_ids, lo) -> (y, gradients of sum(y * cotangent)).

  `op` is a retrieve function, called as op(q, k, v, lo=lo, hi=hi, segment_ids=segment_ids,
  **kwargs). lo is traced, so that one compilation serves every lo of a band, unless `static_lo`.
  Cached: every test of one (op, hi, static_lo, kwargs) shares its compilations.
  """

  def fn(q, k, v, cotangent, segment_ids, lo):
    y, vjp = jax.vjp(
        lambda q, k, v: op(q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, **kwargs), q, k, v
    )
    return y, vjp(cotangent.astype(y.dtype))

  return jax.jit(fn, static_argnames=("lo",) if static_lo else ())


def run(op, args, lo, hi=None, segment_ids=None, static_lo=False, **kwargs):
  """op's (y, gradients) on args = (q, k, v, cotangent), through `forward_and_grads`."""
  fn = forward_and_grads(op, hi, static_lo, **kwargs)
  return fn(*args, segment_ids, lo if static_lo else jnp.int32(lo))


def compare(op, args, lo, hi=None, segment_ids=None, static_lo=False, **kwargs):
  """(op's (y, gradients), the reference's on `args` widened to float32), as `run` gives them."""
  band = dict(lo=lo, hi=hi, segment_ids=segment_ids, static_lo=static_lo)
  widened = tuple(x.astype(jnp.float32) for x in args)
  return run(op, args, **band, **kwargs), run(retrieve_reference, widened, **band)


@functools.cache
def results(op, name, dims, dtype=jnp.float32, static_lo=False):
  """`compare` on CASES[name] (or DEGENERATE_CASES[name]) with inputs of seed 0 in `dtype`.

  Cached: every test of one case shares a single run of `op` and of the reference.
  """
  case = CASES[name] if name in CASES else DEGENERATE_CASES[name]
  args = inputs(0, case.seq_len, dims, dtype=dtype)
  return compare(op, args, **case.band, static_lo=static_lo)


def assert_forward_matches(actual, expected, dtype=jnp.float32):
  """actual's output is in `dtype` and within the forward tolerance of expected's."""
  (y, _), (expected_y, _) = actual, expected
  assert y.dtype == dtype
  assert_close(y, expected_y, TOLERANCES[jnp.dtype(dtype)][0])


def assert_gradients_match(actual, expected, dtype=jnp.float32):
  """actual's gradients are in `dtype`, finite and within the gradient tolerance of expected's."""
  (_, grads), (_, expected_grads) = actual, expected
  assert len(grads) == len(expected_grads)
  for g, e in zip(grads, expected_grads):
    assert g.dtype == dtype
    assert_close(g, e, TOLERANCES[jnp.dtype(dtype)][1])


def assert_matches(actual, expected, dtype=jnp.float32):
  """Both `assert_forward_matches` and `assert_gradients_match`."""
  assert_forward_matches(actual, expected, dtype)
  assert_gradients_match(actual, expected, dtype)


def abstract_args(seq_len, dims, dtype, batch=B, heads=H):
  """Shapes of (q, k, v, cotangent, lo, segment_ids) for lowering without data; dims = (d, e)."""
  dim, value_dim = dims
  arrays = [
      jax.ShapeDtypeStruct((batch, seq_len, heads, n), dtype)
      for n in (dim, dim, value_dim, value_dim)
  ]
  return [
      *arrays,
      jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
  ]


def lowered_for_h100(fn, args) -> str:
  """The text of `fn` jitted and lowered on `args` for a CUDA H100, on any host (no GPU needed).

  jax >= 0.12 reads the target GPU from the abstract mesh when the host has none.
  """
  h100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def positions_in_documents(segment_ids, batch, seq_len):
  """[b, t] position of every token in its document (in its row when segment_ids is None)."""
  t = np.broadcast_to(np.arange(seq_len), (batch, seq_len))
  if segment_ids is None:
    return t
  segment_ids = np.asarray(segment_ids)
  starts = np.ones((batch, seq_len), bool)
  starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
  return t - np.maximum.accumulate(np.where(starts, t, 0), axis=1)


def assert_empty_rows_are_zero(actual, lo, segment_ids):
  """The queries that read nothing, the first lo positions of every document, give exactly 0 and
  get no gradient; every gradient is finite."""
  y, (dq, dk, dv) = actual
  batch, seq_len = y.shape[:2]
  empty = positions_in_documents(segment_ids, batch, seq_len) < lo
  assert empty.any()
  assert (np.asarray(y)[empty] == 0).all()
  assert (np.asarray(dq)[empty] == 0).all()
  for g in (dq, dk, dv):
    assert np.isfinite(np.asarray(g)).all()


def assert_traced_lo_compiles_once(op, case, los, dims, batch=B, seed=4, dtype=jnp.float32):
  """Every lo in `los` through one jitted function: op matches the reference at each (on case's
  seq_len, hi and documents, its lo replaced, inputs in `dtype`) and is traced once."""
  traces = []

  def counted(*args, **kwargs):
    traces.append(kwargs["lo"])
    return op(*args, **kwargs)

  args = inputs(seed, case.seq_len, dims, batch=batch, dtype=dtype)
  segment_ids = None if case.segment_ids is None else case.segment_ids[:batch]
  for lo in los:
    assert_matches(*compare(counted, args, lo, case.hi, segment_ids), dtype)
  assert len(traces) == 1


def assert_gradients_stable_with_huge_key_norms(
    op, scale, dims, seq_len=256, dtype=jnp.float32, tol=1e-3
):
  """v1 with keys that are their own queries, of norm `scale` (q . k up to scale ** 2), in
  `dtype`: op's gradients in k and v are finite and within `tol` of the reference's."""
  q, _, v, cotangent = inputs(6, seq_len, dims)
  k = (q / jnp.linalg.norm(q, axis=-1, keepdims=True) * scale).astype(dtype)
  v, cotangent = v.astype(dtype), cotangent.astype(dtype)

  def grads(op):
    loss = lambda k, v: jnp.sum(op(k, k, v, lo=1, hi=None) * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(k, v)

  for actual, expected in zip(grads(op), grads(retrieve_reference)):
    assert_close(actual, expected, tol)


class ReferenceTests:
  """The tests every implementation passes against the reference on `CASES` and `DEGENERATE_CASES`.

  A test file subclasses it as a class named Test*, setting `op`, the retrieve function under
  test (as a staticmethod), `dims`, the head dims (d, e), `static_lo`, whether lo is passed
  as a Python int rather than traced, and `dtype`, that of the inputs of the band cases (with
  its tolerances).
  """

  op: Callable[..., jax.Array]
  dims: tuple[int, int]
  static_lo: bool = False
  dtype: jnp.dtype = jnp.float32

  def case_results(self, name, dtype=None):
    """`results` of `op` on the case `name` (inputs in `dtype`, default the class's)."""
    return results(self.op, name, self.dims, dtype or self.dtype, self.static_lo)

  @pytest.mark.parametrize("name", CASES)
  def test_forward_matches_reference(self, name):
    assert_forward_matches(*self.case_results(name), self.dtype)

  @pytest.mark.parametrize("name", CASES)
  def test_gradients_match_reference(self, name):
    assert_gradients_match(*self.case_results(name), self.dtype)

  @pytest.mark.parametrize("name", CASES)
  def test_empty_rows_are_exactly_zero_with_finite_gradients(self, name):
    """The first lo positions of every document read nothing (in v1_packed, the 1-token one)."""
    case = CASES[name]
    assert_empty_rows_are_zero(self.case_results(name)[0], case.lo, case.segment_ids)

  # hi = lo = 0 (which once raised) and T = 1 in the default suite; test_retrieve.py checks what
  # "auto" picks on every degenerate band there.
  @pytest.mark.parametrize(
      "name",
      [
          n if n in ("self_only", "one_position") else pytest.param(n, marks=pytest.mark.slow)
          for n in DEGENERATE_CASES
      ],
  )
  def test_degenerate_band_matches_reference(self, name):
    """hi = lo, lo past the end, T = 1: forward and gradients, and rows that read nothing give
    exactly 0."""
    case = DEGENERATE_CASES[name]
    actual = self.case_results(name)
    assert_matches(*actual, self.dtype)
    if case.lo > 0:
      assert_empty_rows_are_zero(actual[0], case.lo, case.segment_ids)

  def test_bfloat16_inputs(self):
    assert_matches(*self.case_results("v1_packed", jnp.bfloat16), jnp.bfloat16)
