"""The v2 paper's runs ("Memory Mosaics at scale", design.md "Paper configurations"): v2 and Llama.

Pretraining at context 4096 on the paper's (non-public) 200B / 1T token mixes with a Llama 3
vocabulary, then a fine-tune at context 32768. The fine-tune recipe is not in the paper: ASSUMED the
same tokens per batch (128 x 32768), 1000 steps, a tenth of the peak learning rate.
"""

from __future__ import annotations

import dataclasses

from mosaics_jax.config import (
    DataConfig,
    Experiment,
    LlamaConfig,
    MosaicV2Config,
    TrainConfig,
)

VOCAB = 128_256
BATCH, CONTEXT, LONG_CONTEXT = 1024, 4096, 32768
# Positions per chunk of the loss: one chunk's [batch, 256, 128256] logits, not the whole
# context's, so the loss holds under 2 GiB per v5p chip at mm2-large (`mosaics-info --mesh`).
LOSS_CHUNK = 256
SIZES = {  # name: (layers, width, heads per memory, SwiGLU width, peak lr, training tokens)
    "small": (24, 2048, 16, 6144, 3e-4, 200e9),
    "large": (32, 4096, 32, 14336, 1e-3, 1e12),
}


def _recipe(lr: float, tokens: float) -> TrainConfig:
  return TrainConfig(
      batch_size=BATCH,
      steps=round(tokens / (BATCH * CONTEXT)),
      learning_rate=lr,
      warmup_steps=2000,
      min_lr_ratio=0.01,
      b1=0.9,
      b2=0.95,
      weight_decay=0.1,
      grad_clip=1.0,
      loss_chunk=LOSS_CHUNK,
      tokens=int(tokens),
  )


def _data(context: int) -> DataConfig:
  return DataConfig(
      source="tokens",
      name="v2 paper pretraining mix (not public: point data.path at your own token file)",
      token_dtype="uint32",  # Llama 3 ids exceed 65535.
      eot_id=128001,  # Llama 3's <|end_of_text|>.
      seq_len=context,
  )


def _long_context(base: Experiment) -> Experiment:
  steps = 1000
  return Experiment(
      name=f"{base.name}-32k",
      description=f"{base.description}, fine-tuned at context {LONG_CONTEXT}",
      model=base.model,
      data=_data(LONG_CONTEXT),
      train=dataclasses.replace(
          base.train,
          batch_size=BATCH * CONTEXT // LONG_CONTEXT,
          steps=steps,
          learning_rate=base.train.learning_rate / 10,
          warmup_steps=100,
          tokens=steps * BATCH * CONTEXT,
      ),
      init_from=base.name,
  )


def _experiments() -> tuple[Experiment, ...]:
  out = []
  for size, (layers, width, heads, ffn, lr, tokens) in SIZES.items():
    common = dict(vocab_size=VOCAB, num_layers=layers, width=width, num_heads=heads, ffn_width=ffn)
    variants = [
        (f"mm2-{size}", "Memory Mosaics v2", MosaicV2Config(**common, dtype="bfloat16")),
        (
            f"mm2-{size}-no-ltm",
            "Memory Mosaics v2 without long-term memory",
            MosaicV2Config(**common, dtype="bfloat16", long_term_memory=False),
        ),
        (
            f"llama-{size}",
            "Llama baseline (multi-head attention)",
            LlamaConfig(**common, dtype="bfloat16"),
        ),
    ]
    for name, what, model in variants:
      base = Experiment(
          name=name,
          description=f"{what}, {size} ({layers} layers, width {width}), v2 paper recipe",
          model=model,
          data=_data(CONTEXT),
          train=_recipe(lr, tokens),
      )
      out += [base, _long_context(base)]
  return tuple(out)


EXPERIMENTS = _experiments()
