"""Tests of `kernels_pallas.retrieve` against a brute-force float64 loop.

The inputs and checks shared with the tests of each implementation are in `kernel_cases`.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
import kernels_pallas.remat
from kernels_pallas import (
    IMPLEMENTATIONS,
    BlockSelection,
    pallas_mosaic_gpu,
    retrieve,
    retrieve_selected,
    visible_counts,
    xla,
)
from kernels_pallas.retrieve import resolve_impl
from kernels_pallas.xla import retrieve_xla

import kernel_cases as kc

B, H = kc.B, kc.H
T, D, E = 37, 3, 5
DIMS = (D, E)
# Block size of every implementation in these tests: several blocks, T = 37 a multiple of none.
# The Pallas GPU kernel needs a power of two >= 16; the library attention tiles time itself.
BLOCKS = {"reference": None, "xla": 8, "pallas_tpu": 8, "pallas_gpu": 16, "shift": None}
IMPLS = tuple(BLOCKS)
# The Mosaic GPU kernels take 16-bit inputs only (tests/test_pallas_mosaic_gpu.py), in blocks of
# 64 or more: T = 37 is one block, padded.
SIXTEEN_BIT_BLOCKS = {"pallas_mosaic_gpu": 64}
FAST_IMPLS = IMPLS[1:]  # Every implementation but the reference.
BLOCK = BLOCKS["xla"]

# Compiled once per static configuration: op-by-op dispatch is slow on CPU.
_retrieve = jax.jit(retrieve, static_argnames=("lo", "hi", "impl", "block_size"))


def _oracle(q, k, v, lo, hi, segment_ids):
  """The definition of the op, one (b, t, h) at a time, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, seq_len, heads, _ = q.shape
  y = np.zeros((batch, seq_len, heads, v.shape[-1]))
  for b in range(batch):
    for t in range(seq_len):
      band = [
          s
          for s in range(seq_len)
          if lo <= t - s
          and (hi is None or t - s <= hi)
          and (segment_ids is None or segment_ids[b, s] == segment_ids[b, t])
      ]
      if not band:
        continue
      for h in range(heads):
        scores = np.array([q[b, t, h] @ k[b, s, h] for s in band])
        weights = np.exp(scores - scores.max())
        y[b, t, h] = weights / weights.sum() @ v[b, band, h]
  return y


# Row 0 packs four documents, one of a single token; row 1 two.
SEGMENTS = kc.SEGMENTS[T]

CASES = {
    "v1": kc.Case(T, 1, None),
    "short_term": kc.Case(T, 1, 4),
    "short_term_wider_than_t": kc.Case(T, 1, 100),
    "long_term": kc.Case(T, 5, None),
    "long_term_past_end": kc.Case(T, 50, None),
    "band": kc.Case(T, 3, 20),
    "causal_attention": kc.Case(T, 0, None),
    "causal_window_packed": kc.Case(T, 0, 5, packed=True),
    "v1_packed": kc.Case(T, 1, None, packed=True),
    "short_term_packed": kc.Case(T, 1, 4, packed=True),
    "long_term_packed": kc.Case(T, 3, None, packed=True),
}


def _inputs(seed, dtype=jnp.float32):
  """(q, k, v, cotangent of the output) of shape [B, T, H, D or E]."""
  return kc.inputs(seed, T, DIMS, dtype=dtype)


def _run(impl, case, args, block_size="default"):
  """retrieve's (y, gradients of sum(y * cotangent) in q, k, v) with `impl` on `case`.

  args = (q, k, v, cotangent). Through `kc.forward_and_grads`, cached: every test of one (impl,
  hi, block_size) shares its compilations.
  """
  if block_size == "default":
    block_size = BLOCKS[impl]
  return kc.run(retrieve, args, **case.band, static_lo=True, impl=impl, block_size=block_size)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_forward_matches_oracle(impl, name):
  case = CASES[name]
  q, k, v, cotangent = _inputs(0)
  y, _ = _run(impl, case, (q, k, v, cotangent))
  assert y.dtype == jnp.float32 and y.shape == (B, T, H, E)
  kc.assert_close(y, _oracle(q, k, v, case.lo, case.hi, case.segment_ids), 1e-5)


@pytest.mark.parametrize("lo, hi", [(1, None), (64, 255)])
def test_xla_default_blocks_on_long_unaligned_sequence(lo, hi):
  seq_len = 1000
  segment_ids = kc.segments([[300, 1, 699]])
  q, k, v, _ = kc.inputs(1, seq_len, (4, 4), batch=1, heads=1)
  y = _retrieve(q, k, v, lo=lo, hi=hi, segment_ids=segment_ids, impl="xla")
  kc.assert_close(y, _oracle(q, k, v, lo, hi, segment_ids), 1e-5)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_gradients_match_reference(impl, name):
  case = CASES[name]
  args = _inputs(2)
  kc.assert_gradients_match(_run(impl, case, args), _run("reference", case, args))


@pytest.mark.parametrize("name", CASES)
def test_xla_single_block_matches_reference(name):
  """A sequence that is one block (T = 37 padded to 40) skips the loops and uses autodiff."""
  case = CASES[name]
  args = _inputs(13)
  q, k, v, _ = args
  actual = _run("xla", case, args, 40)
  kc.assert_close(actual[0], _oracle(q, k, v, case.lo, case.hi, case.segment_ids), 1e-5)
  kc.assert_gradients_match(actual, _run("reference", case, args))


class TestXlaAgainstReference(kc.ReferenceTests):
  """The XLA path at its default blocks of 128 (8 blocks), lo compiled in: the unbounded bands run
  the paired schedule with n - lo // B slots."""

  op = staticmethod(retrieve_xla)
  dims = (16, 8)
  static_lo = True


@pytest.mark.slow
class TestXlaTracedLoAgainstReference(TestXlaAgainstReference):
  """lo traced: the paired schedule keeps n slots and masks the lo // B it cannot skip (the
  default suite has `test_traced_lo_compiles_once` on the XLA path)."""

  static_lo = False


def _visited_pairs(num_blocks, lo, hi, block, static_lo, chunk_scores):
  """The `xla._Schedule`: every (query block, key block) pair of a live slot, once per visit, and
  the number of slots computed."""
  band = xla._Band(lo=lo if static_lo else None, hi=hi, block=block, chunk_scores=chunk_scores)
  schedule = xla._Schedule.make(band, jnp.int32(lo), num_blocks, 1)
  pairs, computed = [], 0
  for index in range(int((schedule.stop - schedule.start) * schedule.chunks)):
    chunk = schedule.chunk_at(jnp.int32(index))
    live = np.asarray(chunk.live)
    assert live.shape == (schedule.chunk,)
    computed += schedule.chunk
    pairs += zip(
        np.asarray(chunk.q_blocks)[live].tolist(), np.asarray(chunk.k_blocks)[live].tolist()
    )
  return pairs, computed, schedule


@pytest.mark.parametrize("chunk_scores", [2**21, 3 * 16])
@pytest.mark.parametrize("static_lo", [True, False])
@pytest.mark.parametrize("hi", [None, 20])
def test_xla_schedule_visits_every_block_pair_of_the_band_once(chunk_scores, static_lo, hi):
  """Brute force over n = 1..9 blocks of 4 and lo from 0 to past the end, in chunks of all slots
  or of 3: each pair of blocks holding some (t, s) of the band is in exactly one live slot,
  and (unbounded, lo compiled in, whole iterations) at most half an iteration's slots is dead."""
  block = 4
  for num_blocks in range(1, 10):
    for lo in range(0, block * (num_blocks + 1), 3):
      pairs, computed, schedule = _visited_pairs(num_blocks, lo, hi, block, static_lo, chunk_scores)
      assert len(pairs) == len(set(pairs))
      t = np.arange(num_blocks * block)
      delta = t[:, None] - t[None, :]
      inside = (delta >= lo) & (hi is None or delta <= hi)
      needed = {(a // block, b // block) for a, b in zip(*np.nonzero(inside))}
      assert needed <= set(pairs), (num_blocks, lo)
      assert all(0 <= kb <= qb < num_blocks for qb, kb in pairs)
      if hi is None:
        # No dead blocks: the visited pairs are the needed ones, whole diagonals.
        assert len(pairs) == sum(num_blocks - r for r in range(lo // block, num_blocks))
        if static_lo and chunk_scores == 2**21 and computed > schedule.slots:
          assert computed - len(pairs) <= schedule.slots // 2 + 1, (num_blocks, lo)


@pytest.mark.parametrize("name", ["v1_packed", "long_term_100", "short_term_packed"])
def test_xla_chunks_of_an_iteration_match_reference(name):
  """Iterations cut into chunks of 3 slots (and a last, partial one) give the same result."""
  case = kc.CASES[name]
  args = kc.inputs(5, case.seq_len, (16, 8))
  op = functools.partial(retrieve_xla, block_size=64, chunk_scores=3 * kc.B * kc.H * 64 * 64)
  kc.assert_matches(*kc.compare(op, args, **case.band, static_lo=True))


def test_xla_default_block_size():
  from kernels_pallas.xla import default_block_size

  assert default_block_size(256, None) == 256  # Short sequences are a single block...
  assert default_block_size(37, 255) == 40
  assert default_block_size(256, 63) == 32  # ...unless the band is much narrower.
  assert default_block_size(257, None) == 128
  assert default_block_size(1000, 255) == 128
  assert default_block_size(4096, 15) == 16
  assert default_block_size(4096, 0) == 16  # lo = hi = 0: each query reads itself.
  assert default_block_size(1, 0) == 8


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("name", kc.DEGENERATE_CASES)
def test_degenerate_bands_match_oracle(impl, name):
  """The reference and what `retrieve` picks by default on CPU (the XLA path, its blocks chosen
  for the band: hi = 0 once raised "negative shift count") serve every degenerate band (each
  implementation is checked on them in its `kc.ReferenceTests`)."""
  case = kc.DEGENERATE_CASES[name]
  args = q, k, v, _ = kc.inputs(11, case.seq_len, DIMS)
  actual, expected = kc.compare(retrieve, args, **case.band, static_lo=True, impl=impl)
  kc.assert_close(actual[0], _oracle(q, k, v, case.lo, case.hi, case.segment_ids), 1e-5)
  kc.assert_gradients_match(actual, expected)


@pytest.mark.parametrize("name", ["v1_packed", "short_term", "long_term_packed"])
def test_reference_gradients_match_finite_differences(name):
  case = CASES[name]
  args = _inputs(3)
  q, k, v, cotangent = args
  _, grads = _run("reference", case, args)
  cotangent = np.asarray(cotangent, np.float64)
  primals = [np.asarray(x, np.float64) for x in (q, k, v)]
  rng = np.random.default_rng(4)
  eps = 1e-4
  for _ in range(2):
    directions = [rng.normal(size=x.shape) for x in primals]
    shifted = lambda sign, directions=directions: np.sum(
        cotangent
        * _oracle(
            *(x + sign * eps * u for x, u in zip(primals, directions)),
            case.lo,
            case.hi,
            case.segment_ids,
        )
    )
    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = sum(np.sum(np.asarray(g, np.float64) * u) for g, u in zip(grads, directions))
    assert abs(analytic - numeric) <= 1e-4 * max(1.0, abs(numeric))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["long_term_past_end", "v1_packed", "long_term_packed"])
def test_empty_rows_are_exactly_zero_with_finite_gradients(impl, name):
  case = CASES[name]
  q, k, v, _ = _inputs(5)
  actual = _run(impl, case, (q, k, v, jnp.ones((B, T, H, E))))
  kc.assert_empty_rows_are_zero(actual, case.lo, case.segment_ids)


# The interpreted kernels (in the slow suite) on one band of each kind: hi = lo, lo past the end,
# T = 1.
SELECTED_DEGENERATE = [
    *((impl, name) for impl in ("reference", "xla") for name in kc.DEGENERATE_CASES),
    *(
        pytest.param(impl, name, marks=pytest.mark.slow)
        for impl in ("pallas_gpu", "pallas_tpu")
        for name in ("one_delay_packed", "past_the_end_bounded", "one_position")
    ),
]


@pytest.mark.parametrize("impl, name", SELECTED_DEGENERATE)
def test_retrieve_selected_on_degenerate_bands(impl, name):
  """The selected path, lo traced, one block of 16 chosen besides the newest: a band of one delay
  lies in the newest block, so it reads all of it, as `retrieve` (forward and gradients); rows
  that read nothing give exactly 0."""
  case = kc.DEGENERATE_CASES[name]
  op = functools.partial(
      retrieve_selected, selection=BlockSelection(blocks=1, block_size=16), impl=impl
  )
  args = kc.inputs(12, case.seq_len, DIMS)
  actual = kc.run(op, args, **case.band)
  kc.assert_matches(actual, kc.run(retrieve, args, **case.band, impl="reference"))
  if case.lo > 0:
    kc.assert_empty_rows_are_zero(actual, case.lo, case.segment_ids)


@pytest.mark.parametrize(
    "impl, block_size", [*((impl, BLOCKS[impl]) for impl in IMPLS), ("xla", 40)]
)
# hi = 0 with lo >= 1: bands a traced lo cannot be checked against, empty, hence 0 (slow:
# test_retrieve_selected_on_degenerate_bands traces lo on hi = 0 in the default suite).
@pytest.mark.parametrize("hi", [None, pytest.param(0, marks=pytest.mark.slow), 30])
def test_traced_lo_compiles_once(impl, block_size, hi):
  q, k, v, _ = _inputs(6)
  traces = []

  def forward_and_grads(impl, count_traces):
    """Jitted (q, k, v, lo) -> (y, gradients of sum(y ** 2)), lo a traced argument."""

    def fn(q, k, v, lo):
      if count_traces:
        traces.append(lo)

      def loss(q, k, v):
        y = retrieve(q, k, v, lo=lo, hi=hi, segment_ids=SEGMENTS, impl=impl, block_size=block_size)
        return jnp.sum(y**2), y

      (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
      return y, grads

    return jax.jit(fn)

  actual_fn = forward_and_grads(impl, count_traces=True)
  expected_fn = forward_and_grads("reference", count_traces=False)
  for lo in (0, 1, 3, 9, 20, 30, 50):
    y, grads = actual_fn(q, k, v, jnp.int32(lo))
    kc.assert_close(y, _oracle(q, k, v, lo, hi, SEGMENTS), 1e-5)
    for g, e in zip(grads, expected_fn(q, k, v, jnp.int32(lo))[1]):
      kc.assert_close(g, e, 2e-4)
  assert len(traces) == 1


@pytest.mark.parametrize("name", ["v1_packed", "short_term"])
def test_gradient_through_per_row_bandwidth(name):
  """q = beta * k with beta a function of per-head parameters, as in the v2 memories."""
  case = CASES[name]
  _, k, v, cotangent = _inputs(7)
  theta = jnp.array([0.3, -0.2])
  counts = visible_counts(case.segment_ids, T, case.lo, case.hi).astype(jnp.float32)

  def loss(theta, k, v, impl):
    beta = jnp.exp(theta) * (1.0 + counts[..., None]) ** 0.5
    y = retrieve(
        beta[..., None] * k,
        k,
        v,
        lo=case.lo,
        hi=case.hi,
        segment_ids=case.segment_ids,
        impl=impl,
        block_size=BLOCK,
    )
    return jnp.sum(y * cotangent)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  for a, e in zip(grad(theta, k, v, "xla"), grad(theta, k, v, "reference")):
    kc.assert_close(a, e, 2e-4)


@pytest.mark.parametrize(
    "impl, block_size",
    # xla with None: the default, a single block. The library attention ("shift") makes no such
    # promise: it computes the softmax correction as dy . y.
    [("xla", BLOCK), ("xla", None), ("pallas_tpu", 8), ("pallas_gpu", 16)],
)
@pytest.mark.parametrize("scale", [30.0, 300.0, 3e3, 6e4])
def test_gradients_with_huge_key_norms(impl, scale, block_size):
  """v1 keys are their own queries with norms up to 65535 (q . k ~ 4e9): the backward must not
  amplify rounding (it once saved row_max + log(row_sum) and used D = dy . y, off by up to 1e33)."""
  op = functools.partial(retrieve, impl=impl, block_size=block_size)
  kc.assert_gradients_stable_with_huge_key_norms(op, scale, DIMS, seq_len=T)


@pytest.mark.parametrize("impl", [*IMPLS, *SIXTEEN_BIT_BLOCKS])
def test_bfloat16_inputs(impl):
  if impl == "pallas_mosaic_gpu" and not pallas_mosaic_gpu.can_run():
    pytest.skip("needs a GPU or the Mosaic GPU interpreter (jax>=0.12)")
  case = CASES["v1_packed"]
  args = _inputs(8, dtype=jnp.bfloat16)
  q, k, v, _ = args
  actual = _run(impl, case, args, {**BLOCKS, **SIXTEEN_BIT_BLOCKS}[impl])
  assert actual[0].dtype == jnp.bfloat16
  kc.assert_close(actual[0], _oracle(q, k, v, case.lo, case.hi, case.segment_ids), 3e-2)
  widened = tuple(x.astype(jnp.float32) for x in args)
  kc.assert_gradients_match(actual, _run("reference", case, widened), jnp.bfloat16)


@pytest.mark.parametrize(
    "impl, backend, expected",
    [
        ("auto", "cpu", "xla"),
        ("auto", "gpu", "pallas_gpu"),
        ("auto", "tpu", "pallas_tpu"),
        ("pallas", "cpu", "pallas_gpu"),
        ("pallas", "gpu", "pallas_gpu"),
        ("pallas", "tpu", "pallas_tpu"),
        ("shift", "tpu", "shift"),
    ],
)
def test_resolve_impl(impl, backend, expected):
  assert resolve_impl(impl, backend) == expected


def test_auto_on_cpu_is_xla():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU default")
  q, k, v, _ = _inputs(9)
  auto, xla = (
      _retrieve(q, k, v, lo=2, hi=None, impl=impl, block_size=BLOCK) for impl in ("auto", "xla")
  )
  np.testing.assert_array_equal(auto, xla)


def test_implementations_table():
  assert set(IMPLEMENTATIONS) == {*IMPLS, *SIXTEEN_BIT_BLOCKS}
  assert kernels_pallas.retrieve is retrieve


_Q, _K, _V, _ = _inputs(10)


def _valid_call(**overrides):
  """retrieve on valid arguments, with some of them replaced."""
  kwargs = dict(q=_Q, k=_K, v=_V, lo=1, hi=None, segment_ids=SEGMENTS)
  kwargs.update(overrides)
  q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
  return retrieve(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(q=_Q[0]), ValueError, r"q must have rank 4"),
        (dict(v=_V[..., None]), ValueError, r"v must have rank 4"),
        (dict(k=_K[:, :-1]), ValueError, r"q and k must have the same shape, got q \(2, 37"),
        (dict(v=_V[:, :, :1]), ValueError, r"v must match k in \[b, t, h\]"),
        (dict(q=_Q.astype(jnp.int32)), TypeError, r"q must have a floating dtype, got int32"),
        (dict(v=_V.astype(jnp.bfloat16)), TypeError, r"share one dtype.*v bfloat16"),
        (dict(segment_ids=SEGMENTS[:, :-1]), ValueError, r"segment_ids must have shape"),
        (dict(segment_ids=SEGMENTS.astype(np.float32)), TypeError, r"integer dtype"),
        (dict(lo=-1), ValueError, r"lo must be >= 0, got -1"),
        (dict(lo=2.0), TypeError, r"lo must be an int or an integer scalar array"),
        (dict(lo=True), TypeError, r"lo must be an int or an integer scalar array"),
        (dict(lo=jnp.float32(2)), TypeError, r"lo must be an integer scalar"),
        (dict(lo=jnp.array([1, 2])), TypeError, r"lo must be an integer scalar"),
        (dict(lo=0, hi=-1), ValueError, r"hi must be >= 0, got -1"),
        (dict(lo=5, hi=4), ValueError, r"hi must be >= lo, got lo=5 and hi=4"),
        (dict(hi=2.5), TypeError, r"hi must be a Python int or None"),
        (dict(block_size=0), ValueError, r"block_size must be a positive int"),
        (dict(impl="triton"), ValueError, r"unknown retrieve impl 'triton'.*'auto', 'pallas'"),
    ],
)
def test_validation_errors(overrides, error, match):
  with pytest.raises(error, match=match):
    _valid_call(**overrides)


@pytest.mark.parametrize(
    "impl, backend, kernels",
    [
        ("auto", "tpu", 4),  # Forward, D, dq and dk/dv.
        ("shift", "tpu", 3),  # Splash attention's forward, dq and dk/dv.
        ("auto", "cpu", 0),  # The XLA path: no kernel.
    ],
)
def test_backend_picks_the_kernels_compiled_for_it(impl, backend, kernels):
  """`backend` is the platform compiled for, whatever the host: "tpu" lowers the TPU kernels
  compiled with Mosaic (interpreted ones would lower to plain HLO, with no Mosaic call)."""
  q = jax.ShapeDtypeStruct((1, 256, 2, 16), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

  def loss(q, k, v, segment_ids):
    y = retrieve(q, k, v, lo=1, hi=64, segment_ids=segment_ids, impl=impl, backend=backend)
    return jnp.sum(y.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  exported = jax.export.export(grad, platforms=["tpu"])(q, q, q, segment_ids)
  assert exported.mlir_module().count("tpu_custom_call") == kernels


def _count(jaxpr, names: tuple[str, ...]) -> int:
  """Equations of a jaxpr and its sub-jaxprs whose primitive is in `names`, loop bodies once."""
  return sum(
      (eqn.primitive.name in names)
      + sum(_count(sub, names) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
      for eqn in jaxpr.eqns
  )


@pytest.mark.parametrize(
    "op",
    [
        functools.partial(retrieve, lo=1, impl="xla", block_size=8),  # Blocked.
        functools.partial(retrieve, lo=1, impl="xla"),  # One block.
        functools.partial(retrieve, lo=1, hi=9, impl="pallas_tpu", block_size=8),
        functools.partial(retrieve, lo=1, impl="pallas_gpu", block_size=16),
        functools.partial(
            retrieve_selected, lo=1, selection=BlockSelection(blocks=1, block_size=8)
        ),
        # Pairs [c, h, p, d] cut from k and v.
        lambda q, k, v: kernels_pallas.retrieve_persistent(
            q, *(x[:1, :4].transpose(0, 2, 1, 3) for x in (k, v))
        ),
    ],
    ids=["xla-blocked", "xla-one-block", "pallas_tpu", "pallas_gpu", "selected", "persistent"],
)
def test_named_residuals_spare_the_forward_under_remat(op):
  """Under `jax.checkpoint` saving `kernels_pallas.remat.NAME`, the gradient runs the op's
  matmuls (or kernels) as often as without remat; saving nothing, it runs the forward again."""
  q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, D)) for i in range(3))
  loss = lambda q, k, v: jnp.sum(op(q, k, v) ** 2)
  policy = jax.checkpoint_policies.save_only_these_names(kernels_pallas.remat.NAME)
  grad = lambda f: jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v).jaxpr
  ops = ("dot_general", "pallas_call")
  plain = _count(grad(loss), ops)
  assert _count(grad(jax.checkpoint(loss, policy=policy)), ops) == plain
  assert _count(grad(jax.checkpoint(loss)), ops) > plain
