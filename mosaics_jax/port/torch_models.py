"""PyTorch implementations of the families, for weights exported by `mosaics_jax.port`.

Written from the equations of docs/design.md, for inference in float32 (no dropout, no caches).
They give the JAX models' logits to float rounding on the same weights:

- `MemoryMosaic`: Memory Mosaics v1 with nanoMosaics' module and tensor names and shapes
  (`mosaic.wte`, `mosaic.h.{i}.attn`, `lm_head`, per-head scalars [1, H, 1, 1], the causal-mask and
  leaky-average buffers), so that a `to-torch --format nanomosaics` file loads with
  `load_state_dict(strict=True)`, here and into the official `MemoryMosaic`.
- `MosaicV1Library`: Memory Mosaics v1 as the official Library's `StackAssoMem`, under its names
  (`emb`, `blocks.{i}.attn`, `blocks.{i}.pmem.pmem.M_k0`, `head`), so that a `to-torch --format
  library` state dict loads with `load_state_dict(strict=True)`, here and into `StackAssoMem`.
- `MosaicV2` and `Llama`: module names mirror the Flax ones, so the state dict is exactly the
  tensors of `mosaics-port to-safetensors` (names in `mosaics_jax.port.layout`).
- `GPT2`: nanoGPT's module and tensor names (`transformer.wte`, `transformer.h.{i}.attn.c_attn`,
  the tied `lm_head`), so that its state dict loads into nanoGPT's `GPT` with
  `load_state_dict(strict=True)`.

    model = torch_models.from_directory("exported/")   # config.json + model.safetensors
    logits = model(torch.as_tensor(tokens))             # [batch, seq, vocab]

The modules read their config's fields as attributes, of any object (`Config`), and this module
imports nothing of mosaics_jax (but in `from_directory`): Hugging Face exports (`hf_remote`) carry a
copy of it as their modeling code.

Every forward takes int64 `tokens` [batch, seq] and optional `segment_ids` of the same shape
(packed documents: nothing crosses a document boundary; RoPE and GPT-2's positions restart in each
document).

Shapes: b = batch, h = heads, t = query time, s = key time, d = head dim.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

try:
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError as e:  # pragma: no cover - exercised only without torch.
  raise ImportError(
      "mosaics_jax.port.torch_models needs PyTorch: `pip install torch` (a CPU build is enough)"
  ) from e

# A model config: any object with the family's config fields as attributes, `family` and `head_dim`
# among them (a `mosaics_jax.config` dataclass, or an export's Hugging Face `MosaicsConfig`).
Config = Any


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
  """[b, t, h*d] -> [b, h, t, d]; channel c = h * d + j, as in the JAX models."""
  b, t, m = x.shape
  return x.view(b, t, num_heads, m // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
  b, h, t, d = x.shape
  return x.transpose(1, 2).reshape(b, t, h * d)


def _normalize(z: torch.Tensor, eps: float) -> torch.Tensor:
  """Norm(z) = z / (||z|| + eps); 0 at z = 0 when eps is 0 (the Library's Norm0)."""
  denominator = z.norm(dim=-1, keepdim=True) + eps
  return z / torch.where(denominator > 0, denominator, 1.0)


def _same_document(segment_ids: torch.Tensor | None, seq_len: int) -> torch.Tensor:
  """[b or 1, 1, t, s]: True where positions t and s are in the same document."""
  if segment_ids is None:
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool)
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _document_positions(segment_ids: torch.Tensor | None, seq_len: int) -> torch.Tensor:
  """[b or 1, t]: the position of each token inside its document."""
  t = torch.arange(seq_len)[None]
  if segment_ids is None:
    return t
  starts = _document_starts(segment_ids)
  return t - torch.cummax(torch.where(starts, t, 0), dim=1).values


def _document_starts(segment_ids: torch.Tensor) -> torch.Tensor:
  first = torch.ones_like(segment_ids[:, :1], dtype=torch.bool)
  return torch.cat([first, segment_ids[:, 1:] != segment_ids[:, :-1]], dim=1)


def _band(seq_len: int, lo: int, hi: int | None) -> torch.Tensor:
  """[1, 1, t, s]: True where t - hi <= s <= t - lo."""
  delta = torch.arange(seq_len)[:, None] - torch.arange(seq_len)[None, :]
  inside = delta >= lo
  if hi is not None:
    inside &= delta <= hi
  return inside[None, None]


def _retrieve(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor):
  """sum_s softmax_s(q_t . k_s) v_s over the visible s; 0 where nothing is visible."""
  scores = (q @ k.transpose(-1, -2)).masked_fill(~visible, -math.inf)
  weights = torch.softmax(scores, dim=-1)
  weights = torch.where(visible.any(-1, keepdim=True), weights, 0.0)
  return weights @ v


def _next_in_document(v: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
  """v_{t+1} for [b, h, t, d], zero past the sequence and past each document's end."""
  return _shifted(v.transpose(1, 2), 1, segment_ids).transpose(1, 2)


def _shifted(x: torch.Tensor, offset: int, segment_ids: torch.Tensor | None) -> torch.Tensor:
  """x_{t+offset} for [b, t, ...], zero outside the sequence and outside the document of t."""
  t = x.shape[1]
  source = torch.arange(t) + offset
  inside = (source >= 0) & (source < t)
  moved = x[:, source.clamp(0, t - 1)]
  keep = inside[None].expand(x.shape[0], t)
  if segment_ids is not None:
    keep = keep & (segment_ids[:, source.clamp(0, t - 1)] == segment_ids)
  return torch.where(keep.reshape(*keep.shape, *(1,) * (x.ndim - 2)), moved, 0.0)


# Memory Mosaics v1 (nanoMosaics names) ----------------------------------------------------------


def _per_head(num_heads: int) -> nn.Parameter:
  return nn.Parameter(torch.zeros(1, num_heads, 1, 1))


class _LeakyAverage(nn.Module):
  """kbar_t = sum_{s <= t} lambda^(t-s) k_s, lambda = exp(-10 |b|), as one [t, s] matrix."""

  def __init__(self, cfg: Config):
    super().__init__()
    n = cfg.block_size
    # coef[t, s] = s - t on and below the diagonal: the exponent of lambda, negated.
    steps = torch.arange(n, dtype=torch.float32)
    self.register_buffer("coef", torch.tril(steps[None, :] - steps[:, None]))
    self.leaky_key_beta = _per_head(cfg.num_heads)
    self.exp_scaling = cfg.exp_scaling

  def forward(self, k: torch.Tensor, same_doc: torch.Tensor) -> torch.Tensor:
    t = k.shape[2]
    rate = self.leaky_key_beta.abs() * self.exp_scaling
    weights = torch.exp(self.coef[:t, :t] * rate).tril() * same_doc
    return weights @ k


class _KeyFeatures(nn.Module):
  """k_t = Norm(LeakyAverage(W_k x)_t) * exp(min(p * 10 * s_k, log(65535)))."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.W_k = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
    self.leaky_avg = _LeakyAverage(cfg)
    self.key_scale = _per_head(cfg.num_heads)

  def forward(self, x, same_doc, scale_pow: int):
    cfg = self.cfg
    k = self.leaky_avg(_split_heads(self.W_k(x), cfg.num_heads), same_doc)
    log_scale = (scale_pow * cfg.exp_scaling * self.key_scale).clamp(max=cfg.key_scale_max)
    return _normalize(k, cfg.feature_eps) * log_scale.exp()


class _ValueFeatures(nn.Module):
  """v_t = Norm(c v~_t + (1 - c) v~_{t+1}) * exp(10 s_v), v~ = W_v x."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.W_v = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
    self.coef = _per_head(cfg.num_heads)
    self.val_scale = _per_head(cfg.num_heads)

  def forward(self, x, segment_ids):
    cfg = self.cfg
    v = _split_heads(self.W_v(x), cfg.num_heads)
    v = self.coef * v + (1 - self.coef) * _next_in_document(v, segment_ids)
    return _normalize(v, cfg.feature_eps) * (cfg.exp_scaling * self.val_scale).exp()


class _ContextMemory(nn.Module):
  """softmax(k_t . k_s) over s <= t - 1 in the document, then c_proj."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.k_featurizer = _KeyFeatures(cfg)
    self.v_featurizer = _ValueFeatures(cfg)
    self.c_proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
    n = cfg.block_size
    self.register_buffer("bias", torch.ones(n, n, dtype=torch.bool).tril(-1)[None, None])

  def forward(self, x, segment_ids, same_doc):
    t = x.shape[1]
    k = self.k_featurizer(x, same_doc, scale_pow=1)
    v = self.v_featurizer(x, segment_ids)
    y = _retrieve(k, k, v, self.bias[:, :, :t, :t] & same_doc)
    return self.c_proj(_merge_heads(y))


class _PersistentMemory(nn.Module):
  """mean_i softmax(k P_k[i]^T) P_v[i] * exp(10 s_o), then c_proj."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.k_featurizer = _KeyFeatures(cfg)
    shape = (cfg.pmem_count, 1, cfg.num_heads, cfg.pmem_size, cfg.head_dim)
    self.P_k = nn.Parameter(torch.zeros(shape))
    self.P_v = nn.Parameter(torch.zeros(shape))
    self.out_scale = _per_head(cfg.num_heads)
    self.c_proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)

  def forward(self, x, same_doc):
    cfg = self.cfg
    k = self.k_featurizer(x, same_doc, scale_pow=2)
    y = sum(
        torch.softmax(k @ p_k.transpose(-1, -2), dim=-1) @ p_v
        for p_k, p_v in zip(self.P_k, self.P_v)
    )
    y = y / cfg.pmem_count * (cfg.exp_scaling * self.out_scale).exp()
    return self.c_proj(_merge_heads(y))


class _MosaicV1Block(nn.Module):

  def __init__(self, cfg: Config):
    super().__init__()
    norm = lambda: nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, bias=cfg.bias)
    self.ln_1 = norm()
    self.attn = _ContextMemory(cfg)
    self.ln_2 = norm()
    self.mlp = _PersistentMemory(cfg)

  def forward(self, x, segment_ids, same_doc):
    x = x + self.attn(self.ln_1(x), segment_ids, same_doc)
    return x + self.mlp(self.ln_2(x), same_doc)


class MemoryMosaic(nn.Module):
  """Memory Mosaics v1 under nanoMosaics' names; the LM head is tied to `mosaic.wte`."""

  def __init__(self, config: Config):
    super().__init__()
    self.config = config
    self.mosaic = nn.ModuleDict(
        dict(
            wte=nn.Embedding(config.vocab_size, config.width),
            h=nn.ModuleList([_MosaicV1Block(config) for _ in range(config.num_layers)]),
            ln_f=nn.LayerNorm(config.width, eps=config.layer_norm_eps, bias=config.bias),
        )
    )
    self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
    self.lm_head.weight = self.mosaic.wte.weight

  def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None):
    t = tokens.shape[1]
    if t > self.config.block_size:
      raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
    same_doc = _same_document(segment_ids, t)
    x = self.mosaic.wte(tokens)
    for block in self.mosaic.h:
      x = block(x, segment_ids, same_doc)
    return self.lm_head(self.mosaic.ln_f(x))


# Memory Mosaics v1, Library variant (the official `StackAssoMem`'s names) ----------------------


class _LibraryFeatures(nn.Module):
  """Per-head features [b, h, t, d] of x looking `shift` steps ahead (design.md, "v1 as the Library
  computes it"): "linearconv", a convolution over x_{t+shift-k+1} .. x_{t+shift} (`conv`, PyTorch's
  Conv1d weight [out, in, k]); "lowrlinearconv", (1 - c) W x_{t+shift} + c W x_t, c per head."""

  def __init__(self, cfg: Config, fe_type: str, kernel_size: int, shift: int):
    super().__init__()
    self.num_heads, self.shift, self.kernel_size = cfg.num_heads, shift, kernel_size
    self.fe_type = fe_type
    if fe_type == "linearconv":
      self.conv = nn.Conv1d(cfg.width, cfg.width, kernel_size, bias=cfg.bias)
    else:
      self.linear = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
      self.coef = nn.Parameter(torch.zeros(cfg.num_heads))

  def forward(self, x, segment_ids, normalize: bool):
    if self.fe_type == "linearconv":
      # Tap j reads x_{t+j-left}, inside t's document.
      left = self.kernel_size - 1 - self.shift
      y = sum(
          F.linear(_shifted(x, j - left, segment_ids), self.conv.weight[:, :, j])
          for j in range(self.kernel_size)
      )
      if self.conv.bias is not None:
        y = y + self.conv.bias
      y = _split_heads(y, self.num_heads)
    else:
      z = self.linear(x)
      c = self.coef[:, None, None]
      y = c * _split_heads(z, self.num_heads)
      y = y + (1 - c) * _split_heads(_shifted(z, self.shift, segment_ids), self.num_heads)
    return _normalize(y, 0.0) if normalize else y


class _LibraryMemory(nn.Module):
  """What both Library memories share: keys k_t = Norm0((1 - lambda) sum_{s <= t} lambda^(t-s)
  phi(x)_s) * exp(min(10 kernel_beta, 5))^p in the document, lambda = exp(-10 |leaky_key_beta|),
  the value scale exp(10 value_beta) and c_proj."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    for name in ("leaky_key_beta", "kernel_beta", "value_beta"):
      self.register_parameter(name, nn.Parameter(torch.zeros(cfg.num_heads)))
    self.k_featurizer = _LibraryFeatures(cfg, cfg.k_fe_type, cfg.k_kernel_size, 0)
    self.c_proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)

  def keys(self, x, segment_ids, power: int):
    cfg, t = self.cfg, x.shape[1]
    phi = self.k_featurizer(x, segment_ids, normalize=False)
    rate = (self.leaky_key_beta.abs() * cfg.exp_scaling)[:, None, None]
    steps = torch.arange(t, dtype=torch.float32)
    delta = (steps[:, None] - steps[None, :]).clamp(min=0)  # t - s on and below the diagonal.
    weights = (-delta * rate).exp() * (1 - (-rate).exp())
    weights = weights * (_band(t, 0, None) & _same_document(segment_ids, t))
    log_scale = (cfg.exp_scaling * self.kernel_beta).clamp(max=cfg.kernel_beta_max)
    return _normalize(weights @ phi, 0.0) * (log_scale.exp() ** power)[:, None, None]

  def value_scale(self):
    return (self.cfg.exp_scaling * self.value_beta).exp()[:, None, None]


class _LibraryContextMemory(_LibraryMemory):
  """softmax(k_t . k_s) over s <= t - v_shift in the document, values
  Norm0(psi(x)_t) exp(10 value_beta); then c_proj."""

  def __init__(self, cfg: Config):
    super().__init__(cfg)
    self.v_featurizer = _LibraryFeatures(cfg, cfg.v_fe_type, cfg.v_kernel_size, cfg.v_shift)

  def forward(self, x, segment_ids):
    cfg, t = self.cfg, x.shape[1]
    k = self.keys(x, segment_ids, power=1)
    v = self.v_featurizer(x, segment_ids, normalize=True) * self.value_scale()
    y = _retrieve(k, k, v, _band(t, cfg.v_shift, None) & _same_document(segment_ids, t))
    return self.c_proj(_merge_heads(y))


class _LibraryPairs(nn.Module):
  """The persistent pairs M_k{c}, M_v{c} [1, H, pmem_size, d] of each of the pmem_count memories."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.count = cfg.pmem_count
    for c in range(cfg.pmem_count):
      for name in ("M_k", "M_v"):
        shape = (1, cfg.num_heads, cfg.pmem_size, cfg.head_dim)
        self.register_parameter(f"{name}{c}", nn.Parameter(torch.zeros(shape)))

  def forward(self, k):
    pairs = [(getattr(self, f"M_k{c}")[0], getattr(self, f"M_v{c}")[0]) for c in range(self.count)]
    y = sum(torch.softmax(k @ m_k.transpose(-1, -2), dim=-1) @ m_v for m_k, m_v in pairs)
    return y / self.count


class _LibraryPersistentMemory(_LibraryMemory):
  """mean_c softmax(k M_k[c]^T) M_v[c] * exp(10 value_beta), keys of power 2; then c_proj."""

  def __init__(self, cfg: Config):
    super().__init__(cfg)
    self.pmem = _LibraryPairs(cfg)

  def forward(self, x, segment_ids):
    y = self.pmem(self.keys(x, segment_ids, power=2)) * self.value_scale()
    return self.c_proj(_merge_heads(y))


class _LibraryBlock(nn.Module):
  """pre_ln: x += attn(ln1 x); x += pmem(ln2 x). post_ln: x = ln1 x; x += attn(x); x = ln2 x;
  x += pmem(x). attn_only: the contextual memory alone."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.pre_ln = cfg.pre_ln
    norm = lambda: nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, bias=cfg.bias)
    self.ln1 = norm()
    self.attn = _LibraryContextMemory(cfg)
    if not cfg.attn_only:
      self.ln2 = norm()
      self.pmem = _LibraryPersistentMemory(cfg)

  def forward(self, x, segment_ids):
    memories = [(self.ln1, self.attn)]
    if hasattr(self, "pmem"):
      memories.append((self.ln2, self.pmem))
    for norm, memory in memories:
      h = norm(x)
      x = (x if self.pre_ln else h) + memory(h, segment_ids)
    return x


class MosaicV1Library(nn.Module):
  """Memory Mosaics v1 as the Library's `StackAssoMem`, under its names (`emb`, `blocks.{i}`,
  `ln_out`, `head`, tied to `emb` with weight_tying), so that a `to-torch --format library` state
  dict loads with `load_state_dict(strict=True)`. logits = head(ln_out x) / sqrt(width)."""

  def __init__(self, config: Config):
    super().__init__()
    self.config = config
    self.emb = nn.Embedding(config.vocab_size, config.width)
    self.blocks = nn.ModuleList([_LibraryBlock(config) for _ in range(config.num_layers)])
    self.ln_out = nn.LayerNorm(config.width, eps=config.layer_norm_eps, bias=config.bias)
    self.head = nn.Linear(config.width, config.vocab_size, bias=False)
    if config.weight_tying:
      self.head.weight = self.emb.weight

  def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None):
    t = tokens.shape[1]
    if t > self.config.block_size:
      raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
    x = self.emb(tokens)
    for block in self.blocks:
      x = block(x, segment_ids)
    return self.head(self.ln_out(x)) / math.sqrt(self.config.width)


# Memory Mosaics v2 -------------------------------------------------------------------------------


class _SwiGLU(nn.Module):

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.w1 = nn.Linear(width, hidden, bias=False)
    self.w3 = nn.Linear(width, hidden, bias=False)
    self.w2 = nn.Linear(hidden, width, bias=False)

  def forward(self, x):
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _GatedKey(nn.Module):
  """kbar_t = exp(w_g . x_t) W_phi x_t + exp(-|w_lambda . x_t|) kbar_{t-1}; k_t = Norm(kbar_t)."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.W_phi = nn.Linear(cfg.width, cfg.width, bias=False)
    self.w_g = nn.Linear(cfg.width, cfg.num_heads, bias=cfg.gate_bias)
    self.w_lambda = nn.Linear(cfg.width, cfg.num_heads, bias=cfg.gate_bias)

  def forward(self, x, starts):
    k = _split_heads(self.W_phi(x), self.cfg.num_heads)
    gate = self.w_g(x).exp().transpose(1, 2)[..., None]  # [b, h, t, 1]
    decay = (-self.w_lambda(x).abs()).exp().transpose(1, 2)[..., None]
    if starts is not None:
      decay = decay * ~starts[:, None, :, None]
    # A plain loop over time: the reference, not the fast path.
    kbar, out = torch.zeros_like(k[:, :, 0]), []
    for t in range(k.shape[2]):
      kbar = gate[:, :, t] * k[:, :, t] + decay[:, :, t] * kbar
      out.append(kbar)
    return _normalize(torch.stack(out, dim=2), self.cfg.feature_eps)


class _ConvValue(nn.Module):
  """v_t = exp(min(|theta|, max)) Norm(gamma v~_t + (1 - gamma) v~_{t+1}), v~ = W_psi x."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.W_psi = nn.Linear(cfg.width, cfg.width, bias=False)
    self.gamma = nn.Parameter(torch.zeros(cfg.num_heads))
    self.theta = nn.Parameter(torch.zeros(cfg.num_heads))

  def forward(self, x, segment_ids):
    cfg = self.cfg
    v = _split_heads(self.W_psi(x), cfg.num_heads)
    gamma = self.gamma[:, None, None]
    v = gamma * v + (1 - gamma) * _next_in_document(v, segment_ids)
    alpha = self.theta.abs().clamp(max=cfg.value_scale_max).exp()[:, None, None]
    return alpha * _normalize(v, cfg.feature_eps)


class _Bandwidth(nn.Module):
  """beta_t = exp(min(theta1, max)) n_t^min(|theta_a|, 1) + exp(min(theta0, max)), per head."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.max_log = cfg.bandwidth_max
    self.theta0 = nn.Parameter(torch.zeros(cfg.num_heads))
    self.theta1 = nn.Parameter(torch.zeros(cfg.num_heads))
    self.theta_a = nn.Parameter(torch.zeros(cfg.num_heads))

  def forward(self, counts: torch.Tensor) -> torch.Tensor:
    beta0 = self.theta0.clamp(max=self.max_log).exp()[:, None]
    beta1 = self.theta1.clamp(max=self.max_log).exp()[:, None]
    alpha = self.theta_a.abs().clamp(max=1.0)[:, None]
    n = counts.to(torch.float32)[:, None, :]  # [b, 1, t]
    return beta1 * torch.where(n > 0, n, 1.0) ** alpha * (n > 0) + beta0  # [b, h, t]


class _AssociativeMemory(nn.Module):
  """One v2 memory over the band [t - hi, t - lo], queried with beta_t * k_t."""

  def __init__(self, cfg: Config, hi: int | None):
    super().__init__()
    self.hi = hi
    self.key = _GatedKey(cfg)
    self.value = _ConvValue(cfg)
    self.bandwidth = _Bandwidth(cfg)

  def forward(self, x, segment_ids, lo: int):
    t = x.shape[1]
    starts = None if segment_ids is None else _document_starts(segment_ids)
    k = self.key(x, starts)
    v = self.value(x, segment_ids)
    counts = _document_positions(segment_ids, t) - lo + 1
    if self.hi is not None:
      counts = counts.clamp(max=self.hi - lo + 1)
    beta = self.bandwidth(counts.clamp(min=0))
    visible = _band(t, lo, self.hi) & _same_document(segment_ids, t)
    return _retrieve(beta[..., None] * k, k, v, visible)


class _MosaicV2Block(nn.Module):

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.norm1 = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
    self.short_term = _AssociativeMemory(cfg, hi=cfg.short_term_window - 1)
    memories = 1
    if cfg.long_term_memory:
      self.long_term = _AssociativeMemory(cfg, hi=None)
      memories = 2
    self.w_o = nn.Linear(memories * cfg.width, cfg.width, bias=False)
    self.norm2 = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
    self.ffn = _SwiGLU(cfg.width, cfg.ffn_width)

  def forward(self, x, segment_ids, ltm_delay: int):
    h = self.norm1(x)
    outputs = [self.short_term(h, segment_ids, 1)]
    if self.cfg.long_term_memory:
      y = self.long_term(h, segment_ids, ltm_delay)
      outputs.append(torch.zeros_like(y) if self.cfg.drop_long_term_memory else y)
    x = x + self.w_o(torch.cat([_merge_heads(o) for o in outputs], dim=-1))
    return x + self.ffn(self.norm2(x))


class MosaicV2(nn.Module):
  """Memory Mosaics v2; `ltm_delay` is the long-term delay m (default: the config's)."""

  def __init__(self, config: Config):
    super().__init__()
    self.config = config
    self.embed = nn.Embedding(config.vocab_size, config.width)
    for i in range(config.num_layers):
      self.add_module(f"layer_{i}", _MosaicV2Block(config))
    self.final_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
    self.classifier = nn.Linear(config.width, config.vocab_size, bias=False)

  def forward(self, tokens, segment_ids=None, ltm_delay: int | None = None):
    cfg = self.config
    ltm_delay = cfg.long_term_delay if ltm_delay is None else ltm_delay
    x = self.embed(tokens)
    for i in range(cfg.num_layers):
      x = getattr(self, f"layer_{i}")(x, segment_ids, ltm_delay)
    return self.classifier(self.final_norm(x))


# Llama -------------------------------------------------------------------------------------------


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
  """Rotary embedding of [b, h, t, d], rotating the two halves of each head."""
  half = x.shape[-1] // 2
  freqs = theta ** (-torch.arange(half, dtype=torch.float32) / half)
  angles = positions[:, None, :, None].to(torch.float32) * freqs  # [b, 1, t, d/2]
  cos, sin = angles.cos(), angles.sin()
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class _Attention(nn.Module):
  """Causal multi-head attention inside each document, RoPE at document positions."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    for name in ("wq", "wk", "wv", "wo"):
      self.add_module(name, nn.Linear(cfg.width, cfg.width, bias=False))

  def forward(self, x, segment_ids):
    cfg, t = self.cfg, x.shape[1]
    q, k, v = (_split_heads(w(x), cfg.num_heads) for w in (self.wq, self.wk, self.wv))
    positions = _document_positions(segment_ids, t)
    q = _rope(q, positions, cfg.rope_theta) * cfg.head_dim**-0.5
    k = _rope(k, positions, cfg.rope_theta)
    y = _retrieve(q, k, v, _band(t, 0, None) & _same_document(segment_ids, t))
    return self.wo(_merge_heads(y))


class _LlamaBlock(nn.Module):

  def __init__(self, cfg: Config):
    super().__init__()
    self.attn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
    self.attention = _Attention(cfg)
    self.ffn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
    self.ffn = _SwiGLU(cfg.width, cfg.ffn_width)

  def forward(self, x, segment_ids):
    x = x + self.attention(self.attn_norm(x), segment_ids)
    return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
  """The Transformer baseline: Llama blocks, untied embedding and classifier."""

  def __init__(self, config: Config):
    super().__init__()
    self.config = config
    self.embed = nn.Embedding(config.vocab_size, config.width)
    for i in range(config.num_layers):
      self.add_module(f"layer_{i}", _LlamaBlock(config))
    self.final_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
    self.classifier = nn.Linear(config.width, config.vocab_size, bias=False)

  def forward(self, tokens, segment_ids=None):
    x = self.embed(tokens)
    for i in range(self.config.num_layers):
      x = getattr(self, f"layer_{i}")(x, segment_ids)
    return self.classifier(self.final_norm(x))


# GPT-2 (nanoGPT names) ---------------------------------------------------------------------------


class _GPT2Attention(nn.Module):
  """Causal multi-head attention inside each document, q, k, v from one c_attn."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.c_attn = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.bias)
    self.c_proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)

  def forward(self, x, segment_ids):
    cfg, t = self.cfg, x.shape[1]
    q, k, v = (_split_heads(z, cfg.num_heads) for z in self.c_attn(x).split(cfg.width, dim=2))
    visible = _band(t, 0, None) & _same_document(segment_ids, t)
    return self.c_proj(_merge_heads(_retrieve(q * cfg.head_dim**-0.5, k, v, visible)))


class _GPT2Block(nn.Module):

  def __init__(self, cfg: Config):
    super().__init__()
    norm = lambda: nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, bias=cfg.bias)
    self.ln_1 = norm()
    self.attn = _GPT2Attention(cfg)
    self.ln_2 = norm()
    self.mlp = nn.ModuleDict(
        dict(
            c_fc=nn.Linear(cfg.width, 4 * cfg.width, bias=cfg.bias),
            c_proj=nn.Linear(4 * cfg.width, cfg.width, bias=cfg.bias),
        )
    )

  def forward(self, x, segment_ids):
    x = x + self.attn(self.ln_1(x), segment_ids)
    return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
  """GPT-2 under nanoGPT's names, position embeddings at document positions; the LM head is tied
  to `transformer.wte`."""

  def __init__(self, config: Config):
    super().__init__()
    self.config = config
    self.transformer = nn.ModuleDict(
        dict(
            wte=nn.Embedding(config.vocab_size, config.width),
            wpe=nn.Embedding(config.block_size, config.width),
            h=nn.ModuleList([_GPT2Block(config) for _ in range(config.num_layers)]),
            ln_f=nn.LayerNorm(config.width, eps=config.layer_norm_eps, bias=config.bias),
        )
    )
    self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
    self.lm_head.weight = self.transformer.wte.weight

  def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None):
    t = tokens.shape[1]
    if t > self.config.block_size:
      raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
    positions = _document_positions(segment_ids, t)
    x = self.transformer.wte(tokens) + self.transformer.wpe(positions)
    for block in self.transformer.h:
      x = block(x, segment_ids)
    return self.lm_head(self.transformer.ln_f(x))


MODELS: dict[str, type[nn.Module]] = {
    "mm1": MemoryMosaic,
    "mm1-library": MosaicV1Library,
    "mm2": MosaicV2,
    "llama": Llama,
    "gpt2": GPT2,
}


def build(config: Config) -> nn.Module:
  """The PyTorch module of a model config, in float32 and eval mode, its weights all zero."""
  if config.family not in MODELS:
    raise ValueError(
        f"no PyTorch version of the {config.family} family here; known: {sorted(MODELS)}"
    )
  return MODELS[config.family](config).eval()


def from_directory(path: str | pathlib.Path) -> nn.Module:
  """The model of a `mosaics-port to-safetensors` directory (config.json + model.safetensors).

  Needs mosaics_jax, whose config classes read that config.json (unlike the rest of this module,
  which Hugging Face exports carry without it).
  """
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel

  # In a try block: transformers' check of a remote code file's imports skips those.
  try:
    from mosaics_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("from_directory reads config.json with mosaics_jax: install it") from e
  path = pathlib.Path(path)
  saved = json.loads((path / "config.json").read_text())
  model = build(config_lib.from_dict(config_lib.ModelConfig, saved["model"]))
  load_weights(model, load_file(path / "model.safetensors"))
  return model


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
  """Loads every parameter of `model` from `tensors`, which may leave out buffers and tied copies.

  The files of `mosaics_jax.port.layout` hold each parameter once and no buffers (v1's masks are
  regenerated), so this is `load_state_dict(strict=True)` but for those.
  """
  result = model.load_state_dict(tensors, strict=False)
  optional = {name for name, _ in model.named_buffers()} | {
      name for name, _ in model.named_parameters(remove_duplicate=False)
  } - {name for name, _ in model.named_parameters()}
  missing = sorted(set(result.missing_keys) - optional)
  if missing or result.unexpected_keys:
    raise ValueError(
        f"{type(model).__name__}: missing tensors {missing}, unexpected tensors"
        f" {sorted(result.unexpected_keys)}"
    )
