"""The optimizer: AdamW after global-norm clipping, linear warm-up then cosine decay.

The v2 paper's recipe (design.md, "Training recipe") with every number a `TrainConfig` field.
"""

from __future__ import annotations

import jax
import optax

from mosaics_jax import config as config_lib


def learning_rate(cfg: config_lib.TrainConfig) -> optax.Schedule:
  """0 -> peak over warmup_steps, then cosine down to peak * min_lr_ratio at the last step."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.learning_rate,
      warmup_steps=min(cfg.warmup_steps, cfg.steps),
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio,
  )


def weight_decay_mask(params) -> object:
  """True for matrices (Dense kernels, embeddings, persistent pairs); False for norms, biases and
  per-head scalars such as the bandwidth, key/value scales and decays, which must not shrink."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: config_lib.TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(
          learning_rate(cfg),
          b1=cfg.b1,
          b2=cfg.b2,
          eps=cfg.eps,
          weight_decay=cfg.weight_decay,
          mask=weight_decay_mask,
      ),
  )
