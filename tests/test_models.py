"""Models: causality, document isolation, the v2 memory equations against a numpy reference, v2's
gated keys with gates past float32, the long-term switch-off, remat, bfloat16, dropout and input
errors."""

from __future__ import annotations

import dataclasses
import functools
import typing

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kernels_pallas
from mosaics_jax import build_model, config as config_lib, overrides
from mosaics_jax.model import families, features, memories
from mosaics_jax.train import data

TINY = dict(vocab_size=50, num_layers=2, width=32, num_heads=4)
CONFIGS = {
    "mm1": config_lib.MosaicV1Config(**TINY, block_size=64, pmem_size=16),
    "mm2": config_lib.MosaicV2Config(
        **TINY, ffn_width=48, short_term_window=6, long_term_delay=3, long_term_delay_range=(2, 5)
    ),
    "llama": config_lib.LlamaConfig(**TINY, ffn_width=48),
    "gpt2": config_lib.GPT2Config(**TINY, block_size=64),
}
T = 23  # Not a multiple of anything.


def _tokens(seed: int, batch: int = 2, length: int = T) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY["vocab_size"])


class _Jitted:
  """A model whose init and apply are jitted: eager dispatch would dominate the test time."""

  def __init__(self, cfg):
    self.module = build_model(cfg)
    self.init = jax.jit(self.module.init)
    self.apply = jax.jit(self.module.apply, static_argnames=("deterministic",))


def _init(cfg):
  model = _Jitted(cfg)
  return model, model.init(jax.random.key(0), _tokens(0))["params"]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
  cfg = CONFIGS[request.param]
  model, params = _init(cfg)
  return cfg, model, params


def test_causal(family):
  """Changing tokens after position t never changes the logits at positions <= t."""
  cfg, model, params = family
  tokens = _tokens(1)
  base = model.apply({"params": params}, tokens)
  for t in (0, 5, 11, T - 2):
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % cfg.vocab_size)
    out = model.apply({"params": params}, changed)
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_packed_documents_equal_separate_runs(family):
  """A packed document gives the logits it gives alone: nothing crosses a boundary."""
  cfg, model, params = family
  lengths = (9, 1, 13)
  tokens = _tokens(2, batch=1)
  segment_ids = jnp.asarray(np.repeat(np.arange(3), lengths)[None] + 10, jnp.int32)
  packed = model.apply({"params": params}, tokens, segment_ids)
  start = 0
  for n in lengths:
    alone = model.apply({"params": params}, tokens[:, start : start + n])
    np.testing.assert_allclose(packed[:, start : start + n], alone, atol=2e-5, rtol=1e-5)
    start += n


LIBRARY = config_lib.MosaicV1LibraryConfig(
    **TINY, block_size=64, pmem_size=16, ic_dropout=0.0, hd_dropout=0.0
)


# The cheapest family by default; the others (about 15 s each) with the slow tests.
@pytest.mark.parametrize(
    "name",
    [
        "llama",
        pytest.param("mm1", marks=pytest.mark.slow),
        pytest.param("mm2", marks=pytest.mark.slow),
        pytest.param("gpt2", marks=pytest.mark.slow),
        pytest.param("mm1-library", marks=pytest.mark.slow),
    ],
)
def test_remat_gives_same_logits_and_gradients(name):
  """Every remat policy computes the logits and gradients of the model without remat."""
  cfg = CONFIGS.get(name) or LIBRARY
  _, params = _init(cfg)
  tokens = _tokens(3)

  def logits_and_grads(policy):
    model = build_model(dataclasses.replace(cfg, remat_policy=policy))
    loss = lambda p: (lambda y: (y.mean(), y))(model.apply({"params": p}, tokens))
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads

  logits, grads = logits_and_grads("none")
  for policy in typing.get_args(config_lib.RematPolicy)[1:]:
    remat_logits, remat_grads = logits_and_grads(policy)
    np.testing.assert_allclose(remat_logits, logits, atol=1e-6, rtol=1e-5, err_msg=policy)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=policy)


def _dots(jaxpr: jax.extend.core.Jaxpr) -> int:
  """The matmuls (dot_general) of a jaxpr and its sub-jaxprs, a loop's body counted once."""
  return sum(
      (eqn.primitive.name == "dot_general")
      + sum(_dots(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
      for eqn in jaxpr.eqns
  )


@pytest.mark.parametrize(
    "name, length",
    # Single-block retrievals (llama at 23), blocked ones (llama at 300; mm2's short-term band,
    # with the long-term one single-block), the v1 persistent memory beside them (mm1).
    [
        ("llama", T),
        ("mm2", T),
        pytest.param("llama", 300, marks=pytest.mark.slow),
        pytest.param("mm1", T, marks=pytest.mark.slow),
    ],
)
def test_retrieval_policies_do_not_recompute_the_retrieval_forward(name, length):
  """The backward of "full" runs every retrieval's forward again, that of "save_retrieval" none:
  their gradients differ by the matmuls of one retrieval forward per band (and v1 persistent
  memory) and layer; so do those of "save_dots" and "save_dots_and_retrieval"."""
  cfg = CONFIGS[name]
  tokens = _tokens(3, length=length)
  x = jnp.ones((2, length, cfg.num_heads, cfg.head_dim))
  forward = lambda f, *args: _dots(jax.make_jaxpr(f)(*args).jaxpr)
  per_layer = sum(
      forward(functools.partial(kernels_pallas.retrieve, lo=band.lo, hi=band.hi), x, x, x)
      for band in families.of(cfg).bands(cfg).values()
  )
  if name == "mm1":
    pairs = jnp.ones((1, cfg.num_heads, cfg.pmem_size, cfg.head_dim))
    per_layer += forward(kernels_pallas.retrieve_persistent, x, pairs, pairs)
  dots = {}
  for policy in ("full", "save_retrieval", "save_dots", "save_dots_and_retrieval"):
    model = build_model(dataclasses.replace(cfg, remat_policy=policy))
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    loss = lambda p, model=model: model.apply({"params": p}, tokens).mean()
    dots[policy] = _dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  assert per_layer >= 2
  assert dots["full"] - dots["save_retrieval"] == cfg.num_layers * per_layer
  assert dots["save_dots"] - dots["save_dots_and_retrieval"] == cfg.num_layers * per_layer


def test_remat_true_is_an_alias_of_full():
  cfg = CONFIGS["llama"]
  assert dataclasses.replace(cfg, remat=True).effective_remat_policy == "full"
  assert dataclasses.replace(cfg, remat=True, remat_policy="full").effective_remat_policy == "full"
  assert dataclasses.replace(cfg, remat_policy="save_dots").effective_remat_policy == "save_dots"
  with pytest.raises(config_lib.ConfigError, match="remat=true .* conflicts with remat_policy"):
    dataclasses.replace(cfg, remat=True, remat_policy="save_retrieval")


@pytest.mark.slow
def test_every_remat_policy_trains_quickstart_as_none():
  """20 steps of the quickstart experiment on its own data: every policy's losses are those of
  the run without remat."""
  from mosaics_jax import registry
  from mosaics_jax.train import optim, step as step_lib

  exp = registry.get("quickstart")
  stream = data.make_iterator(exp.data, split="train", batch_size=exp.train.batch_size, seed=0)
  batches = [next(stream) for _ in range(20)]
  runs = {}
  for policy in typing.get_args(config_lib.RematPolicy):
    e = overrides.override(exp, "model.remat_policy", policy)
    model = build_model(e.model)
    tx = optim.make_optimizer(e.train)
    state = step_lib.init_state(e, model, tx)
    step = step_lib.make_train_step(e, model, tx)
    runs[policy] = []
    for batch in batches:
      state, stats = step(state, batch)
      runs[policy].append(float(stats["loss"]))
  assert runs["none"][-1] < runs["none"][0] - 0.5, runs["none"]  # It learns.
  for policy, losses in runs.items():
    np.testing.assert_allclose(losses, runs["none"], atol=1e-5, rtol=0, err_msg=policy)


def test_bfloat16_compute_stays_close(family):
  cfg, model, params = family
  bf16 = _Jitted(dataclasses.replace(cfg, dtype="bfloat16"))
  tokens = _tokens(4)
  ref = model.apply({"params": params}, tokens)
  out = bf16.apply({"params": params}, tokens)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max()) + 0.05


def test_dropout_only_when_not_deterministic(family):
  cfg, _, params = family
  model = _Jitted(dataclasses.replace(cfg, dropout=0.5))
  tokens = _tokens(5)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, tokens, deterministic=True)
  np.testing.assert_array_equal(a, b)
  c = model.apply(
      {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)}
  )
  assert not np.allclose(a, c)


# The RegBench runs' families by default (test_causal covers every family's premise).
@pytest.mark.parametrize(
    "name",
    [
        "gpt2",
        "mm1-library",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("llama", "mm1", "mm2")),
    ],
)
def test_batches_cut_after_their_targets_give_the_same_loss_and_gradients(name):
  """`data.trim_batch`'s premise: padding after every counted target changes neither the loss nor
  its gradients, so a batch cut there trains as the whole one."""
  cfg = CONFIGS.get(name) or config_lib.MosaicV1LibraryConfig(**TINY, block_size=64, pmem_size=16)
  model, params = _init(cfg)
  tokens = _tokens(7, batch=3, length=40)
  lengths = np.array([[17], [9], [21]])  # Counted targets per row: at most 21 of 40.
  mask = (np.arange(40) < lengths).astype(np.float32)
  batch = {
      "tokens": tokens,
      "targets": jnp.roll(tokens, -1, axis=1),
      "segment_ids": jnp.zeros_like(tokens),
      "loss_mask": mask,
      "answer_mask": np.zeros_like(mask),
  }

  def loss(params, batch):
    logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["loss_mask"])

  cut = data.trim_batch(jax.device_get(batch), multiple=8)
  assert cut["tokens"].shape == (3, 24)
  grad_fn = jax.jit(jax.value_and_grad(loss))
  whole, whole_grads = grad_fn(params, batch)
  trimmed, trimmed_grads = grad_fn(params, cut)
  np.testing.assert_allclose(trimmed, whole, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(trimmed_grads), jax.tree.leaves(whole_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradients_are_finite_with_empty_rows(family):
  """Position 0 (and the first m positions for the long-term memory) read nothing."""
  _, model, params = family
  tokens = _tokens(6, length=4)
  grads = jax.grad(lambda p: model.apply({"params": p}, tokens).sum())(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_bad_inputs_are_named(family):
  _, model, params = family
  model = model.module  # Shape errors are raised while tracing.
  with pytest.raises(ValueError, match="integer array"):
    model.apply({"params": params}, jnp.zeros((2, 5), jnp.float32))
  with pytest.raises(ValueError, match="integer array"):
    model.apply({"params": params}, jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids"):
    model.apply({"params": params}, _tokens(0), jnp.zeros((2, 3), jnp.int32))


def test_v1_refuses_sequences_longer_than_block_size():
  cfg = CONFIGS["mm1"]
  model, params = _init(cfg)
  with pytest.raises(ValueError, match="block_size 64"):
    model.apply({"params": params}, _tokens(0, length=65))


def test_config_errors_are_clear():
  with pytest.raises(config_lib.ConfigError, match="not divisible by num_heads"):
    config_lib.LlamaConfig(vocab_size=10, num_layers=1, width=30, num_heads=4, ffn_width=8)
  with pytest.raises(config_lib.ConfigError, match="long_term_delay_range"):
    dataclasses.replace(CONFIGS["mm2"], long_term_delay_range=(5, 2))
  with pytest.raises(config_lib.ConfigError, match="needs long_term_memory"):
    dataclasses.replace(CONFIGS["mm2"], long_term_memory=False, drop_long_term_memory=True)


# --- Memory Mosaics v2 ------------------------------------------------------------------------


def _np_v2_memory(p, x, lo, hi, cfg):
  """The v2 equations (design.md), one position at a time in float64: AssociativeMemory's oracle."""
  x = np.asarray(x, np.float64)[0]  # [t m]
  n_t, width = x.shape
  h, d = cfg.num_heads, cfg.head_dim
  k_raw = (x @ np.asarray(p["key"]["W_phi"]["kernel"], np.float64)).reshape(n_t, h, d)
  g = np.exp(x @ np.asarray(p["key"]["w_g"]["kernel"], np.float64))
  lam = np.exp(-np.abs(x @ np.asarray(p["key"]["w_lambda"]["kernel"], np.float64)))
  kbar = np.zeros((n_t, h, d))
  for t in range(n_t):
    kbar[t] = g[t, :, None] * k_raw[t] + (lam[t, :, None] * kbar[t - 1] if t else 0)
  norm = lambda z: z / (np.linalg.norm(z, axis=-1, keepdims=True) + cfg.feature_eps)
  k = norm(kbar)
  v_raw = (x @ np.asarray(p["value"]["W_psi"]["kernel"], np.float64)).reshape(n_t, h, d)
  v_next = np.concatenate([v_raw[1:], np.zeros_like(v_raw[:1])])
  gamma = np.asarray(p["value"]["gamma"], np.float64)[:, None]
  alpha = np.exp(np.minimum(np.abs(np.asarray(p["value"]["theta"], np.float64)), 15))[:, None]
  v = alpha * norm(gamma * v_raw + (1 - gamma) * v_next)
  th = {k_: np.asarray(p["bandwidth"][k_], np.float64) for k_ in ("theta0", "theta1", "theta_a")}
  beta0, beta1 = np.exp(np.minimum(th["theta0"], 10)), np.exp(np.minimum(th["theta1"], 10))
  a = np.minimum(np.abs(th["theta_a"]), 1)
  y = np.zeros((n_t, h, d))
  for t in range(n_t):
    visible = [s for s in range(n_t) if lo <= t - s and (hi is None or t - s <= hi)]
    if not visible:
      continue
    beta = beta1 * len(visible) ** a + beta0
    for head in range(h):
      scores = np.array([beta[head] * k[t, head] @ k[s, head] for s in visible])
      w = np.exp(scores - scores.max())
      y[t, head] = (w / w.sum()) @ v[visible, head]
  return y


@pytest.mark.parametrize("lo, hi", [(1, 5), (3, None), (1, None)])
def test_v2_memory_matches_the_equations(lo, hi):
  """AssociativeMemory = gated keys (Eq. 8), conv values (Eq. 9), adaptive beta (Eq. 6), band."""
  cfg = dataclasses.replace(CONFIGS["mm2"], bandwidth_init=(0.3, -0.2, 0.6))
  mem = memories.AssociativeMemory(cfg, layer_index=1, hi=hi)
  x = jax.random.normal(jax.random.key(7), (1, 17, cfg.width))
  params = mem.init(jax.random.key(8), x, None, lo)["params"]
  # Make the value scale and the gates non-trivial so every term is exercised.
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.3 if path[-1].key in ("theta", "gamma") else v, params
  )
  out = mem.apply({"params": params}, x, None, lo)
  np.testing.assert_allclose(out[0], _np_v2_memory(params, x, lo, hi, cfg), atol=2e-5, rtol=1e-4)


def _gated_keys_closed_form(x, kernels, heads, eps):
  """Eq. 8's keys in float64 from the closed form of the recurrence in log space, finite however
  large the gates: kbar_t = sum_{s <= t} exp(L_ts) k~_s, L_ts = w_g . x_s - sum_{s < r <= t}
  |w_lambda . x_r|, and Norm(kbar_t) = u_t / (||u_t|| + eps exp(-M_t)), u_t = exp(-M_t) kbar_t,
  M_t = max_s L_ts."""
  x = np.asarray(x, np.float64)
  batch, t, _ = x.shape
  k_raw = (x @ np.asarray(kernels["W_phi"], np.float64)).reshape(batch, t, heads, -1)
  gate = x @ np.asarray(kernels["w_g"], np.float64)
  log_decay = -np.abs(x @ np.asarray(kernels["w_lambda"], np.float64))
  keys = np.zeros_like(k_raw)
  for i in range(t):
    sizes = np.stack([gate[:, s] + log_decay[:, s + 1 : i + 1].sum(1) for s in range(i + 1)], 1)
    top = sizes.max(axis=1)
    u = np.einsum("bsh,bshd->bhd", np.exp(sizes - top[:, None]), k_raw[:, : i + 1])
    with np.errstate(over="ignore"):  # exp(-M) is inf where kbar underflows: k is then 0.
      keys[:, i] = u / (np.linalg.norm(u, axis=-1, keepdims=True) + eps * np.exp(-top)[..., None])
  return keys


def _gated_keys_as_before(x, kernels, heads, eps, dtype):
  """The keys as the gated recurrence computed them before gates were rescaled, in float32."""
  k_raw = (x.astype(dtype) @ kernels["W_phi"].astype(dtype)).astype(jnp.float32)
  kbar = kernels_pallas.linear_scan(
      jnp.exp(-jnp.abs(x @ kernels["w_lambda"])),
      jnp.exp(x @ kernels["w_g"])[..., None] * k_raw.reshape(*x.shape[:2], heads, -1),
  )
  return kbar / (jnp.linalg.norm(kbar, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_v2_gated_keys_with_gates_past_float32(dtype):
  """Gate pre-activations of +-9984 (exp overflows float32 past 88, and the keys were NaN): the keys
  and their gradients are finite, equal to the closed form in float64, and where the gates are
  moderate (up to 22: kbar within float32) equal to the formula before, values and gradients."""
  heads, width, t, eps = 2, 8, 12, 1e-6
  rng = np.random.default_rng(0)
  # On grids that float32 multiplies and sums exactly: both paths see the same gates.
  grid = lambda scale, size, step: np.round(rng.normal(size=size) * scale / step) * step
  x = np.clip(grid(1.0, (2, t, width), 1 / 8), -3, 3)
  x[0, :, 0] = 0.0  # Row 0: moderate gates; row 1: +-9984 where x[..., 0] = +-1.
  x[1, :, 0] = rng.choice([-1.0, 0.0, 1.0], size=t)
  kernels = {
      "W_phi": grid(0.5, (width, width), 1 / 16),
      "w_g": grid(8.0, (width, heads), 1 / 16),
      "w_lambda": grid(0.5, (width, heads), 1 / 16),
  }
  kernels["w_g"][0] = [9984.0, -9984.0]
  kernels["w_lambda"][0] = [0.0, 9984.0]  # Head 1 also forgets everything at once.
  kernels = {name: jnp.asarray(w, jnp.float32) for name, w in kernels.items()}
  x = jnp.asarray(x, jnp.float32)
  module = features.GatedKeyExtractor(
      num_heads=heads,
      layer_index=0,
      gate_bias=False,
      eps=eps,
      scan_impl="chunked",
      scan_chunk_size=4,
      dtype=dtype,
  )
  cotangent = jnp.asarray(rng.normal(size=(2, t, heads, width // heads)), jnp.float32)

  def loss(kernels, x):
    params = {name: {"kernel": w} for name, w in kernels.items()}
    keys, *_ = module.apply({"params": params}, x, None)
    return jnp.sum(keys * cotangent), keys

  def loss_before(kernels, x):
    keys = _gated_keys_as_before(x, kernels, heads, eps, dtype)
    return jnp.sum(keys * cotangent), keys

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (_, keys), (d_kernels, dx) = grad(loss)(kernels, x)
  (_, keys_before), (_, dx_before) = grad(loss_before)(kernels, x)
  gates = np.asarray(x @ kernels["w_g"])
  assert gates[0].max() > 20 and np.abs(gates[1]).max() > 9000  # Row 0 rescales too.
  assert np.isnan(keys_before[1]).any()
  for z in (keys, dx, *jax.tree.leaves(d_kernels)):
    assert np.isfinite(np.asarray(z)).all()
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  expected = _gated_keys_closed_form(x, kernels, heads, eps)
  np.testing.assert_allclose(keys, expected, rtol=0, atol=tol)
  np.testing.assert_allclose(keys[0], keys_before[0], rtol=0, atol=tol)
  scale = np.abs(np.asarray(dx_before[0])).max()
  np.testing.assert_allclose(dx[0], dx_before[0], rtol=0, atol=10 * tol * scale)


def test_v2_long_term_delay_can_be_traced_without_recompiling():
  cfg = CONFIGS["mm2"]
  model, params = _init(cfg)
  traces = []

  @jax.jit
  def logits(params, m):
    traces.append(m)
    return model.module.apply({"params": params}, _tokens(1), ltm_delay=m)

  outs = [logits(params, jnp.int32(m)) for m in (2, 3, 5)]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[2])
  np.testing.assert_allclose(
      outs[1], model.apply({"params": params}, _tokens(1), ltm_delay=3), atol=1e-5
  )


@pytest.mark.slow
def test_v2_dropping_long_term_memory_zeroes_its_output():
  """The Table 2 switch keeps the parameters and equals zeroing the long-term half of W_o."""
  cfg = CONFIGS["mm2"]
  model, params = _init(cfg)
  dropped = _Jitted(dataclasses.replace(cfg, drop_long_term_memory=True))
  tokens = _tokens(9)
  assert jax.tree.structure(dropped.init(jax.random.key(0), tokens)) == jax.tree.structure(
      {"params": params}
  )
  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, v: v.at[cfg.width :].set(0) if "w_o" in str(path) else v, params
  )
  np.testing.assert_allclose(
      dropped.apply({"params": params}, tokens),
      model.apply({"params": zeroed}, tokens),
      atol=1e-6,
  )
  assert not np.allclose(
      dropped.apply({"params": params}, tokens), model.apply({"params": params}, tokens)
  )


def test_v2_without_long_term_memory_has_no_long_term_parameters():
  cfg = dataclasses.replace(CONFIGS["mm2"], long_term_memory=False)
  _, params = _init(cfg)
  assert "long_term" not in params["layer_0"]
  assert params["layer_0"]["w_o"]["kernel"].shape == (cfg.width, cfg.width)
  assert params["layer_0"]["short_term"]["key"]["W_phi"]["kernel"].shape == (cfg.width, cfg.width)


def test_v2_initialisation_follows_table_6():
  cfg = config_lib.MosaicV2Config(
      vocab_size=64, num_layers=3, width=256, num_heads=4, ffn_width=512
  )
  _, params = _init(cfg)
  for layer in (0, 2):
    p = params[f"layer_{layer}"]
    for w, fan_in in (
        (p["short_term"]["key"]["W_phi"]["kernel"], cfg.width),
        (p["long_term"]["value"]["W_psi"]["kernel"], cfg.width),
        (p["w_o"]["kernel"], cfg.width),
        (p["ffn"]["w1"]["kernel"], cfg.width),
        (p["ffn"]["w2"]["kernel"], cfg.ffn_width),
    ):
      sigma = 1 / np.sqrt(2 * fan_in * (layer + 1))
      assert float(jnp.abs(w).max()) <= 3 * sigma
      # A normal truncated at 3 sigma has standard deviation 0.9866 sigma.
      assert abs(float(w.std()) / (0.9866 * sigma) - 1) < 0.05
    bw = p["short_term"]["bandwidth"]
    np.testing.assert_allclose(bw["theta0"], 1.5)
    np.testing.assert_allclose(bw["theta_a"], 1 / 3, rtol=1e-6)
    gamma = p["long_term"]["value"]["gamma"]
    assert bool(((gamma >= 0) & (gamma < 1)).all())
  sigma = 1 / np.sqrt(2 * cfg.width)
  assert abs(float(params["embed"]["embedding"].std()) / (0.9866 * sigma) - 1) < 0.05


# --- Memory Mosaics v1 ------------------------------------------------------------------------


def _np_v1_keys(p, x, cfg, scale_pow):
  """nanoMosaics KeyFeatureExtractor with its dense T x T leaky-average matrix, float64."""
  x = np.asarray(x, np.float64)
  n_t = x.shape[1]
  k = x @ np.asarray(p["W_k"]["kernel"], np.float64) + np.asarray(p["W_k"]["bias"], np.float64)
  k = k.reshape(*x.shape[:2], cfg.num_heads, cfg.head_dim)
  lam = np.exp(-np.abs(np.asarray(p["leaky_avg"]["leaky_key_beta"], np.float64)) * 10)
  lag = np.arange(n_t)[:, None] - np.arange(n_t)[None, :]
  coef = np.where(lag >= 0, lam[:, None, None] ** np.maximum(lag, 0), 0)  # [h t s]
  k = np.einsum("hts,bshd->bthd", coef, k)
  k = k / (np.linalg.norm(k, axis=-1, keepdims=True) + 1e-10)
  scale = np.minimum(scale_pow * 10 * np.asarray(p["key_scale"], np.float64), np.log(65535))
  return k * np.exp(scale)[:, None]


def test_v1_memories_match_nanomosaics_equations():
  cfg = CONFIGS["mm1"]
  x = jax.random.normal(jax.random.key(3), (2, 19, cfg.width))
  ctx = memories.ContextMemory(cfg, hi=None)
  params = ctx.init(jax.random.key(4), x, None, 1)["params"]
  out = np.asarray(ctx.apply({"params": params}, x, None, 1), np.float64)

  k = _np_v1_keys(params["k_featurizer"], x, cfg, 1)
  pv = params["v_featurizer"]
  v = np.asarray(x, np.float64) @ np.asarray(pv["W_v"]["kernel"]) + np.asarray(pv["W_v"]["bias"])
  v = v.reshape(k.shape)
  c = np.asarray(pv["coef"], np.float64)[:, None]
  v = c * v + (1 - c) * np.concatenate([v[:, 1:], np.zeros_like(v[:, :1])], axis=1)
  v = (
      v
      / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-10)
      * np.exp(10 * np.asarray(pv["val_scale"], np.float64))[:, None]
  )
  scores = np.einsum("bthd,bshd->bhts", k, k)
  n_t = x.shape[1]
  scores = np.where(np.tril(np.ones((n_t, n_t)), -1) > 0, scores, -np.inf)
  y = np.zeros_like(v)
  w = np.exp(scores[:, :, 1:] - scores[:, :, 1:].max(-1, keepdims=True))
  y[:, 1:] = np.einsum("bhts,bshd->bthd", w / w.sum(-1, keepdims=True), v)
  y = y.reshape(*y.shape[:2], -1) @ np.asarray(params["c_proj"]["kernel"]) + np.asarray(
      params["c_proj"]["bias"]
  )
  np.testing.assert_allclose(out, y, atol=2e-5, rtol=1e-4)

  pmem_cfg = dataclasses.replace(cfg, pmem_count=2)
  pmem = memories.PersistentMemoryV1(pmem_cfg)
  params = pmem.init(jax.random.key(5), x, None)["params"]
  out = np.asarray(pmem.apply({"params": params}, x, None), np.float64)
  k = _np_v1_keys(params["k_featurizer"], x, pmem_cfg, 2)
  y = 0
  for i in range(2):
    s = np.einsum("bthd,hpd->bthp", k, np.asarray(params["P_k"][i], np.float64))
    w = np.exp(s - s.max(-1, keepdims=True))
    y = y + np.einsum("bthp,hpd->bthd", w / w.sum(-1, keepdims=True), np.asarray(params["P_v"][i]))
  y = y / 2 * np.exp(10 * np.asarray(params["out_scale"], np.float64))[:, None]
  y = y.reshape(*y.shape[:2], -1) @ np.asarray(params["c_proj"]["kernel"]) + np.asarray(
      params["c_proj"]["bias"]
  )
  np.testing.assert_allclose(out, y, atol=2e-5, rtol=1e-4)


def test_v1_initialisation_matches_nanomosaics():
  cfg = config_lib.MosaicV1Config(
      vocab_size=64, num_layers=4, width=256, num_heads=8, block_size=32, pmem_size=64
  )
  _, params = _init(cfg)
  attn = params["h_1"]["attn"]
  np.testing.assert_allclose(
      attn["k_featurizer"]["leaky_avg"]["leaky_key_beta"], np.linspace(0.5, 5, 8) / 10, rtol=1e-6
  )
  np.testing.assert_allclose(attn["k_featurizer"]["key_scale"], 0.1)
  np.testing.assert_allclose(attn["v_featurizer"]["val_scale"], -0.05)
  np.testing.assert_allclose(params["h_1"]["mlp"]["out_scale"], -0.05)
  assert abs(float(attn["k_featurizer"]["W_k"]["kernel"].std()) / 0.02 - 1) < 0.05
  assert abs(float(attn["c_proj"]["kernel"].std()) / (0.02 / np.sqrt(8)) - 1) < 0.05
  p_k = params["h_1"]["mlp"]["P_k"]
  assert p_k.shape == (1, 8, 64, 32)
  assert abs(float(p_k.std()) * np.sqrt(32) - 1) < 0.05
  assert "lm_head" not in params  # Tied to wte.


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mm1-tiny", "mm2-tiny", "llama-tiny"])
def test_training_with_pallas_kernels_matches_xla(name):
  """Two optimizer steps with the retrieval op as Pallas kernels (interpreted off GPU and TPU)
  give the losses and parameters of the XLA path."""
  from mosaics_jax import registry
  from mosaics_jax.analysis.bench_train import synthetic_batch
  from mosaics_jax.train import optim, step as step_lib

  exp = registry.get(name)
  exp = overrides.override(exp, "data.seq_len", 40)
  exp = overrides.override(exp, "train.batch_size", 2)
  rng = np.random.default_rng(0)
  batches = [synthetic_batch(exp, rng) for _ in range(2)]
  for batch in batches:  # Two documents per row, so document masks are exercised too.
    batch["segment_ids"][:, 20:] = 1
  runs = []
  for impl in ("xla", "pallas"):
    e = overrides.override(exp, "model.retrieve_impl", impl)
    model = build_model(e.model)
    tx = optim.make_optimizer(e.train)
    state = step_lib.init_state(e, model, tx)
    step = jax.jit(step_lib.make_train_step(e, model, tx))
    losses = []
    for batch in batches:
      state, stats = step(state, batch)
      losses.append(float(stats["loss"]))
    runs.append((losses, state["params"]))
  (xla_losses, xla_params), (pallas_losses, pallas_params) = runs
  np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5)
  # Adam divides each gradient by its own running size: a rounding-level difference in a tiny
  # gradient moves its parameter by up to a few 1e-5 (lr 1e-3) over two steps.
  for a, b in zip(jax.tree.leaves(pallas_params), jax.tree.leaves(xla_params)):
    np.testing.assert_allclose(a, b, atol=1e-4)
