"""The v1 paper's language-model setup ("Memory Mosaics", ICLR 2025) on BabiStories.

GPT-2 size (12 layers, width 768, 12 heads), block 512, GPT-2 tokens (vocabulary padded to 50304
as nanoMosaics does); recipe of the official `Library/scripts/train_babistories.sh`: 80k steps,
batch 512, peak lr 5e-3 down to 1e-4, 2000 warm-up steps, weight decay 0.1, dropout 0.05.
"""

from __future__ import annotations

from mosaics_jax.config import DataConfig, Experiment, MosaicV1Config, TrainConfig

EXPERIMENTS = (
    Experiment(
        name="mm1-babistories",
        description="Memory Mosaics v1 (GPT-2 small size) on BabiStories, v1 paper setup",
        model=MosaicV1Config(
            vocab_size=50304,
            num_layers=12,
            width=768,
            num_heads=12,
            block_size=512,
            pmem_size=2688,
            pmem_count=1,
            dropout=0.05,
        ),
        data=DataConfig(
            source="tokens",
            name="BabiStories (github.com/facebookresearch/MemoryMosaics, GPT-2 tokens)",
            token_dtype="uint16",
            eot_id=50256,  # GPT-2's <|endoftext|>, which closes every story.
            seq_len=512,
        ),
        train=TrainConfig(
            batch_size=512,
            steps=80_000,
            learning_rate=5e-3,
            warmup_steps=2000,
            min_lr_ratio=1e-4 / 5e-3,
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            grad_clip=1.0,
        ),
    ),
)
