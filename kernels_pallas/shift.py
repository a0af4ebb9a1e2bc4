"""Retrieval as standard causal attention over shifted queries: the library baseline.

Every band is a plain causal (or causal sliding-window) attention once the queries are moved lo
steps back in time. The query at time t reads the keys s in [t - hi, t - lo]; with t' = t - lo
that is s in [t' - (hi - lo), t']: causal attention with a left window of hi - lo positions (none
when hi is None) over the queries q'[t'] = q[t' + lo], and y[t] = y'[t - lo]. The shift is a roll
of the time axis, so a traced lo costs no recompilation. The rolled-in queries t' >= T - lo wrap
around to the start; their outputs land on the rows t < lo, whose band is empty, and every row
with an empty band (those, and the first lo positions of every document) is set to exactly 0
afterwards. The attention itself never sees an all-masked row it cannot handle: the libraries
mask with a large finite negative number, so such rows give finite values (then discarded) and
zero cotangents, hence finite gradients.

The attention runs in the best library kernel of the backend:

- TPU: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) with a CausalMask or
  LocalMask and SegmentIds for packed documents. The same kernel runs in interpret mode elsewhere
  (`implementation="splash"`), slowly: that is for tests.
- GPU: `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention) for
  bfloat16 and float16 without segment ids. cuDNN takes documents only as a dense [T, T] bias, so
  with segment ids, in float32, or with a head dim cuDNN rejects, the XLA implementation below
  runs instead.
- Otherwise: `jax.nn.dot_product_attention(implementation="xla")`, which materialises the
  [b, h, T, T] scores (O(T^2) memory) with a float32 softmax; in bfloat16 it rounds the
  probabilities to bfloat16 before the product with v, as `xla.retrieve_xla` does. Its float32
  matmuls run at the backend's default precision, also as there.

A traced lo with a finite hi makes the window hi - lo traced too, which neither splash attention
nor cuDNN can take (their masks are static): that case always runs the XLA implementation, with
the window as an explicit mask.

Queries, keys and values are padded with zeros to one common head dim (the libraries want
dim(q) = dim(v)), which changes no score; the output is cropped back to e.

Axis legend: b = batch, t = query time, s = key time, h = heads, d = head dim of q and k,
e = head dim of v, f = common padded head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention
from jaxtyping import Array, Float, Int

from kernels_pallas import bands

IMPLEMENTATIONS = ("splash", "cudnn", "xla")
# Splash attention tiles time by 128 (its default block sizes) and needs T to be a multiple.
SPLASH_BLOCK = 128
# cuDNN flash attention wants a head dim that is a multiple of 8, at most 128 (256 from Hopper on).
CUDNN_DIM_MULTIPLE = 8


def _cuda_capability() -> tuple[int, int] | None:
  """(major, minor) compute capability of the default device when it is a CUDA GPU, else None."""
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or not isinstance(capability, str):
    return None
  parts = capability.split(".")
  if len(parts) != 2 or not all(p.isdigit() for p in parts):
    return None  # Not CUDA (ROCm names its architectures differently): no cuDNN.
  return int(parts[0]), int(parts[1])


def _cudnn_supported(dtype: jnp.dtype, dim: int, packed: bool) -> bool:
  """Whether cuDNN flash attention takes this call (`dim` already a multiple of 8)."""
  capability = _cuda_capability()
  if capability is None or packed or dtype not in (jnp.bfloat16, jnp.float16):
    return False
  return dim <= (256 if capability >= (9, 0) else 128)


def default_implementation(
    dtype: jax.typing.DTypeLike,
    dim: int,
    packed: bool,
    static_window: bool = True,
    backend: str | None = None,
) -> str:
  """The attention kernel picked for a backend (default JAX's), dtype, head dim, packing, window."""
  if not static_window:
    return "xla"
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu" and _cudnn_supported(dtype, _round_up(dim, CUDNN_DIM_MULTIPLE), packed):
    return "cudnn"
  return "xla"


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_last(x: Array, size: int) -> Array:
  """Zero-pads the last axis of x to `size`."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


@functools.cache
def _splash_kernel(seq_len: int, heads: int, window: int | None, interpret: bool):
  """The splash attention kernel for a causal (window None) or causal sliding-window mask.

  Cached: building it processes the mask block by block in numpy, once per configuration. Its
  block tables are built as concrete arrays even inside a trace, so the cache leaks no tracer.
  """
  shape = (seq_len, seq_len)
  if window is None:
    mask = splash_attention.CausalMask(shape)
  else:
    mask = splash_attention.LocalMask(shape, window_size=(window, 0), offset=0)
  with jax.ensure_compile_time_eval():
    return splash_attention.make_splash_mha(
        splash_attention.MultiHeadMask([mask] * heads),
        block_sizes=splash_attention.BlockSizes.get_default(),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _attend_splash(
    q: Float[Array, "b t h f"],
    k: Float[Array, "b s h f"],
    v: Float[Array, "b s h f"],
    q_segments: Int[Array, "b t"] | None,
    kv_segments: Int[Array, "b s"] | None,
    window: int | None,
    interpret: bool,
) -> Float[Array, "b t h f"]:
  """Causal attention with splash attention (compiled for TPU, else interpreted)."""
  _, seq_len, heads, _ = q.shape
  padded = _round_up(seq_len, SPLASH_BLOCK)
  # The padding sits after every real position: causality keeps padded keys out of real rows, and
  # the padded rows are cropped.
  pad = [(0, 0), (0, padded - seq_len)]
  q, k, v = (jnp.pad(x, pad + [(0, 0), (0, 0)]).transpose(0, 2, 1, 3) for x in (q, k, v))
  kernel = _splash_kernel(padded, heads, window, interpret)
  if q_segments is None:
    y = jax.vmap(kernel)(q, k, v)
  else:
    # Padded rows get their own id so that they read themselves: no row is empty.
    ids = [jnp.pad(x, pad, constant_values=-1) for x in (q_segments, kv_segments)]
    segment_ids = splash_attention.SegmentIds(q=ids[0], kv=ids[1])
    y = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v, segment_ids)
  return y.transpose(0, 2, 1, 3)[:, :seq_len]


def _attend_library(
    q: Float[Array, "b t h f"],
    k: Float[Array, "b s h f"],
    v: Float[Array, "b s h f"],
    q_segments: Int[Array, "b t"] | None,
    kv_segments: Int[Array, "b s"] | None,
    window: bands.IntLike | None,
    implementation: str,
) -> Float[Array, "b t h f"]:
  """Causal attention with `jax.nn.dot_product_attention` ("xla" or "cudnn").

  A traced window (only with "xla") becomes part of the mask; a static one is the library's.
  """
  mask = None
  if q_segments is not None:
    mask = (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]
  static_window = window is None or isinstance(window, int)
  if not static_window:
    time = jnp.arange(q.shape[1], dtype=jnp.int32)
    in_window = (time[:, None] - time[None, :] <= window)[None, None]
    mask = in_window if mask is None else mask & in_window
  return jax.nn.dot_product_attention(
      q,
      k,
      v,
      mask=mask,
      scale=1.0,
      is_causal=True,
      local_window_size=(window, 0) if static_window and window is not None else None,
      implementation=implementation,
  )


def retrieve_shift(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h e"],
    *,
    lo: bands.IntLike,
    hi: int | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    block_size: int | None = None,
    backend: str | None = None,
    implementation: str | None = None,
) -> Float[Array, "b t h e"]:
  """y[b, t, h] = sum_{s in S(t)} softmax_s(q[b, t, h] . k[b, s, h]) v[b, s, h] by attention.

  Inputs are assumed validated by `kernels_pallas.retrieve`. `lo` may be traced (one compilation
  for every value). Reverse-mode differentiable in q, k, v.

  Args:
    q: query keys, already scaled by their bandwidth.
    k: stored keys.
    v: stored values.
    lo: smallest delay t - s, >= 1.
    hi: largest delay t - s, or None for unbounded.
    segment_ids: document id of every position, or None for one document per row.
    block_size: ignored (the libraries pick their own tiles).
    backend: the backend compiled for (None: JAX's default backend); splash is compiled for
      "tpu" and interpreted for any other.
    implementation: "splash", "cudnn" or "xla"; None picks `default_implementation`. A traced
      lo with a finite hi needs "xla".

  Returns:
    y in the dtype of the inputs.
  """
  del block_size  # The library kernels tile time themselves.
  seq_len, value_dim = q.shape[1], v.shape[-1]
  dim = max(q.shape[-1], value_dim)
  static_window = hi is None or isinstance(lo, int)
  if implementation is None:
    implementation = default_implementation(
        q.dtype, dim, segment_ids is not None, static_window, backend
    )
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; valid: {IMPLEMENTATIONS}")
  if not static_window and implementation != "xla":
    raise ValueError(
        f"a traced lo with a finite hi needs implementation 'xla', not {implementation!r}"
    )
  if implementation == "cudnn":
    dim = _round_up(dim, CUDNN_DIM_MULTIPLE)
  q, k, v = (_pad_last(x, dim) for x in (q, k, v))

  # Query t' = t - lo sits where the query t was; the last lo slots get the first lo queries.
  shifted_q = jnp.roll(q, -lo, axis=1)
  q_segments = None if segment_ids is None else jnp.roll(segment_ids, -lo, axis=1)
  # Traced when lo is (only with "xla").
  window = None if hi is None else hi - lo
  if implementation == "splash":
    interpret = (backend or jax.default_backend()) != "tpu"
    y = _attend_splash(shifted_q, k, v, q_segments, segment_ids, window, interpret)
  else:
    y = _attend_library(shifted_q, k, v, q_segments, segment_ids, window, implementation)
  y = jnp.roll(y[..., :value_dim], lo, axis=1)
  # Rows with an empty band (t < lo, document starts) hold the wrapped-around or all-masked rows.
  visible = bands.visible_counts(segment_ids, seq_len, lo, hi) > 0
  return jnp.where(visible[:, :, None, None], y, jnp.zeros((), y.dtype))
