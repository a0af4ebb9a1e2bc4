"""The embedded default experiment: one memory layer learns an induction head, on a CPU, in minutes.

The data is generated on the fly (no download): random symbols, then the same symbols again, so
that every token of the repeat is predicted by the rule "... a b ... a -> b". The v1 paper's claim
is that a single Memory Mosaics layer implements this induction head without position encoding;
`quickstart-llama` trains a one-layer Transformer (RoPE) on the same task for comparison.
"""

from __future__ import annotations

from mosaics_jax.config import (
    DataConfig,
    Experiment,
    LlamaConfig,
    MosaicV1Config,
    TrainConfig,
)

_DATA = DataConfig(source="synthetic_induction", name="induction heads", seq_len=64, task_vocab=64)
_TRAIN = TrainConfig(
    batch_size=32,
    steps=300,
    learning_rate=3e-3,
    warmup_steps=30,
    min_lr_ratio=0.1,
    weight_decay=0.0,
    log_every=10,
    eval_every=50,
    eval_batches=4,
    checkpoint_every=100,
)
_SIZE = dict(vocab_size=64, num_layers=1, width=64, num_heads=4)

EXPERIMENTS = (
    Experiment(
        name="quickstart",
        description="1-layer Memory Mosaics v1 learns an induction head (synthetic, CPU, minutes)",
        model=MosaicV1Config(**_SIZE, block_size=64, pmem_size=64),
        data=_DATA,
        train=_TRAIN,
    ),
    Experiment(
        name="quickstart-llama",
        description="1-layer Llama (RoPE) on the quickstart induction task, for comparison",
        model=LlamaConfig(**_SIZE, ffn_width=256),
        data=_DATA,
        train=_TRAIN,
    ),
)
