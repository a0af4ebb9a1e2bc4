"""The v1 paper's setups ("Memory Mosaics", ICLR 2025): BabiStories and RegBench.

BabiStories: GPT-2 size (12 layers, width 768, 12 heads), block 512, GPT-2 tokens (vocabulary
padded to 50304 as nanoMosaics does); recipe of the official `Library/scripts/train_babistories.sh`:
80k steps, batch 512 (8 per GPU on 64 GPUs), peak lr 5e-3 down to 1e-4, 2000 warm-up steps, weight
decay 0.1, dropout 0.05. `mm1-babistories` is nanoMosaics' model, `mm1-library-babistories` the
paper's own, the Library's `StackAssoMem`, as that script builds it.

RegBench: the Library model at the size of the official `ICLL/configs/experiment/dfa/mm.yaml`
(width 128, 8 heads, 2 layers, pmem_size 448, block 1000, dropouts 0.05, lr 5e-4, weight decay
0.1, gradient clip 1.0, 100 training languages), trained by seq_icl's protocol
(`configs/experiment/dfa/base.yaml`): 200 epochs of the 100 training sequences at batch 32 (625
steps of whole batches), cosine decay to 0.1 lr after a linear warm-up over the first tenth. Each
sequence is its own row, padded to 1000; batches are cut after their longest sequence
(`data.trim_padding`), which changes no loss or gradient.

The Transformer baselines are nanoGPT's GPT-2 (`gpt2-babistories`, `gpt2-regbench`) at the Memory
Mosaics' parameter counts, within 5% (`tests/test_configs.py` checks 10%).
"""

from __future__ import annotations

import dataclasses

from mosaics_jax.config import (
    DataConfig,
    Experiment,
    GPT2Config,
    MosaicV1Config,
    MosaicV1LibraryConfig,
    TrainConfig,
)

_BABISTORIES_DATA = DataConfig(
    source="tokens",
    name="BabiStories (github.com/facebookresearch/MemoryMosaics, GPT-2 tokens)",
    token_dtype="uint16",
    eot_id=50256,  # GPT-2's <|endoftext|>, which closes every story.
    seq_len=512,
)
_BABISTORIES_TRAIN = TrainConfig(
    batch_size=512,
    steps=80_000,
    learning_rate=5e-3,
    warmup_steps=2000,
    min_lr_ratio=1e-4 / 5e-3,
    b1=0.9,
    b2=0.95,
    weight_decay=0.1,
    grad_clip=1.0,
)

_REGBENCH_DATA = DataConfig(
    source="regbench",
    name="RegBench",
    seq_len=1000,  # ASSUMED: mm.yaml's block_size, "set to 1000 for the safety reason".
    regbench_languages=100,  # mm.yaml's dataset.num_examples.
    trim_padding=128,
)
# seq_icl's dfa/base.yaml at the commit of ICLL's README era (max_epochs 200; a later commit has
# 400): 200 epochs x 100 sequences / batch 32 = 625 steps. seq_icl counts an epoch's last, short
# batch of 4 as a step (800 steps of fewer rows); whole batches keep every step's loss a mean over
# 32 sequences, with the same sequences seen. warmup_t is a tenth of the steps.
_REGBENCH_TRAIN = TrainConfig(
    batch_size=32,
    steps=625,
    learning_rate=5e-4,
    warmup_steps=63,
    min_lr_ratio=0.1,
    b1=0.9,
    b2=0.999,  # ASSUMED: PyTorch's AdamW default (seq_icl's optimizer config sets no betas).
    weight_decay=0.1,
    grad_clip=1.0,
    eval_every=125,
    eval_batches=4,
    checkpoint_every=25,  # About three minutes of this CPU: a stopped run loses little.
)

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
        data=_BABISTORIES_DATA,
        train=_BABISTORIES_TRAIN,
    ),
    Experiment(
        name="mm1-library-babistories",
        description="The v1 paper's Memory Mosaic (Library StackAssoMem, GPT-2 small size) on"
        " BabiStories",
        # train_babistories.sh's flags; the rest are StackAssoMem's defaults.
        model=MosaicV1LibraryConfig(
            vocab_size=50304,
            num_layers=12,
            width=768,
            num_heads=12,
            block_size=512,
            pmem_size=2688,
            pmem_count=1,
            k_kernel_size=1,
            v_kernel_size=2,
            ic_dropout=0.05,
            hd_dropout=0.05,
            weight_tying=True,
            pre_ln=True,
        ),
        data=_BABISTORIES_DATA,
        train=_BABISTORIES_TRAIN,
    ),
    Experiment(
        name="mm1-library-regbench",
        description="The v1 paper's Memory Mosaic (Library StackAssoMem) on RegBench, at the size"
        " of ICLL's dfa/mm.yaml",
        model=MosaicV1LibraryConfig(
            vocab_size=20,  # seq_icl's vocab_size: our RegBench reads ids below 20.
            num_layers=2,
            width=128,
            num_heads=8,
            block_size=1000,
            pmem_size=448,
            ic_dropout=0.05,
            hd_dropout=0.05,
        ),
        data=_REGBENCH_DATA,
        train=_REGBENCH_TRAIN,
    ),
    # The Transformer baselines: nanoGPT's GPT-2 at the Memory Mosaics' parameter counts.
    Experiment(
        name="gpt2-babistories",
        description="GPT-2 small (nanoGPT's) on BabiStories, the v1 paper's Transformer baseline",
        model=GPT2Config(
            vocab_size=50304,
            num_layers=12,
            width=768,
            num_heads=12,
            block_size=512,
            bias=False,  # ASSUMED: as the Library's StackAssoMem, which has no biases.
            dropout=0.05,
        ),
        data=_BABISTORIES_DATA,
        train=_BABISTORIES_TRAIN,
    ),
    Experiment(
        name="gpt2-regbench",
        description="GPT-2 (nanoGPT's) on RegBench at mm1-library-regbench's parameter count",
        # ASSUMED: width 112 (8 heads of 14) puts its 1000 learned positions and 2 layers within
        # 5% of the Library model's parameters; mm.yaml matches pmem_size to a transformer.
        model=GPT2Config(
            vocab_size=20,
            num_layers=2,
            width=112,
            num_heads=8,
            block_size=1000,
            bias=False,
            dropout=0.05,
        ),
        data=_REGBENCH_DATA,
        # seq_icl's learning rate of the Transformer on RegBench, a value of its sweep.
        train=dataclasses.replace(_REGBENCH_TRAIN, learning_rate=2.5e-4),
    ),
)
