"""Frozen dataclass configs: models of every family, data, training recipe, experiment.

Configs are plain data. They never import models, training or data code, so experiment files and
checkpoints can carry them around freely. Every choice the papers leave open is a field here whose
docstring says ASSUMED (listed in docs/design.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, ClassVar, Literal

Dtype = Literal["float32", "bfloat16"]
# The names `kernels_pallas.retrieve` takes: its ALIASES and IMPLEMENTATIONS (a test keeps them so).
RetrieveImpl = Literal[
    "auto", "pallas", "reference", "xla", "pallas_tpu", "pallas_gpu", "pallas_mosaic_gpu", "shift"
]
# What a rematerialised block keeps for its backward pass; the rest is recomputed there
# (`mosaics_jax.model.lm.REMAT_POLICIES` says what each saves and recomputes).
RematPolicy = Literal["none", "full", "save_retrieval", "save_dots", "save_dots_and_retrieval"]
# (logical axis name, mesh axes): a parameter or activation dimension with that logical name is
# sharded over those mesh axes (`mosaics_jax.sharding`).
AxisRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
# Seeds are in [0, SEED_LIMIT): a JAX key keeps a seed's low 32 bits (-1 draws what 2**32 - 1
# does, 2**32 what 0 does), and numpy's legacy seeding refuses the rest.
SEED_LIMIT = 2**32


class ConfigError(ValueError):
  """A config field or override that does not exist or does not fit."""


def check_types(config: Any) -> None:
  """Raises ConfigError naming the first field whose value does not fit its annotation.

  Booleans are not ints, ints are valid floats, lists are not tuples (JSON lists become tuples in
  `from_dict` and `overrides.parse_value` before they get here).
  """
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    value, hint = getattr(config, field.name), hints[field.name]
    if not _fits(value, hint):
      raise ConfigError(
          f"{type(config).__name__}.{field.name} must be {_describe(hint)}, got {value!r}"
          f" ({type(value).__name__})"
      )


def _fits(value: Any, hint: Any) -> bool:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is Any:
    return True
  if hint is type(None):
    return value is None
  if origin is Literal:
    return any(type(value) is type(a) and value == a for a in args)
  if origin in (typing.Union, types.UnionType):
    return any(_fits(value, a) for a in args)
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if origin is tuple:
    if not isinstance(value, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_fits(v, args[0]) for v in value)
    return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
  return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
  """The type of a field in words: "an int", "one of 'float32', 'bfloat16'", ..."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is type(None):
    return "null"
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in args)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_describe(a) for a in args)
  if origin is tuple:
    if len(args) == 2 and args[1] is Ellipsis:
      return f"a list of ({_describe(args[0])})"
    return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
  names = {bool: "a bool (true or false)", int: "an int", float: "a number", str: "a string"}
  return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


class _Typed:
  """Checks every field against its annotation on construction (`check_types`)."""

  def __post_init__(self):
    check_types(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(_Typed):
  """Fields every model family shares."""

  family: ClassVar[str] = ""
  # Fields that neither shape nor give meaning to the parameters: a fine-tune may change them
  # (`fine_tune_mismatch`). Each family adds its own.
  runtime_fields: ClassVar[tuple[str, ...]] = (
      "dtype",
      "remat",
      "remat_policy",
      "scan_layers",
      "dropout",
      "retrieve_impl",
      "scan_impl",
      "scan_chunk_size",
  )

  vocab_size: int
  num_layers: int
  width: int
  num_heads: int
  dtype: Dtype = "float32"  # Compute dtype; parameters stay float32.
  remat: bool = False  # An alias of remat_policy="full" (with remat_policy "none" or "full").
  remat_policy: RematPolicy = "none"  # What each block keeps for its backward pass.
  # One traced block under `nn.scan`, its parameters (and decode caches) stacked on a leading
  # "layers" axis: XLA compiles one block instead of num_layers. Weights readers convert between
  # the two layouts (`families.to_layout`).
  scan_layers: bool = False
  dropout: float = 0.0  # On the embedding output and on every residual branch.
  retrieve_impl: RetrieveImpl = "auto"  # Implementation of kernels_pallas.retrieve.
  # Implementation of kernels_pallas.linear_scan (key recurrences).
  scan_impl: Literal["associative", "chunked"] = "chunked"
  # Steps per chunk of the chunked scan. On CPU 16 is the fastest (v1 at nanoGPT's size, forward
  # and backward of one layer's keys: 207 ms, 255 at 32, 361 at 64, associative 228).
  scan_chunk_size: int = 16

  def __post_init__(self):
    super().__post_init__()
    for name in ("vocab_size", "num_layers", "width", "num_heads", "scan_chunk_size"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")
    if self.width % self.num_heads:
      raise ConfigError(
          f"{type(self).__name__}: width {self.width} is not divisible by num_heads"
          f" {self.num_heads}"
      )
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
    if self.remat and self.remat_policy not in ("none", "full"):
      raise ConfigError(
          f"{type(self).__name__}: remat=true is an alias of remat_policy 'full', which conflicts"
          f" with remat_policy {self.remat_policy!r}; set remat=false to use {self.remat_policy!r}"
      )

  @property
  def effective_remat_policy(self) -> str:
    """remat_policy, with remat=true meaning "full"."""
    return "full" if self.remat else self.remat_policy

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicV1Config(ModelConfig):
  """Memory Mosaics v1, numerically as the official nanoMosaics `MemoryMosaic` (design.md, "v1").

  Field names follow nanoMosaics' `MemoryMosaicConfig` where one exists: block_size, pmem_size,
  pmem_count, bias.
  """

  family: ClassVar[str] = "mm1"
  runtime_fields: ClassVar[tuple[str, ...]] = (*ModelConfig.runtime_fields, "block_size")

  block_size: int = 1024  # Longest sequence; nanoMosaics refuses longer inputs.
  pmem_size: int = 2688  # Key/value pairs per persistent memory and head.
  pmem_count: int = 1  # Persistent memories per head, averaged.
  bias: bool = True  # Biases in Linears and LayerNorms, like GPT-2.
  layer_norm_eps: float = 1e-5
  feature_eps: float = 1e-10  # eps of Norm(z) = z / (||z|| + eps).
  exp_scaling: float = 10.0  # Scalar parameters are stored divided by this.
  key_scale_max: float = math.log(2**16 - 1)  # Keys stay representable in float16.
  leaky_init: tuple[float, float] = (0.5, 5.0)  # linspace range of |b| * exp_scaling over heads.
  key_scale_init: float = 0.1
  val_scale_init: float = -0.05
  out_scale_init: float = -0.05
  init_std: float = 0.02  # Linears and embedding; c_proj gets init_std / sqrt(2 L).


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicV1LibraryConfig(ModelConfig):
  """Memory Mosaics v1 as the official `Library/` package's `StackAssoMem`, the model of the v1
  paper's BabiStories and RegBench runs (design.md, "v1, Library variant").

  Field names and defaults are `StackAssoMem.__init__`'s; the fields after `attn_only` are values
  the Library hard-codes. Its `dropout` is ic_dropout (on the memories' attention weights) and
  hd_dropout (on each memory's output): the shared `dropout` field must stay 0.
  """

  family: ClassVar[str] = "mm1-library"
  runtime_fields: ClassVar[tuple[str, ...]] = (
      *ModelConfig.runtime_fields,
      "block_size",
      "ic_dropout",
      "hd_dropout",
  )

  block_size: int = 512  # Longest sequence; the Library's masks have this size.
  v_shift: int = 1  # Values look v_shift steps ahead; queries read pairs s <= t - v_shift.
  # Key and value feature extractors: a causal Conv1d of the kernel size ("linearconv"), or a
  # per-head mix of a projection at t and t + shift ("lowrlinearconv", kernel size 2 only).
  k_fe_type: Literal["linearconv", "lowrlinearconv"] = "linearconv"
  v_fe_type: Literal["linearconv", "lowrlinearconv"] = "lowrlinearconv"
  k_kernel_size: int = 1
  v_kernel_size: int = 2
  ic_dropout: float = 0.05
  hd_dropout: float = 0.05
  bias: bool = False  # Biases in the Linears, convolutions and LayerNorms.
  pmem_count: int = 1  # Persistent memories per head, averaged.
  pmem_size: int = 2688  # Key/value pairs per persistent memory and head.
  pre_ln: bool = True  # False: post-LayerNorm blocks, x = LN(x); x += memory(x).
  weight_tying: bool = True  # The classifier is the embedding.
  skip_tokens: int = 0  # The Library drops the first tokens' logits from its loss.
  attn_only: bool = False  # Blocks without the persistent memory.
  layer_norm_eps: float = 1e-5
  exp_scaling: float = 10.0  # Scalar parameters are stored divided by this.
  kernel_beta_max: float = 5.0  # The key scale's log, exp_scaling * kernel_beta, is clamped here.
  kernel_beta_init: float = 0.1
  value_beta_init: float = -0.05
  leaky_init: tuple[float, float] = (0.5, 5.0)  # linspace range of |b| * exp_scaling over heads.

  def __post_init__(self):
    super().__post_init__()
    name = type(self).__name__
    if self.dropout:
      raise ConfigError(
          f"{name}.dropout must be 0, got {self.dropout}: the Library's dropouts are ic_dropout"
          " and hd_dropout"
      )
    for field in ("ic_dropout", "hd_dropout"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ConfigError(f"{name}.{field} must be in [0, 1), got {getattr(self, field)}")
    for field in ("block_size", "k_kernel_size", "v_kernel_size", "pmem_count", "pmem_size"):
      if getattr(self, field) < 1:
        raise ConfigError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
    if self.v_shift < 0:
      raise ConfigError(f"{name}.v_shift must be >= 0, got {self.v_shift}")
    for kind in ("k", "v"):
      fe_type, size = getattr(self, f"{kind}_fe_type"), getattr(self, f"{kind}_kernel_size")
      if fe_type == "lowrlinearconv" and size != 2:
        raise ConfigError(
            f"{name}: {kind}_fe_type 'lowrlinearconv' needs {kind}_kernel_size 2, got {size}"
        )
    if self.skip_tokens:
      raise ConfigError(
          f"{name}.skip_tokens must be 0, got {self.skip_tokens}: our losses and evaluations"
          " read every position's logits"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicV2Config(ModelConfig):
  """Memory Mosaics v2 (design.md, "v2"): short-term, long-term and persistent (SwiGLU) memories."""

  family: ClassVar[str] = "mm2"
  runtime_fields: ClassVar[tuple[str, ...]] = (
      *ModelConfig.runtime_fields,
      "long_term_delay",
      "long_term_delay_range",
      "drop_long_term_memory",
      "long_term_select_blocks",
      "long_term_select_block_size",
      "long_term_select_recent",
      "long_term_select_summary",
  )

  ffn_width: int  # d' of the SwiGLU persistent memory.
  short_term_window: int = 256  # h: the short-term memory reads pairs t-h+1 .. t-1.
  long_term_memory: bool = True  # False: the variant without long-term memory (W_o is d -> d).
  # Keep the long-term parameters but zero its output: the paper's Table 2 ablation of a model
  # trained with long-term memory.
  drop_long_term_memory: bool = False
  long_term_delay: int = 64  # m at inference.
  # m is sampled uniformly from this closed range at every training step (one m per step: ASSUMED).
  long_term_delay_range: tuple[int, int] = (64, 256)
  norm_eps: float = 1e-5  # RMSNorm eps (ASSUMED, Llama's).
  feature_eps: float = 1e-6  # eps of Norm(z) = z / (||z|| + eps) (ASSUMED).
  gate_bias: bool = False  # ASSUMED: w_g and w_lambda are one d-vector per head, no bias.
  value_scale_init: float = 0.0  # theta of alpha_psi = exp(min(|theta|, value_scale_max)).
  value_scale_max: float = 15.0
  bandwidth_init: tuple[float, float, float] = (1.5, 1.5, 1.0 / 3.0)  # theta0, theta1, theta_a.
  bandwidth_max: float = 10.0  # beta0, beta1 = exp(min(theta, bandwidth_max)).
  # Block selection in the long-term memory (not in the papers; design.md, "Block selection"):
  # 0 reads every pair. K > 0: each query reads its long_term_select_recent newest blocks of
  # long_term_select_block_size pairs and the K older blocks whose summary ("mean" of the keys,
  # or the channel-wise "bound" of q . k) scores highest against it.
  long_term_select_blocks: int = 0
  long_term_select_block_size: int = 64
  long_term_select_recent: int = 1
  long_term_select_summary: Literal["mean", "bound"] = "mean"

  def __post_init__(self):
    super().__post_init__()
    if self.short_term_window < 2:
      raise ConfigError(f"short_term_window must be >= 2, got {self.short_term_window}")
    low, high = self.long_term_delay_range
    if not 1 <= low <= high:
      raise ConfigError(f"long_term_delay_range must satisfy 1 <= low <= high, got {low, high}")
    if self.long_term_delay < 1:
      raise ConfigError(f"long_term_delay must be >= 1, got {self.long_term_delay}")
    if self.drop_long_term_memory and not self.long_term_memory:
      raise ConfigError("drop_long_term_memory needs long_term_memory=True")
    if self.long_term_select_blocks < 0:
      raise ConfigError(
          f"long_term_select_blocks must be >= 0 (0: read every pair), got "
          f"{self.long_term_select_blocks}"
      )
    if self.long_term_select_blocks and not self.long_term_memory:
      raise ConfigError("long_term_select_blocks needs long_term_memory=True")
    if self.long_term_select_block_size < 1:
      raise ConfigError(
          f"long_term_select_block_size must be >= 1, got {self.long_term_select_block_size}"
      )
    if self.long_term_select_recent < 1:
      raise ConfigError(
          f"long_term_select_recent must be >= 1 (the partly filled newest block cannot be "
          f"scored), got {self.long_term_select_recent}"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
  """The Transformer baseline of the v2 paper: Llama with full multi-head attention (no GQA)."""

  family: ClassVar[str] = "llama"

  ffn_width: int
  rope_theta: float = 500_000.0  # ASSUMED: Llama 3's, as the 128256 vocabulary is Llama 3's.
  norm_eps: float = 1e-5  # ASSUMED, Llama's.


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(ModelConfig):
  """The Transformer baseline of the v1 paper: nanoGPT's GPT-2 (nanoMosaics' `gpt_model.GPT`).

  Field names follow nanoGPT's `GPTConfig` where one exists: block_size, bias. The MLP is 4 x width
  wide, as nanoGPT's.
  """

  family: ClassVar[str] = "gpt2"

  # Rows of the learned position embedding: the longest sequence, which no setting extends.
  block_size: int = 1024
  bias: bool = True  # Biases in Linears and LayerNorms, like GPT-2.
  layer_norm_eps: float = 1e-5
  init_std: float = 0.02  # Linears and embeddings; c_proj gets init_std / sqrt(2 L).

  def __post_init__(self):
    super().__post_init__()
    if self.block_size < 1:
      raise ConfigError(f"GPT2Config.block_size must be >= 1, got {self.block_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContextMemoryConfig(_Typed):
  """The v1 paper's one-layer context memory on continuous inputs (the three moons, section 3;
  `mosaics_jax.model.context_memory`). Field names follow the official `ThreeMoons` config.

  Not a language-model family (no vocabulary, tokens or cache): `MoonsExperiment` trains it.
  """

  input_dim: int = 6
  n_head: int = 1
  h_dim: int = 6
  complex: bool = True  # Complex-structured linear maps (2 x 2 blocks [[a, b], [-b, a]]).
  attn_scale: float = 50.0  # The keys' bandwidth: softmax(attn_scale * k_t . k_s).
  out_proj: bool = True  # A learned output projection; without it the heads' outputs concatenate.
  retrieve_impl: RetrieveImpl = "auto"  # Implementation of kernels_pallas.retrieve.
  # Its time block: 64 is the fastest on CPU at the paper's 800 steps (1.27 s for the gradient of
  # 3 heads of dim 2 at batch 64; 1.69 at 32, 1.60 at 100, 2.21 at the default).
  retrieve_block_size: int | None = 64

  def __post_init__(self):
    super().__post_init__()
    for name in ("input_dim", "n_head", "h_dim"):
      if getattr(self, name) < 1:
        raise ConfigError(f"ContextMemoryConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.complex and (self.input_dim % 2 or self.h_dim % 2):
      raise ConfigError(
          f"ContextMemoryConfig: complex maps need even input_dim and h_dim, got"
          f" {self.input_dim} and {self.h_dim}"
      )
    if not self.out_proj and self.n_head * self.h_dim != self.input_dim:
      raise ConfigError(
          f"ContextMemoryConfig: without out_proj, n_head * h_dim ({self.n_head * self.h_dim})"
          f" must equal input_dim ({self.input_dim})"
      )

  @property
  def params(self) -> int:
    """Stored parameters: the key, value and output matrices."""
    width = self.n_head * self.h_dim
    return (2 + self.out_proj) * width * self.input_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoonsData(_Typed):
  """The three moons' sequences (`mosaics_jax.moons.Moons`)."""

  seq_len: int = 800  # Steps per sequence (the official block_size).
  min_periods_in_block_size: int = 3  # Joint periods of the slowest combination in a sequence.
  observer: Literal["sun", "planet"] = "sun"

  def __post_init__(self):
    super().__post_init__()
    for name in ("seq_len", "min_periods_in_block_size"):
      if getattr(self, name) < 1:
        raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoonsTrain(_Typed):
  """The official recipe: AdamW, the learning rate linear from `learning_rate` to
  `final_learning_rate`, the loss the mean of clip(prediction - target, -clip, clip) ** 2."""

  batch_size: int = 64
  steps: int = 500
  learning_rate: float = 1e-2
  final_learning_rate: float = 5e-6
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  clip: float = 0.5
  seed: int = 0  # Parameters and data.
  log_every: int = 10
  checkpoint_every: int = 100

  def __post_init__(self):
    super().__post_init__()
    for name in ("batch_size", "steps", "log_every", "checkpoint_every"):
      if getattr(self, name) < 1:
        raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.seed < SEED_LIMIT:
      raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoonsExperiment(_Typed):
  """A context memory trained on the three moons with the v1 paper's recipe (the official
  `train_planets-*.py`; `mosaics_jax.train.moons`). Shaped as `Experiment` (model, data, train),
  so that a reproduction plans and runs it as one."""

  name: str
  description: str
  model: ContextMemoryConfig
  data: MoonsData = MoonsData()
  train: MoonsTrain = MoonsTrain()


MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    cls.family: cls
    for cls in (MosaicV1Config, MosaicV1LibraryConfig, MosaicV2Config, LlamaConfig, GPT2Config)
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(_Typed):
  """What the model reads (`mosaics_jax.data` builds the Grain pipelines)."""

  # synthetic_induction: "... a b ... a -> b"; synthetic_mqar: multi-query associative recall;
  # synthetic_needles: task_pairs keys hidden once each in noise, then recalled;
  # regbench: strings of random regular languages, learnt in context (`mosaics_jax.regbench`);
  # text: a UTF-8 file and a tokenizer; tokens: a flat binary file of token ids (nanoGPT's .bin);
  # icl_bursty: bursty few-shot classification text in icl_classification's format, in bytes
  # (`mosaics_jax.icl_data`).
  source: Literal[
      "synthetic_induction",
      "synthetic_mqar",
      "synthetic_needles",
      "regbench",
      "text",
      "tokens",
      "icl_bursty",
  ] = "synthetic_induction"
  name: str = ""  # Human-readable dataset name, e.g. "BabiStories".
  path: str | None = None  # The text or token file.
  # For text: "char" (the file's distinct characters), "byte" (256 ids), or "hf" (a Hugging Face
  # tokenizers JSON at tokenizer_path). Token files are already tokenised: "none".
  tokenizer: Literal["char", "byte", "hf", "none"] = "none"
  tokenizer_path: str | None = None
  token_dtype: Literal["uint16", "uint32"] = "uint16"  # Of token files.
  # End-of-text id: it closes a document, so packed sequences get segment ids (document masks).
  eot_id: int | None = None
  seq_len: int = 256  # Training context.
  val_fraction: float = 0.1  # The file's tail is the validation split.
  # Synthetic tasks: the number of distinct symbols, and key-value pairs per MQAR or needles
  # sequence.
  task_vocab: int = 64
  task_pairs: int = 8
  # RegBench: the training languages, one fixed sequence each (seq_icl's num_examples, 5000 in its
  # icl_dfa.yaml; its sweeps use 2500 to 40000), and the longest string (seq_icl draws lengths
  # with rng.integers(1, max_len_per_example = 50), so 49).
  regbench_languages: int = 5000
  regbench_max_string: int = 49
  # icl_bursty: the training classes (made-up words, none of the evaluation's), the classes of a
  # sequence (the evaluation's num_classes=4), and the share of sequences whose labels are
  # anonymous names (class_00, ...) by a permutation drawn per sequence, the others' the classes'
  # names. ASSUMED: a pool too large to learn by heart in a CPU budget, so that labelling a class
  # takes the sequence's examples (Chan et al. 2022: many rare classes favour in-context learning);
  # half the sequences anonymous, as the evaluation scores both kinds.
  icl_pool: int = 1024
  icl_ways: int = 4
  icl_anonymous: float = 0.5
  # Cut each batch after its last target that counts, rounded up to a multiple of this many
  # positions (0: never); rows padded to seq_len (RegBench's) then cost what they hold
  # (design.md, "Trimmed batches"). One process only: processes' batches must agree on a length.
  trim_padding: int = 0

  def __post_init__(self):
    super().__post_init__()
    if self.seq_len < 2:
      raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
    if self.trim_padding < 0:
      raise ConfigError(f"data.trim_padding must be >= 0, got {self.trim_padding}")
    for name in ("regbench_languages", "regbench_max_string"):
      if getattr(self, name) < 1:
        raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 < self.val_fraction < 1.0:
      raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
    if not 2 <= self.icl_ways <= self.icl_pool:
      raise ConfigError(
          f"data.icl_ways must be in [2, data.icl_pool], got {self.icl_ways} and icl_pool"
          f" {self.icl_pool}"
      )
    if not 0.0 <= self.icl_anonymous <= 1.0:
      raise ConfigError(f"data.icl_anonymous must be in [0, 1], got {self.icl_anonymous}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(_Typed):
  """The optimisation recipe (design.md, "Training recipe") and the run's bookkeeping."""

  batch_size: int = 8  # Sequences per optimizer step, over all processes.
  steps: int = 1000  # Optimizer steps.
  learning_rate: float = 1e-3  # Peak.
  warmup_steps: int = 100  # Linear warm-up from 0, then cosine decay.
  min_lr_ratio: float = 0.01  # Cosine decay ends at learning_rate * min_lr_ratio.
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1  # Decoupled (AdamW), on matrices only: not on norms, biases, scalars.
  grad_clip: float = 1.0  # Global norm.
  grad_accum: int = 1  # Micro-batches per step; batch_size must be a multiple.
  # Tokens per chunk of the sequence in the train step's loss: the output layer, cross-entropy and
  # accuracy run chunk by chunk, recomputed in the backward, never holding [batch, seq, vocab]
  # logits (`train.step`); 0: the whole sequence's logits at once. A chunk of seq_len or more is
  # one chunk of the whole sequence: today's values, the logits recomputed rather than kept.
  loss_chunk: int = 0
  seed: int = 0  # Parameters, data order, dropout and the long-term delays all derive from it.
  tokens: int | None = None  # Token budget of the paper run, for the record.
  log_every: int = 10
  eval_every: int = 250
  eval_batches: int = 10  # Validation batches per evaluation.
  checkpoint_every: int = 500
  keep_checkpoints: int = 3

  def __post_init__(self):
    super().__post_init__()
    for name in (
        "batch_size",
        "steps",
        "grad_accum",
        "log_every",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "keep_checkpoints",
    ):
      if getattr(self, name) < 1:
        raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.seed < SEED_LIMIT:
      raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}")
    if self.loss_chunk < 0:
      raise ConfigError(f"train.loss_chunk must be >= 0 (0: no chunks), got {self.loss_chunk}")
    if self.batch_size % self.grad_accum:
      raise ConfigError(
          f"train.batch_size {self.batch_size} is not a multiple of train.grad_accum"
          f" {self.grad_accum}"
      )


MESH_AXES = ("data", "fsdp", "tensor")

# Earlier rules take precedence, and a mesh axis shards at most one dimension of an array: the
# activations' batch takes fsdp, so their embed dimension stays whole while the parameters' is
# sharded (FSDP). Memory heads are independent, so heads over tensor need no communication in
# retrieval. Logical names without a rule (length, kv, norm, pairs, pmem) are replicated.
DEFAULT_AXIS_RULES: AxisRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(_Typed):
  """The device mesh (axes data, fsdp, tensor) and how logical axes map onto it.

  Sizes are devices per slice; at most one of data, fsdp, tensor may be -1 ("the rest"). The
  default puts every device on data, so one device trains exactly as without a mesh. dcn_data and
  dcn_fsdp multiply the data and fsdp axes across the slices of a multi-slice pod.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  rules: AxisRules = DEFAULT_AXIS_RULES

  def __post_init__(self):
    super().__post_init__()
    for name in ("data", "fsdp", "tensor"):
      if getattr(self, name) < 1 and getattr(self, name) != -1:
        raise ConfigError(f"mesh.{name} must be >= 1 or -1 (the rest), got {getattr(self, name)}")
    for name in ("dcn_data", "dcn_fsdp"):
      if getattr(self, name) < 1:
        raise ConfigError(f"mesh.{name} must be >= 1, got {getattr(self, name)}")
    for rule in self.rules:
      if len(rule) != 2 or not isinstance(rule[0], str):
        raise ConfigError(f"mesh.rules holds (logical name, mesh axes) pairs, got {rule!r}")
      axes = (rule[1],) if isinstance(rule[1], str) or rule[1] is None else rule[1]
      unknown = [a for a in axes if a is not None and a not in MESH_AXES]
      if unknown:
        raise ConfigError(
            f"mesh.rules: {rule[0]!r} maps to unknown mesh axes {unknown}; known: {MESH_AXES}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment(_Typed):
  """A model size paired with a dataset and a training recipe."""

  name: str
  description: str
  model: ModelConfig
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  # The name of the experiment this one fine-tunes from (e.g. the 32k context extension).
  init_from: str | None = None

  def check_lengths(self) -> None:
    """ConfigError if the training sequences are longer than the model takes (v1's block_size).

    Not checked on construction: `--set data.seq_len=4096 model.block_size=4096` passes through
    an experiment that has one and not yet the other (`overrides.apply` checks at the end).
    """
    block_size = getattr(self.model, "block_size", None)
    if block_size is not None and self.data.seq_len > block_size:
      raise ConfigError(
          f"data.seq_len {self.data.seq_len} exceeds model.block_size {block_size}, the longest"
          " sequence the model takes: set model.block_size too"
      )


def fine_tune_mismatch(source: ModelConfig, target: ModelConfig) -> list[str]:
  """What differs between a model and one fine-tuned from it, beyond `runtime_fields` (context
  length, dropout, retrieval settings): [] when the parameters carry over."""
  if source.family != target.family:
    return [f"family: {source.family!r} there, {target.family!r} here"]
  a, b = to_dict(source), to_dict(target)
  return [
      f"{key}: {a[key]!r} there, {b[key]!r} here"
      for key in sorted(a)
      if key not in target.runtime_fields and a[key] != b[key]
  ]


def to_dict(config: Any) -> dict[str, Any]:
  """A JSON-ready dict of a config, models tagged with their family."""
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      value = to_dict(value)
      if isinstance(getattr(config, field.name), ModelConfig):
        value = {"family": getattr(config, field.name).family, **value}
    elif isinstance(value, tuple):
      value = _to_lists(value)
    out[field.name] = value
  return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
  """Inverse of `to_dict`; unknown keys are errors that name close matches."""
  if cls is ModelConfig:
    data = dict(data)
    family = data.pop("family", None)
    if family not in MODEL_CONFIGS:
      raise ConfigError(f"unknown model family {family!r}; known: {sorted(MODEL_CONFIGS)}")
    cls = MODEL_CONFIGS[family]
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  kwargs = {}
  for key, value in data.items():
    if key not in fields:
      raise ConfigError(unknown_key(key, fields, cls.__name__))
    hint = hints[key]
    if hint is ModelConfig or (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
      value = from_dict(hint, value)
    elif isinstance(value, list):
      value = to_tuples(value)
    kwargs[key] = value
  return cls(**kwargs)


def to_tuples(value: Any) -> Any:
  """Nested lists (from JSON) as nested tuples, the configs' immutable sequences."""
  return tuple(to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _to_lists(value: Any) -> Any:
  return [_to_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def unknown_key(key: str, known: Any, where: str) -> str:
  """The message of an unknown key, with the closest known names."""
  close = difflib.get_close_matches(key.split(".")[0], sorted(known), n=3)
  hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(known))}"
  return f"unknown key {key!r} in {where}{hint}"
