"""The papers' claims at CPU scale: each run trains in minutes on a 2-core CPU.

The results and verdicts are in docs/reproductions.md.

The two architectures of a comparison have equal parameter counts (within 10%, checked) and the
same recipe, steps and batch (their experiments share them). Hyperparameters are those of the
experiments in `cpu.py` and `quickstart.py`, fixed before the runs and never tuned on the
evaluations; checks are fixed here before the runs.
"""

from __future__ import annotations

from mosaics_jax.repro.declaration import (
    TRAINING,
    Check,
    Evaluation,
    PaperNumber,
    Quantity,
    Reproduction,
    Run,
    Sweep,
)

_LENGTHS = (256, 512, 1024, 2048)  # 1x to 8x the training context of the recall runs.


def _at(run: str, evaluation: str, metric: str, **where) -> Quantity:
  return Quantity(run=run, evaluation=evaluation, metric=metric, where=tuple(where.items()))


def _last(run: str, metric: str = "val_accuracy") -> Quantity:
  return _at(run, TRAINING, metric, last=True)


def _table_3(trained: int) -> tuple[PaperNumber, ...]:
  """The v2 paper's Table 3 beside our accuracies of mm2 and llama, trained at `trained` tokens."""

  def ours(run: str, times: int) -> Quantity:
    return _at(run, "synthetic", "accuracy", length=times * trained)

  return (
      PaperNumber(what="MM v2 small, RULER QA at 1x (4k)", value=45.0, ours=ours("mm2", 1)),
      PaperNumber(what="MM v2 small, RULER QA at 8x (32k)", value=31.7, ours=ours("mm2", 8)),
      PaperNumber(what="Transformer small at 1x (4k)", value=39.4, ours=ours("llama", 1)),
      PaperNumber(what="Transformer small at 2x (8k): fails (0)", value=0.0, ours=ours("llama", 2)),
  )


# quickstart's 300 steps are too few for a two-layer Transformer to learn the task at all (the
# first run, docs/reproductions.md): "later" needs a longer budget, the same for all three.
_INDUCTION_BUDGET = ("train.steps=2000", "train.eval_every=50", "train.checkpoint_every=500")

# The recall experiments' 500 steps are too few for the Transformer to learn the task at its own
# length (the first run, docs/reproductions.md): 2000 steps, the same for both.
_EXTRAPOLATION_BUDGET = ("train.steps=2000", "train.checkpoint_every=500", "train.eval_every=100")

_RECALL_EVAL = Evaluation(task="synthetic", settings=(f"synthetic.lengths={list(_LENGTHS)}",))

# Block selection in the long-term memory: blocks of 16 pairs; in training, the newest and the 3
# best older blocks of each query.
_SELECT_TRAINING = ("model.long_term_select_blocks=3", "model.long_term_select_block_size=16")


# Text at 1x, 4x and 8x the training context of mm2-char-small (256), on the validation tail.
_TEXT_PERPLEXITY = Evaluation(
    task="perplexity", settings=("perplexity.length=2048", "perplexity.start_fraction=0.9")
)
_TEXT_COPY = Evaluation(task="copy", settings=("copy.lengths=[256,1024,2048]",))

# The redesigns (issue 32) train fresh seeds: 100, 101, ... (`Reproduction.first_seed`).
_FRESH = 100
# Their learning rates: each run's lowest final validation loss among these, trained at the
# sweep's seed for a third of the budget of mm2-char-small (600 steps) to fit the time.
_LR_SWEEP = dict(values=(1e-3, 3e-3, 1e-2), overrides=("train.steps=200", "train.warmup_steps=20"))
_SHORT_TEXT = ("perplexity.length=256", "perplexity.start_fraction=0.9")

# The extrapolation redesign's task: 8 keys hidden once each among 64 symbols of noise, recalled at
# the end (`synthetic_needles`), trained at 64 tokens, in batches of 32 for 2000 steps (in the
# pilots, at seed 0 and 3e-3, the Transformer reached 1.0 by step 1100, v2 by step 200); evaluated
# at 1x to 16x, where every recall is still unambiguous.
_NEEDLES = (
    "data.source=synthetic_needles",
    "data.seq_len=64",
    "data.task_vocab=64",
    "data.task_pairs=8",
    "train.batch_size=32",
    "train.steps=2000",
    "train.warmup_steps=100",
    "train.eval_every=100",
    "train.checkpoint_every=1000",
)
_NEEDLES_LENGTHS = (64, 128, 256, 512, 1024)
# Half the budget, at which the pilots' Transformer had learnt the task or nearly.
_NEEDLES_SWEEP = dict(
    values=(1e-3, 3e-3, 1e-2), overrides=("train.steps=1000", "train.warmup_steps=50")
)
_NO_LTM = ("drop_long_term_memory=true",)


def _selecting(
    base: Evaluation,
    blocks: int,
    *,
    summary: str = "mean",
    block_size: int = 16,
    runs: tuple[str, ...] = (),
) -> Evaluation:
  """`base` with the model reading 1 + `blocks` blocks of `block_size` pairs per query, labelled
  `-kK` (blocks of 16) or `-bB`, and `-bound` for that summary."""
  label = f"{base.name}-k{blocks}" if block_size == 16 else f"{base.name}-b{block_size}"
  return Evaluation(
      task=base.task,
      label=label + ("" if summary == "mean" else f"-{summary}"),
      settings=base.settings,
      model=(
          f"long_term_select_blocks={blocks}",
          f"long_term_select_block_size={block_size}",
          f"long_term_select_summary={summary}",
      ),
      runs=runs,
  )


REPRODUCTIONS = (
    Reproduction(
        name="induction",
        claim="one Memory Mosaics layer learns an induction head; a one-layer Transformer does"
        " not; a two-layer one does, later",
        source="v1 paper (ICLR 2025), Section 3 and its induction-head figure",
        scale="cpu",
        runs=(
            Run(name="mm1-1layer", experiment="quickstart", overrides=_INDUCTION_BUDGET),
            Run(
                name="llama-1layer",
                experiment="quickstart-llama",
                # ffn_width 48 gives the parameter count of quickstart (34k).
                overrides=("model.ffn_width=48", *_INDUCTION_BUDGET),
            ),
            Run(
                name="llama-2layer",
                experiment="quickstart-llama",
                overrides=("model.ffn_width=48", "model.num_layers=2", *_INDUCTION_BUDGET),
            ),
        ),
        evaluations=(Evaluation(task=TRAINING), Evaluation(task="synthetic")),
        checks=(
            Check(
                description="one Memory Mosaics layer learns it",
                left=_last("mm1-1layer"),
                op=">=",
                right=0.9,
            ),
            Check(
                description="one Transformer layer does not",
                left=_last("llama-1layer"),
                op="<=",
                right=0.5,
            ),
            Check(
                description="two Transformer layers do",
                left=_last("llama-2layer"),
                op=">=",
                right=0.9,
            ),
            Check(
                description="later: behind Memory Mosaics at step 50",
                left=_at("llama-2layer", TRAINING, "val_accuracy", step=50),
                op="<=",
                right=_at("mm1-1layer", TRAINING, "val_accuracy", step=50),
                offset=-0.1,
            ),
        ),
        equal_params=(("mm1-1layer", "llama-1layer"),),
        notes="The task is `quickstart`'s (context 64, 64 symbols, batches of 32 sequences), for"
        " 2000 steps instead of its 300 (see the first run in docs/reproductions.md);"
        " accuracy is on the unambiguous recalls of fresh validation sequences. The two-layer"
        " Transformer is larger than the one-layer models (the claim is about depth).",
    ),
    Reproduction(
        name="regbench-short",
        claim="Memory Mosaics learn regular languages in context far better than a Transformer"
        " of the same size when few training languages are seen",
        source="v1 paper, in-context language learning figure (RegBench, 100 training"
        " languages: accuracy 0.925 vs 0.52, L1 0.57 vs 0.685)",
        scale="cpu",
        runs=(
            Run(
                name="mm1",
                experiment="mm1-regbench-cpu",
                overrides=("data.regbench_languages=100",),
            ),
            Run(
                name="llama",
                experiment="llama-regbench-cpu",
                overrides=("data.regbench_languages=100",),
            ),
        ),
        evaluations=(Evaluation(task="regbench", settings=("regbench.num_examples=200",)),),
        checks=(
            Check(
                description="Memory Mosaics at least 0.2 more accurate",
                left=_at("mm1", "regbench", "accuracy"),
                op=">=",
                right=_at("llama", "regbench", "accuracy"),
                offset=0.2,
            ),
            Check(
                description="and closer to the language's distribution",
                left=_at("mm1", "regbench", "l1"),
                op="<=",
                right=_at("llama", "regbench", "l1"),
            ),
        ),
        paper=(
            PaperNumber(
                what="Memory Mosaics accuracy, 100 languages",
                value=0.925,
                ours=_at("mm1", "regbench", "accuracy"),
            ),
            PaperNumber(
                what="Transformer accuracy, 100 languages",
                value=0.52,
                ours=_at("llama", "regbench", "accuracy"),
            ),
            PaperNumber(
                what="Memory Mosaics L1 ('TVD'), 100 languages",
                value=0.57,
                ours=_at("mm1", "regbench", "l1"),
            ),
            PaperNumber(
                what="Transformer L1 ('TVD'), 100 languages",
                value=0.685,
                ours=_at("llama", "regbench", "l1"),
            ),
        ),
        equal_params=(("mm1", "llama"),),
        notes="Strings of at most 8 letters (the paper's: 49) so that 10-19 strings fit a context"
        " of 256; 2 layers of width 64 (the paper's v1: width 128, 8 heads, pmem 448); 1000 steps"
        " of 16 sequences. The Transformer is Llama (RoPE, SwiGLU). Its 100 training sequences"
        " are memorised and the held-out scores stay below the in-context 3-gram's: the paper's"
        " own protocol is `regbench-paper` (experiments/repro_v1.py).",
    ),
    Reproduction(
        name="extrapolation",
        claim="trained at one context, Memory Mosaics v2 keeps retrieving far beyond it without"
        " fine-tuning; the Transformer fails past its training length",
        source="v2 paper (NeurIPS 2025), Table 3 (trained at 4k, evaluated to 32k)",
        scale="cpu",
        runs=(
            Run(name="mm2", experiment="mm2-recall-cpu", overrides=_EXTRAPOLATION_BUDGET),
            Run(name="llama", experiment="llama-recall-cpu", overrides=_EXTRAPOLATION_BUDGET),
        ),
        evaluations=(Evaluation(task=TRAINING), _RECALL_EVAL),
        checks=(
            Check(
                description="v2 keeps at least half of its accuracy at 8x",
                left=_at("mm2", "synthetic", "accuracy", length=2048),
                op=">=",
                right=_at("mm2", "synthetic", "accuracy", length=256),
                scale=0.5,
            ),
            Check(
                description="the Transformer learnt the task at 1x",
                left=_at("llama", "synthetic", "accuracy", length=256),
                op=">=",
                right=0.5,
            ),
            Check(
                description="and loses at least 3/4 of it at 8x",
                left=_at("llama", "synthetic", "accuracy", length=2048),
                op="<=",
                right=_at("llama", "synthetic", "accuracy", length=256),
                scale=0.25,
            ),
        ),
        paper=_table_3(trained=256),
        equal_params=(("mm2", "llama"),),
        notes="2000 steps of 16 sequences of 256 (the recall experiments' 500 leave the"
        " Transformer at chance: docs/reproductions.md). Retrieval is the induction task (recall"
        " the symbol that followed an earlier occurrence, anywhere in the context) instead of"
        " RULER's QA on text, which CPU-sized character models score 0 on; our numbers are"
        " accuracies in [0, 1], the paper's RULER scores in [0, 100].",
    ),
    Reproduction(
        name="long-term-select-blocks",
        claim="beyond the papers: a long-term memory that reads its newest block and the K best"
        " older blocks of 16 pairs (at most 1/8 of its pairs at 8x) retrieves as well as the full"
        " memory, whether it selects only at inference or also in training",
        source="v2 paper, Section 6 (its limitation: the long-term memory reads every past pair;"
        " 'fuzzy hashing and hierarchical memory ... have not yet been explored'); design.md,"
        " 'Block selection'",
        scale="cpu",
        runs=(
            Run(name="mm2", experiment="mm2-recall-cpu"),
            Run(name="mm2-select", experiment="mm2-recall-cpu", overrides=_SELECT_TRAINING),
        ),
        evaluations=(
            Evaluation(task=TRAINING),
            _RECALL_EVAL,
            *(_selecting(_RECALL_EVAL, blocks, runs=("mm2",)) for blocks in (1, 3, 7)),
            _selecting(_RECALL_EVAL, 7, summary="bound", runs=("mm2",)),
            # 128 pairs per query in blocks of 1 (top-K pairs), 2, 4 and 8 (16 is k7).
            *(
                _selecting(_RECALL_EVAL, 128 // size - 1, block_size=size, runs=("mm2",))
                for size in (1, 2, 4, 8)
            ),
            Evaluation(
                task="synthetic",
                label="synthetic-every-pair",
                settings=_RECALL_EVAL.settings,
                model=("long_term_select_blocks=0",),
                runs=("mm2-select",),
            ),
        ),
        checks=(
            Check(
                description="selecting at inference (K = 7: 1/8 of the pairs at 8x) costs at most"
                " 2 points at 8x",
                left=_at("mm2", "synthetic-k7", "accuracy", length=2048),
                op=">=",
                right=_at("mm2", "synthetic", "accuracy", length=2048),
                offset=-0.02,
            ),
            Check(
                description="trained selecting (K = 3), at most 2 points below the full memory at"
                " 8x",
                left=_at("mm2-select", "synthetic", "accuracy", length=2048),
                op=">=",
                right=_at("mm2", "synthetic", "accuracy", length=2048),
                offset=-0.02,
            ),
        ),
        equal_params=(("mm2", "mm2-select"),),
        notes="The extrapolation setup (mm2-recall-cpu, trained at 256 for 500 steps, evaluated"
        " at 1x to 8x). `synthetic-kK` is the full memory's model reading R = 1 newest and K best"
        " blocks of 16 pairs per query and head, scored by the mean of a block's keys (`-bound`:"
        " by the upper bound of q . k); `mm2-select` is trained reading 1 + 3 blocks, and"
        " evaluated so and reading every pair. `synthetic-bB` reads 128 pairs per query in blocks"
        " of B (K = 128 / B - 1; B = 1 is the exact top-K pairs), a sweep added after the first"
        " results showed that blocks of 16 miss; the checks are those fixed before the runs.",
    ),
    Reproduction(
        name="long-term-select-blocks-text",
        claim="beyond the papers: on text, a long-term memory reading its newest block and the 7"
        " best older blocks of 16 pairs keeps the full memory's loss by position and its copy of"
        " a passage at 8x the training length",
        source="design.md, 'Block selection'; the text counterpart of long-term-select-blocks,"
        " whose random-symbol keys defeat block summaries",
        scale="cpu",
        runs=(Run(name="mm2", experiment="mm2-char-small"),),
        evaluations=(
            _TEXT_PERPLEXITY,
            _selecting(_TEXT_PERPLEXITY, 7),
            _TEXT_COPY,
            *(_selecting(_TEXT_COPY, blocks) for blocks in (3, 7)),
            _selecting(_TEXT_COPY, 7, summary="bound"),
        ),
        checks=(
            Check(
                description="the loss at 8x (2048) within 1% of the full memory's",
                left=_at("mm2", "perplexity-k7", "loss", length=2048),
                op="<=",
                right=_at("mm2", "perplexity", "loss", length=2048),
                scale=1.01,
            ),
            Check(
                description="the copy's loss at 8x within 2% of the full memory's",
                left=_at("mm2", "copy-k7", "loss_copy", length=2048),
                op="<=",
                right=_at("mm2", "copy", "loss_copy", length=2048),
                scale=1.02,
            ),
            Check(
                description="the copy's accuracy at 8x within 2 points",
                left=_at("mm2", "copy-k7", "accuracy_copy", length=2048),
                op=">=",
                right=_at("mm2", "copy", "accuracy_copy", length=2048),
                offset=-0.02,
            ),
        ),
        notes="mm2-char-small (600 steps at 256, the full memory) evaluated reading every pair"
        " and reading 1 + K blocks of 16 per query and head (`-kK`; `-bound`: blocks scored by"
        " the upper bound of q . k). At 2048 a query reads at most 128 of up to 2033 pairs. Needs"
        " --set data.path=input.txt (TinyShakespeare); the evaluations read its validation tail.",
    ),
    Reproduction(
        name="stochastic-m",
        claim="training with a random long-term delay m extrapolates much better than a fixed m,"
        " at no cost at the training length",
        source="v2 paper, Table 12 (MM v2 small: +15.8 points at 32k, +1.4 at 4k)",
        scale="cpu",
        runs=(
            Run(name="random-m", experiment="mm2-recall-cpu"),
            Run(
                name="fixed-m",
                experiment="mm2-recall-cpu",
                overrides=("model.long_term_delay_range=[16,16]",),
            ),
        ),
        evaluations=(_RECALL_EVAL,),
        checks=(
            Check(
                description="random m at least 10 points better at 8x",
                left=_at("random-m", "synthetic", "accuracy", length=2048),
                op=">=",
                right=_at("fixed-m", "synthetic", "accuracy", length=2048),
                offset=0.1,
            ),
            Check(
                description="within 3 points at 1x (not below)",
                left=_at("random-m", "synthetic", "accuracy", length=256),
                op=">=",
                right=_at("fixed-m", "synthetic", "accuracy", length=256),
                offset=-0.03,
            ),
            Check(
                description="within 3 points at 1x (not above)",
                left=_at("random-m", "synthetic", "accuracy", length=256),
                op="<=",
                right=_at("fixed-m", "synthetic", "accuracy", length=256),
                offset=0.03,
            ),
        ),
        paper=(
            PaperNumber(
                what="fixed m at 1x (4k)",
                value=43.6,
                ours=_at("fixed-m", "synthetic", "accuracy", length=256),
            ),
            PaperNumber(
                what="random m at 1x (4k)",
                value=45.0,
                ours=_at("random-m", "synthetic", "accuracy", length=256),
            ),
            PaperNumber(
                what="fixed m at 8x (32k)",
                value=15.9,
                ours=_at("fixed-m", "synthetic", "accuracy", length=2048),
            ),
            PaperNumber(
                what="random m at 8x (32k)",
                value=31.7,
                ours=_at("random-m", "synthetic", "accuracy", length=2048),
            ),
        ),
        equal_params=(("random-m", "fixed-m"),),
        notes="m is drawn from [16, 64] at every step (the paper: [64, 256] at context 4k) or"
        " fixed at 16, the inference delay of both. Retrieval is the induction task, as in"
        " `extrapolation`; accuracies in [0, 1] against the paper's RULER scores in [0, 100].",
    ),
    Reproduction(
        name="drop-long-term-memory",
        claim="without its long-term memory a trained v2 model keeps its short-context loss but"
        " loses retrieval from long context",
        source="v2 paper, Tables 2 and 10 (persistent-knowledge tasks 56.8 vs 56.6; RULER QA"
        " at 32k 53.4 vs 20.2)",
        scale="cpu",
        runs=(Run(name="mm2", experiment="mm2-char-small"),),
        evaluations=(
            Evaluation(
                task="perplexity",
                settings=("perplexity.length=256", "perplexity.start_fraction=0.9"),
            ),
            Evaluation(
                task="perplexity",
                label="perplexity-no-ltm",
                settings=("perplexity.length=256", "perplexity.start_fraction=0.9"),
                model=("drop_long_term_memory=true",),
            ),
            Evaluation(task="copy", settings=("copy.lengths=[256,1024]",)),
            Evaluation(
                task="copy",
                label="copy-no-ltm",
                settings=("copy.lengths=[256,1024]",),
                model=("drop_long_term_memory=true",),
            ),
        ),
        checks=(
            Check(
                description="short-context loss barely moves (within 10%)",
                left=_at("mm2", "perplexity-no-ltm", "loss", length=256),
                op="<=",
                right=_at("mm2", "perplexity", "loss", length=256),
                scale=1.1,
            ),
            Check(
                description="retrieval collapses: the copy's accuracy halves at 1024",
                left=_at("mm2", "copy-no-ltm", "accuracy_copy", length=1024),
                op="<=",
                right=_at("mm2", "copy", "accuracy_copy", length=1024),
                scale=0.5,
            ),
        ),
        paper=(
            PaperNumber(
                what="MM v2 large, RULER QA at 32k, with long-term memory (Table 4)",
                value=53.4,
                ours=_at("mm2", "copy", "accuracy_copy", length=1024),
            ),
            PaperNumber(
                what="the same without long-term memory (Table 10)",
                value=20.2,
                ours=_at("mm2", "copy-no-ltm", "accuracy_copy", length=1024),
            ),
        ),
        notes="Needs the text: `--set data.path=.../tinyshakespeare/input.txt`. Short-context"
        " loss is the validation tail's loss in windows of 256 characters; retrieval is `copy`,"
        " a passage of the validation tail read twice (the copy's next-character accuracy).",
    ),
    Reproduction(
        name="icl-shots",
        claim="in-context classification improves with more demonstrations for Memory Mosaics,"
        " not for the Transformer, most clearly with anonymous labels",
        source="v2 paper, Figures 3 and 4 (Banking77, TACRED, GoEmotions; 1 to 16 shots)",
        scale="cpu",
        runs=(
            Run(name="mm2", experiment="mm2-char-small"),
            Run(name="llama", experiment="llama-char-small"),
        ),
        evaluations=(
            Evaluation(
                task="icl_classification",
                settings=(
                    "icl_classification.dataset=synthetic",
                    "icl_classification.num_classes=4",
                    "icl_classification.shots=[1,2,4,8]",
                    "icl_classification.num_examples=40",
                ),
            ),
        ),
        checks=(
            Check(
                description="Memory Mosaics gain at least 10 points from 1 to 8 shots",
                left=_at("mm2", "icl_classification", "likelihood_accuracy", shots=8, variant=None),
                op=">=",
                right=_at(
                    "mm2", "icl_classification", "likelihood_accuracy", shots=1, variant=None
                ),
                offset=10.0,
            ),
        ),
        equal_params=(("mm2", "llama"),),
        notes="Needs the text: `--set data.path=.../tinyshakespeare/input.txt`. A character"
        " model of 0.5M parameters trained on Shakespeare for 5 minutes; the synthetic dataset"
        " (4 classes, anonymous labels) needs no download. Scores are x100 (best prompt variant).",
    ),
    Reproduction(
        name="drop-long-term-memory-gain",
        claim="without its long-term memory a trained v2 model keeps its short-context loss but"
        " loses retrieval from long context",
        source="v2 paper, Tables 2 and 10 (persistent-knowledge tasks 56.8 vs 56.6; RULER QA"
        " at 32k 53.4 vs 20.2)",
        scale="cpu",
        runs=(Run(name="mm2", experiment="mm2-char-small"),),
        evaluations=(
            Evaluation(task="perplexity", settings=_SHORT_TEXT),
            Evaluation(
                task="perplexity", label="perplexity-no-ltm", settings=_SHORT_TEXT, model=_NO_LTM
            ),
            Evaluation(task="copy", settings=("copy.lengths=[256,1024]",)),
            Evaluation(
                task="copy",
                label="copy-no-ltm",
                settings=("copy.lengths=[256,1024]",),
                model=_NO_LTM,
            ),
        ),
        checks=(
            Check(
                description="the model retrieves: reading the passage before is worth at least"
                " 0.05 nats per character of its copy at 1024",
                left=_at("mm2", "copy", "retrieval_gain", length=1024),
                op=">=",
                right=0.05,
                precondition=True,
            ),
            Check(
                description="short-context loss barely moves (within 10%)",
                left=_at("mm2", "perplexity-no-ltm", "loss", length=256),
                op="<=",
                right=_at("mm2", "perplexity", "loss", length=256),
                scale=1.1,
            ),
            Check(
                description="retrieval is lost: without long-term memory at most a quarter of the"
                " copy's gain at 1024 remains",
                left=_at("mm2", "copy-no-ltm", "retrieval_gain", length=1024),
                op="<=",
                right=_at("mm2", "copy", "retrieval_gain", length=1024),
                scale=0.25,
            ),
        ),
        sweep=Sweep(runs=("mm2",), **_LR_SWEEP),
        paper=(
            PaperNumber(
                what="MM v2 large, RULER QA at 32k, with long-term memory (Table 4)",
                value=53.4,
                ours=_at("mm2", "copy", "accuracy_copy", length=1024),
            ),
            PaperNumber(
                what="the same without long-term memory (Table 10)",
                value=20.2,
                ours=_at("mm2", "copy-no-ltm", "accuracy_copy", length=1024),
            ),
        ),
        first_seed=_FRESH,
        notes="Redesign of `drop-long-term-memory`, whose check on the copy's accuracy counted"
        " what the language model predicts without retrieval (docs/reproductions.md): the check"
        " is now on the retrieval gain, loss on the passage's first reading minus loss on its copy"
        " (nats per character), and a precondition asks that there is retrieval to lose. Needs"
        " the text: `--set data.path=.../tinyshakespeare/input.txt`.",
    ),
    Reproduction(
        name="stochastic-m-text",
        claim="training with a random long-term delay m extrapolates much better than a fixed m,"
        " at no cost at the training length",
        source="v2 paper, Table 12 (MM v2 small: +15.8 points at 32k, +1.4 at 4k)",
        scale="cpu",
        runs=(
            Run(name="random-m", experiment="mm2-char-small"),
            Run(
                name="fixed-m",
                experiment="mm2-char-small",
                overrides=("model.long_term_delay_range=[16,16]",),
            ),
        ),
        evaluations=(
            Evaluation(task="perplexity", settings=_SHORT_TEXT),
            Evaluation(task="copy", settings=("copy.lengths=[256,512,1024,2048]",)),
        ),
        checks=(
            Check(
                description="retrieval is not at its ceiling at 8x: the better variant's loss on"
                " the copy at 2048 is above 0.1 nats per character",
                left=_at("random-m", "copy", "loss_copy", length=2048),
                op=">=",
                right=0.1,
                precondition=True,
            ),
            Check(
                description="there is retrieval at 1x: random m's copy gain at 256 is at least"
                " 0.05 nats per character",
                left=_at("random-m", "copy", "retrieval_gain", length=256),
                op=">=",
                right=0.05,
                precondition=True,
            ),
            Check(
                description="random m retrieves at least a quarter more at 8x (the copy's gain at"
                " 2048)",
                left=_at("random-m", "copy", "retrieval_gain", length=2048),
                op=">=",
                right=_at("fixed-m", "copy", "retrieval_gain", length=2048),
                scale=1.25,
            ),
            Check(
                description="at no cost at 1x: the short-context loss within 2% of fixed m's",
                left=_at("random-m", "perplexity", "loss", length=256),
                op="<=",
                right=_at("fixed-m", "perplexity", "loss", length=256),
                scale=1.02,
            ),
        ),
        sweep=Sweep(runs=("random-m", "fixed-m"), **_LR_SWEEP),
        paper=(
            PaperNumber(what="fixed m at 8x (32k), RULER QA", value=15.9),
            PaperNumber(what="random m at 8x (32k), RULER QA", value=31.7),
        ),
        equal_params=(("random-m", "fixed-m"),),
        seeds=3,
        first_seed=_FRESH,
        notes="Redesign of `stochastic-m`, whose induction task was at the ceiling for both"
        " variants (an exact-match key, which any bandwidth finds): retrieval is now of text, a"
        " passage of the validation tail read twice, measured by the copy's retrieval gain (loss"
        " on the first reading minus loss on the copy), 1x to 8x the training context of 256. m"
        " is drawn from [16, 64] at every step or fixed at 16 (both infer at 16). Needs the"
        " text: `--set data.path=.../tinyshakespeare/input.txt`. The preconditions are on"
        " random m, the variant the paper finds better.",
    ),
    Reproduction(
        name="extrapolation-needles",
        claim="trained at one context, Memory Mosaics v2 keeps retrieving far beyond it without"
        " fine-tuning; the Transformer fails past its training length",
        source="v2 paper (NeurIPS 2025), Table 3 (trained at 4k, evaluated to 32k)",
        scale="cpu",
        runs=(
            Run(name="mm2", experiment="mm2-recall-cpu", overrides=_NEEDLES),
            Run(name="llama", experiment="llama-recall-cpu", overrides=_NEEDLES),
        ),
        evaluations=(
            Evaluation(task=TRAINING),
            Evaluation(task="synthetic", settings=(f"synthetic.lengths={list(_NEEDLES_LENGTHS)}",)),
        ),
        checks=(
            Check(
                description="v2 learnt the task at 1x: accuracy >= 0.9",
                left=_at("mm2", "synthetic", "accuracy", length=64),
                op=">=",
                right=0.9,
                precondition=True,
            ),
            Check(
                description="the Transformer learnt the task at 1x: accuracy >= 0.9",
                left=_at("llama", "synthetic", "accuracy", length=64),
                op=">=",
                right=0.9,
                precondition=True,
            ),
            Check(
                description="v2 keeps at least half of its accuracy at 8x",
                left=_at("mm2", "synthetic", "accuracy", length=512),
                op=">=",
                right=_at("mm2", "synthetic", "accuracy", length=64),
                scale=0.5,
            ),
            Check(
                description="the Transformer loses at least 3/4 of it at 8x",
                left=_at("llama", "synthetic", "accuracy", length=512),
                op="<=",
                right=_at("llama", "synthetic", "accuracy", length=64),
                scale=0.25,
            ),
        ),
        sweep=Sweep(runs=("mm2", "llama"), **_NEEDLES_SWEEP),
        paper=_table_3(trained=64),
        equal_params=(("mm2", "llama"),),
        first_seed=_FRESH,
        notes="Redesign of `extrapolation`, whose Transformer never learnt the induction task at"
        " its training length (256 symbols, context 256): 8 keys, each once in a context of noise"
        " from the other 56 symbols, recalled at the end (`synthetic_needles`), trained at 64"
        " tokens and evaluated at 64 to 1024, where the keys stay unambiguous (the induction"
        " task's symbols repeat past the vocabulary). Pilots (seed 0, lr 3e-3, checked at 1x only,"
        " never at the evaluation's lengths) chose the task and the budget. Accuracies in [0, 1],"
        " the paper's RULER scores in [0, 100].",
    ),
)
