"""Experiments that run on a laptop-class CPU: tiny models of every family, TinyShakespeare and
RegBench, and the synthetic recall runs of the reproductions (`experiments/repro_cpu.py`).

TinyShakespeare runs use nanoGPT's character-level size (6 layers, 6 heads, width 384, block 256);
get the text from github.com/karpathy/char-rnn (data/tinyshakespeare/input.txt) and pass its path
as data.path. `mm2-char-small` is a model of minutes, the README's evaluation examples. RegBench
runs here use strings of at most 8 letters (the paper's: 49), so that sequences of 10 to 19 strings
fit a context of 256.
"""

from __future__ import annotations

from mosaics_jax.config import (
    DataConfig,
    Experiment,
    GPT2Config,
    LlamaConfig,
    MosaicV1Config,
    MosaicV1LibraryConfig,
    MosaicV2Config,
    TrainConfig,
)

_TINY = dict(vocab_size=256, num_layers=2, width=64, num_heads=4)
_TINY_DATA = DataConfig(source="text", name="TinyShakespeare", tokenizer="byte", seq_len=128)
_TINY_TRAIN = TrainConfig(batch_size=8, steps=200, learning_rate=3e-3, warmup_steps=20)

_CHAR = dict(vocab_size=65, num_layers=6, width=384, num_heads=6, dropout=0.2)
_CHAR_DATA = DataConfig(source="text", name="TinyShakespeare", tokenizer="char", seq_len=256)
# nanoGPT's shakespeare_char recipe.
_CHAR_TRAIN = TrainConfig(
    batch_size=64,
    steps=5000,
    learning_rate=1e-3,
    warmup_steps=100,
    min_lr_ratio=0.1,
    b1=0.9,
    b2=0.99,
    weight_decay=0.1,
)

_SMALL_CHAR_TRAIN = TrainConfig(batch_size=16, steps=600, learning_rate=3e-3, warmup_steps=50)

_REGBENCH = dict(vocab_size=20, num_layers=2, width=64, num_heads=4, ffn_width=192)
_REGBENCH_DATA = DataConfig(
    source="regbench", name="RegBench", seq_len=256, regbench_languages=1000, regbench_max_string=8
)
_REGBENCH_TRAIN = TrainConfig(batch_size=16, steps=1000, learning_rate=3e-3, warmup_steps=50)

# Induction at context 256 for length extrapolation: 256 symbols, so a context of 129 is mostly
# distinct; longer evaluations repeat symbols and keep only the unambiguous queries.
_RECALL = dict(vocab_size=256, num_layers=2, width=64, num_heads=4)
_RECALL_DATA = DataConfig(
    source="synthetic_induction", name="induction heads", seq_len=256, task_vocab=256
)
_RECALL_TRAIN = TrainConfig(
    batch_size=16,
    steps=500,
    learning_rate=3e-3,
    warmup_steps=50,
    weight_decay=0.0,
    eval_every=50,
    eval_batches=4,
    checkpoint_every=250,
)

# Few-shot classification learnt in context (the icl-shots reproduction): bursty sequences of 4
# training classes in icl_classification's format, in bytes; evaluated on the synthetic dataset's
# held-out classes. icl_classification's prompts of 4 classes (with the answer) take 480 bytes at 1
# shot, 740 at 2, 1260 at 4, 2300 at 8 and 4380 at 16: the context holds 8 shots, and 16 is length
# extrapolation. About 4 minutes on 2 idle CPU cores (a step about 3.5 s).
_ICL = dict(vocab_size=256, num_layers=2, width=128, num_heads=4)
_ICL_DATA = DataConfig(
    source="icl_bursty", name="bursty few-shot classification", tokenizer="byte", seq_len=2304
)
_ICL_TRAIN = TrainConfig(
    batch_size=4,
    steps=48,
    learning_rate=3e-3,
    warmup_steps=6,
    log_every=4,
    eval_every=16,
    eval_batches=4,
    checkpoint_every=48,
)

EXPERIMENTS = (
    Experiment(
        name="mm1-tiny",
        description="2-layer Memory Mosaics v1 on bytes: smoke tests",
        model=MosaicV1Config(**_TINY, block_size=128, pmem_size=64),
        data=_TINY_DATA,
        train=_TINY_TRAIN,
    ),
    Experiment(
        name="mm1-library-tiny",
        description="2-layer Memory Mosaics v1 as the v1 paper's Library/ builds it, on bytes",
        model=MosaicV1LibraryConfig(**_TINY, block_size=128, pmem_size=64),
        data=_TINY_DATA,
        train=_TINY_TRAIN,
    ),
    Experiment(
        name="mm2-tiny",
        description="2-layer Memory Mosaics v2 on bytes: smoke tests",
        model=MosaicV2Config(
            **_TINY,
            ffn_width=192,
            short_term_window=16,
            long_term_delay=8,
            long_term_delay_range=(4, 16),
        ),
        data=_TINY_DATA,
        train=_TINY_TRAIN,
    ),
    Experiment(
        name="llama-tiny",
        description="2-layer Llama on bytes: smoke tests",
        model=LlamaConfig(**_TINY, ffn_width=192),
        data=_TINY_DATA,
        train=_TINY_TRAIN,
    ),
    Experiment(
        name="gpt2-tiny",
        description="2-layer GPT-2 (nanoGPT's) on bytes: smoke tests",
        model=GPT2Config(**_TINY, block_size=128),
        data=_TINY_DATA,
        train=_TINY_TRAIN,
    ),
    Experiment(
        name="mm1-shakespeare-char",
        description="Memory Mosaics v1 at nanoGPT's shakespeare_char size (pmem_size 1344)",
        model=MosaicV1Config(**_CHAR, block_size=256, pmem_size=1344),
        data=_CHAR_DATA,
        train=_CHAR_TRAIN,
    ),
    Experiment(
        name="mm2-shakespeare-char",
        description="Memory Mosaics v2 at nanoGPT's shakespeare_char size",
        model=MosaicV2Config(
            **_CHAR,
            ffn_width=1024,
            short_term_window=64,
            long_term_delay=16,
            long_term_delay_range=(16, 64),
        ),
        data=_CHAR_DATA,
        train=_CHAR_TRAIN,
    ),
    Experiment(
        name="llama-shakespeare-char",
        description="Llama at nanoGPT's shakespeare_char size",
        model=LlamaConfig(**_CHAR, ffn_width=1024),
        data=_CHAR_DATA,
        train=_CHAR_TRAIN,
    ),
    Experiment(
        name="gpt2-shakespeare-char",
        description="nanoGPT's shakespeare_char GPT-2 (its train.py default: no biases)",
        model=GPT2Config(**_CHAR, block_size=256, bias=False),
        data=_CHAR_DATA,
        train=_CHAR_TRAIN,
    ),
    Experiment(
        name="mm2-char-small",
        description="2-layer v2 on TinyShakespeare characters, minutes on a CPU (README examples)",
        model=MosaicV2Config(
            vocab_size=65,
            num_layers=2,
            width=128,
            num_heads=4,
            ffn_width=384,
            short_term_window=64,
            long_term_delay=16,
            long_term_delay_range=(16, 64),
        ),
        data=_CHAR_DATA,
        train=_SMALL_CHAR_TRAIN,
    ),
    Experiment(
        name="mm2-regbench-cpu",
        description="RegBench at CPU scale (strings <= 8 letters, 1000 languages): 2-layer v2",
        model=MosaicV2Config(
            **_REGBENCH, short_term_window=32, long_term_delay=8, long_term_delay_range=(8, 32)
        ),
        data=_REGBENCH_DATA,
        train=_REGBENCH_TRAIN,
    ),
    Experiment(
        name="mm1-regbench-cpu",
        description="RegBench at CPU scale (strings <= 8 letters, 1000 languages): 2-layer v1",
        # pmem_size 256 gives the parameter count of llama-regbench-cpu (109k).
        model=MosaicV1Config(
            vocab_size=20, num_layers=2, width=64, num_heads=4, block_size=256, pmem_size=256
        ),
        data=_REGBENCH_DATA,
        train=_REGBENCH_TRAIN,
    ),
    Experiment(
        name="llama-regbench-cpu",
        description="RegBench at CPU scale (strings <= 8 letters, 1000 languages): 2-layer Llama",
        model=LlamaConfig(**_REGBENCH),
        data=_REGBENCH_DATA,
        train=_REGBENCH_TRAIN,
    ),
    Experiment(
        name="mm2-recall-cpu",
        description="2-layer v2 trained on induction at context 256 (length extrapolation)",
        model=MosaicV2Config(
            **_RECALL,
            ffn_width=192,
            short_term_window=32,
            long_term_delay=16,
            long_term_delay_range=(16, 64),
        ),
        data=_RECALL_DATA,
        train=_RECALL_TRAIN,
    ),
    Experiment(
        name="llama-recall-cpu",
        description="2-layer Llama trained on induction at context 256 (length extrapolation)",
        model=LlamaConfig(**_RECALL, ffn_width=240),  # mm2-recall-cpu's parameter count.
        data=_RECALL_DATA,
        train=_RECALL_TRAIN,
    ),
    Experiment(
        name="llama-char-small",
        description="2-layer Llama on TinyShakespeare characters, mm2-char-small's size",
        model=LlamaConfig(vocab_size=65, num_layers=2, width=128, num_heads=4, ffn_width=480),
        data=_CHAR_DATA,
        train=_SMALL_CHAR_TRAIN,
    ),
    Experiment(
        name="mm2-icl-cpu",
        description="2-layer v2 trained on bursty few-shot classification in bytes (icl-shots)",
        model=MosaicV2Config(
            **_ICL,
            ffn_width=384,
            short_term_window=64,
            long_term_delay=16,
            long_term_delay_range=(16, 64),
        ),
        data=_ICL_DATA,
        train=_ICL_TRAIN,
    ),
    Experiment(
        name="llama-icl-cpu",
        description="2-layer Llama trained on bursty few-shot classification in bytes (icl-shots)",
        model=LlamaConfig(**_ICL, ffn_width=480),  # mm2-icl-cpu's parameter count.
        data=_ICL_DATA,
        train=_ICL_TRAIN,
    ),
)
