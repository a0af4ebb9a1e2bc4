"""Hugging Face transformers' format: `to_hf` writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` reads, `from_hf` reads one into an export.

    mosaics-port to-hf runs/llama hf-llama/       # -> LlamaForCausalLM, no remote code
    mosaics-port from-hf hf-llama/ exported/      # and back

What each family becomes:
- llama: a native `LlamaForCausalLM` (config.json of model_type "llama", written by transformers'
  own `LlamaConfig`). Our RoPE rotates the two halves of each head, as transformers' does
  (`rotate_half`), with the same frequencies theta^(-2i/d), so q and k rows keep their order.
  RMSNorm is x / sqrt(mean(x^2) + eps) * w in both. Positions are those of one document: our
  RoPE at positions inside each document of a packed row has no counterpart in the config
  (transformers takes such positions as `position_ids` with a block-diagonal mask at call time).
  Our RoPE has no longest input; max_position_embeddings, which lm-eval and `generate` read as the
  context length, is MAX_POSITIONS.
- gpt2: a native `GPT2LMHeadModel`: the same names as nanoGPT's, Linear weights transposed to
  Conv1D's [in, out], "gelu" (exact, erf) as ours, n_positions = block_size, tied lm_head. A model
  without biases (bias=False) gets zero biases, which compute exactly the same.
- mm1, mm1-library, mm2: transformers has no such model: config.json, the weights and our own
  modeling code (`hf_remote`), loaded with `trust_remote_code=True`.
The tokenizer goes as Hugging Face's tokenizer files (`tokenizers.save`), and generation_config.json
has no special tokens: our tokenizers have none. So lm-eval's `hf` model, which conditions empty
contexts on a BOS or EOS token, needs `prefix_token_id=ID` in its model_args: the newline's id
matches what `mosaics-lm-eval` takes. A dropout is not exported (warned): transformers' Llama has
none on the residual branches, and it only matters to a fine-tune.

`from_hf` reads a `LlamaForCausalLM` or `GPT2LMHeadModel` directory, or one that `to_hf` wrote,
from safetensors weights only (model.safetensors, or shards listed in
model.safetensors.index.json): a pickle (pytorch_model.bin) can run code when read, and is refused.
What our models cannot express is refused by name (grouped-query attention, RoPE scaling, biases in
Llama, other activations, untied GPT-2 heads...). A tied Llama (tie_word_embeddings) is read with
its embedding copied into our untied classifier: the same function, whose two copies a fine-tune
then trains apart.

Both directions write as `pretrained` exports do: nothing overwritten unasked, never into a
workdir or the source, staged and renamed into place (`pretrained.check_output`,
`pretrained.staging`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from mosaics_jax import checkpoints, config as config_lib, tokenizers
from mosaics_jax.port import hf_remote, layout, pretrained

CONFIG_FILE = checkpoints.CONFIG_FILE
GENERATION_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
# What `to_hf` writes (the code files for the Memory Mosaics only); a forced one replaces these.
FILES = (
    pretrained.WEIGHTS_FILE,
    GENERATION_FILE,
    *tokenizers.FILES,
    *(path.name for path in hf_remote.CODE_FILES),
    CONFIG_FILE,
)
# max_position_embeddings of a Llama export (Llama 3's context): our RoPE has no limit.
MAX_POSITIONS = 8192

# Our PyTorch names of a Llama layer's tensors (`layout`) -> transformers'.
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
_LLAMA_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "classifier.weight": "lm_head.weight",
}
# GPT-2's Linears, which transformers keeps as Conv1D: weights [in, out].
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> pretrained.Pretrained:
  """Writes the model of `source` (a workdir or an export) into the directory `out` in
  transformers' format (module docstring); returns the model.

  Raises:
    PortError: `out` may not be written (`pretrained.check_output`), or `source` holds no model
      this project can build (`pretrained.load`).
  """
  out = pathlib.Path(out)
  pretrained.check_output(out, source=source, force=force)
  model = pretrained.load(source, allow_nonfinite=allow_nonfinite)
  config, params = model.config, model.params
  import transformers  # pylint: disable=import-outside-toplevel

  with pretrained.staging(out, FILES) as staged:
    if config.family == "llama":
      _llama_config(config).save_pretrained(staged)
      _save_weights(staged, _llama_tensors(config, params))
    elif config.family == "gpt2":
      _gpt2_config(config).save_pretrained(staged)
      _save_weights(staged, _gpt2_tensors(config, params))
    else:
      hf_remote.save(staged, config, params)
    transformers.GenerationConfig(
        bos_token_id=None, eos_token_id=None, pad_token_id=None
    ).save_pretrained(staged)
    if model.tokenizer is not None:
      tokenizers.save(model.tokenizer, staged)
  return model


def _llama_config(config: config_lib.LlamaConfig) -> Any:
  """transformers' LlamaConfig of ours."""
  import transformers  # pylint: disable=import-outside-toplevel

  _warn_dropout(config, "LlamaConfig has only attention_dropout, which ours does not have")
  return transformers.LlamaConfig(
      architectures=["LlamaForCausalLM"],
      vocab_size=config.vocab_size,
      hidden_size=config.width,
      intermediate_size=config.ffn_width,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_heads,
      head_dim=config.head_dim,
      hidden_act="silu",
      max_position_embeddings=MAX_POSITIONS,
      rms_norm_eps=config.norm_eps,
      rope_theta=config.rope_theta,
      attention_bias=False,
      mlp_bias=False,
      tie_word_embeddings=False,
      bos_token_id=None,
      eos_token_id=None,
      pad_token_id=None,
      dtype="float32",
  )


def _gpt2_config(config: config_lib.GPT2Config) -> Any:
  """transformers' GPT2Config of ours: dropout everywhere ours has it."""
  import transformers  # pylint: disable=import-outside-toplevel

  return transformers.GPT2Config(
      architectures=["GPT2LMHeadModel"],
      vocab_size=config.vocab_size,
      n_positions=config.block_size,
      n_embd=config.width,
      n_layer=config.num_layers,
      n_head=config.num_heads,
      n_inner=None,  # 4 x n_embd, as ours.
      activation_function="gelu",  # Exact (erf), as ours; GPT-2's own "gelu_new" is tanh's.
      resid_pdrop=config.dropout,
      embd_pdrop=config.dropout,
      attn_pdrop=config.dropout,
      layer_norm_epsilon=config.layer_norm_eps,
      scale_attn_weights=True,
      scale_attn_by_inverse_layer_idx=False,
      tie_word_embeddings=True,
      bos_token_id=None,
      eos_token_id=None,
      pad_token_id=None,
      dtype="float32",
  )


def _warn_dropout(config: config_lib.ModelConfig, why: str) -> None:
  if config.dropout:
    warnings.warn(
        f"dropout {config.dropout} is not exported ({why}): a fine-tune in transformers trains"
        " without it",
        stacklevel=3,
    )


def _llama_name(ours: str) -> str:
  """transformers' name of a Llama tensor of ours."""
  if ours in _LLAMA_GLOBAL:
    return _LLAMA_GLOBAL[ours]
  index, rest = re.fullmatch(r"layer_(\d+)\.(.+)", ours).groups()
  return f"model.layers.{index}.{_LLAMA_LAYER[rest]}"


def _llama_tensors(config: config_lib.LlamaConfig, params: layout.Params) -> dict[str, np.ndarray]:
  # Both rotate the halves of each head (module docstring): no permutation of q and k rows.
  return {_llama_name(n): x for n, x in layout.to_torch(config, params).items()}


def _gpt2_tensors(config: config_lib.GPT2Config, params: layout.Params) -> dict[str, np.ndarray]:
  """transformers' GPT-2 tensors: ours (nanoGPT's names) with Conv1D weights, zero biases where
  ours has none, and no lm_head (tied)."""
  ours = layout.to_torch(config, params)
  tensors = {n: np.ascontiguousarray(x.T) if n.endswith(_CONV1D) else x for n, x in ours.items()}
  for name, x in ours.items():
    bias = name.removesuffix(".weight") + ".bias"
    if name.endswith(".weight") and ".wte." not in name and ".wpe." not in name:
      tensors.setdefault(bias, np.zeros(x.shape[0], np.float32))  # Linear [out, in], norm [d].
  return tensors


def _save_weights(directory: pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel

  path = directory / pretrained.WEIGHTS_FILE
  # transformers reads only files whose metadata say "pt".
  st_numpy.save_file(dict(tensors), path, metadata={"format": "pt"})
  path.chmod((directory / CONFIG_FILE).stat().st_mode)  # Not safetensors' 0600.


def from_hf(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    *,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> config_lib.ModelConfig:
  """Writes the model of the transformers directory `directory` (module docstring) as an export
  in `out`, with its tokenizer.json if it has one; returns its config.

  Raises:
    PortError: `out` may not be written, `directory` is no model this project can read (its
      model_type, an option ours cannot express, weights only in a pickle), or its weights do not
      fit its config (every missing, unexpected or mis-shaped tensor named).
  """
  directory = pathlib.Path(directory)
  pretrained.check_output(out, source=directory, force=force)
  hf_config = _read_config(directory)
  model_type = hf_config.get("model_type")
  if model_type == "llama":
    config, params = _from_llama(directory, _read_weights(directory), allow_nonfinite)
  elif model_type == "gpt2":
    config, params = _from_gpt2(directory, _read_weights(directory), allow_nonfinite)
  elif model_type == hf_remote.MODEL_TYPE:
    _refuse_pickles(directory)
    config, params = hf_remote.read(directory, allow_nonfinite=allow_nonfinite)
  else:
    raise layout.PortError(
        f"{directory / CONFIG_FILE}: model_type {model_type!r} is not one this project reads"
        f" (llama, gpt2, {hf_remote.MODEL_TYPE})"
    )
  try:
    tokenizer = tokenizers.load(directory)
  except ValueError as e:
    raise layout.PortError(str(e)) from None
  pretrained.save_exported(out, config, params, tokenizer=tokenizer, force=force)
  return config


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face model")
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise layout.PortError(f"{path} is not JSON: {e}") from None
  if not isinstance(saved, dict):
    raise layout.PortError(f"{path} holds a {type(saved).__name__}, not a JSON object")
  return saved


def _refuse_pickles(directory: pathlib.Path) -> None:
  if (directory / pretrained.WEIGHTS_FILE).is_file() or (directory / INDEX_FILE).is_file():
    return
  pickles = sorted(p.name for p in directory.glob("*.bin"))
  if pickles:
    raise layout.PortError(
        f"{directory} has its weights only in {', '.join(pickles)}, a pickle, which can run code"
        " when read: convert it to safetensors where you trust it, e.g."
        " `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)`, and read NEW_DIR"
    )
  raise FileNotFoundError(f"{directory} has neither {pretrained.WEIGHTS_FILE} nor {INDEX_FILE}")


def _read_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of model.safetensors, or of the shards that model.safetensors.index.json lists,
  in their stored dtypes (`pretrained.read_safetensors` refuses what is not a float)."""
  _refuse_pickles(directory)
  if (directory / pretrained.WEIGHTS_FILE).is_file():
    return pretrained.read_safetensors(directory / pretrained.WEIGHTS_FILE)[1]
  index = directory / INDEX_FILE
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise layout.PortError(f"{index} has no weight_map of tensor names to files: {e}") from None
  tensors = {}
  for shard in shards:
    path = directory / shard
    if path.resolve().parent != directory.resolve() or not path.is_file():
      raise layout.PortError(f"{index} names {shard!r}, which is no file of {directory}")
    tensors.update(pretrained.read_safetensors(path)[1])
  misplaced = sorted(n for n in set(weight_map) ^ set(tensors))
  if misplaced:
    raise layout.PortError(
        f"{index} and its shards disagree on these tensors: {', '.join(misplaced)}"
    )
  return tensors


def _refuse(directory: pathlib.Path, differing: Mapping[str, tuple[Any, str]]) -> None:
  """PortError naming each field of the config with a value ours cannot express, and why."""
  if differing:
    said = "; ".join(f"{field} {value!r}: {why}" for field, (value, why) in differing.items())
    raise layout.PortError(f"{directory / CONFIG_FILE}: ours cannot express {said}")


def _from_llama(
    directory: pathlib.Path, tensors: dict[str, np.ndarray], allow_nonfinite: bool
) -> tuple[config_lib.LlamaConfig, layout.Params]:
  import transformers  # pylint: disable=import-outside-toplevel

  # transformers' reader: the rope fields of each version (rope_theta, rope_scaling) as its own.
  hf = transformers.LlamaConfig.from_pretrained(directory)
  rope = dict(hf.rope_parameters or {})
  checks = {
      "num_key_value_heads": (
          hf.num_key_value_heads,
          hf.num_attention_heads,
          "grouped-query attention; our Llama has one key and value head per query head",
      ),
      "head_dim": (
          hf.head_dim,
          hf.hidden_size // hf.num_attention_heads,
          "heads of another width than hidden_size / num_attention_heads",
      ),
      "hidden_act": (hf.hidden_act, "silu", "our Llama's MLP is SwiGLU (silu)"),
      "attention_bias": (hf.attention_bias, False, "our Llama has no biases"),
      "mlp_bias": (hf.mlp_bias, False, "our Llama has no biases"),
      "rope_parameters": (
          rope.get("rope_type", "default"),
          "default",
          "RoPE scaling (rope_scaling); ours is plain RoPE",
      ),
  }
  _refuse(directory, {f: (v, why) for f, (v, want, why) in checks.items() if v != want})
  config = _config(
      config_lib.LlamaConfig,
      directory,
      vocab_size=hf.vocab_size,
      num_layers=hf.num_hidden_layers,
      width=hf.hidden_size,
      num_heads=hf.num_attention_heads,
      ffn_width=hf.intermediate_size,
      rope_theta=float(rope["rope_theta"]),
      norm_eps=float(hf.rms_norm_eps),
  )
  if hf.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
    # transformers ignores a tied lm_head.weight in the file, if there is one.
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    warnings.warn(
        f"{directory} ties lm_head to the embedding; ours has an untied classifier, which starts"
        " as a copy: the same model, whose two copies a fine-tune trains apart",
        stacklevel=3,
    )
  ours = [layout.torch_name(config, path) for path in layout.param_shapes(config)]
  theirs = {_llama_name(n): n for n in ours}
  unknown = sorted(set(tensors) - set(theirs))
  if unknown:
    raise layout.PortError(
        f"{directory}: tensors that a LlamaForCausalLM of this config has not: {unknown}"
    )
  renamed = {theirs[n]: x for n, x in tensors.items()}
  params = layout.from_torch(
      config, renamed, source=str(directory), allow_nonfinite=allow_nonfinite
  )
  return config, params


def _from_gpt2(
    directory: pathlib.Path, tensors: dict[str, np.ndarray], allow_nonfinite: bool
) -> tuple[config_lib.GPT2Config, layout.Params]:
  import transformers  # pylint: disable=import-outside-toplevel

  hf = transformers.GPT2Config.from_pretrained(directory)
  checks = {
      "activation_function": (
          hf.activation_function,
          "gelu",
          "ours is the exact (erf) GELU; 'gelu_new' is tanh's approximation",
      ),
      "n_inner": (hf.n_inner or 4 * hf.n_embd, 4 * hf.n_embd, "our MLP is 4 x n_embd wide"),
      "scale_attn_weights": (hf.scale_attn_weights, True, "ours scales by 1 / sqrt(head_dim)"),
      "scale_attn_by_inverse_layer_idx": (
          hf.scale_attn_by_inverse_layer_idx,
          False,
          "ours scales every layer alike",
      ),
      "add_cross_attention": (hf.add_cross_attention, False, "ours is a decoder only"),
  }
  _refuse(directory, {f: (v, why) for f, (v, want, why) in checks.items() if v != want})
  # Old files keep the attention masks as buffers; a tied head may be absent.
  tensors = {n: x for n, x in tensors.items() if not n.endswith((".attn.bias", ".masked_bias"))}
  if hf.tie_word_embeddings:  # transformers ignores a tied lm_head.weight in the file.
    tensors.pop("lm_head.weight", None)
  biases = [n for n in tensors if n.endswith(".bias")]
  # All zero: exactly a model without biases (what `to_hf` writes for bias=False).
  bias = any(np.any(np.asarray(tensors[n], np.float32)) for n in biases)
  config = _config(
      config_lib.GPT2Config,
      directory,
      vocab_size=hf.vocab_size,
      num_layers=hf.n_layer,
      width=hf.n_embd,
      num_heads=hf.n_head,
      block_size=hf.n_positions,
      bias=bias,
      layer_norm_eps=float(hf.layer_norm_epsilon),
  )
  ours = {
      n: np.ascontiguousarray(np.asarray(x).T) if n.endswith(_CONV1D) else x
      for n, x in tensors.items()
      if bias or not n.endswith(".bias")
  }
  # An untied lm_head that differs from wte is refused there by name (GPT-2 ties them).
  params = layout.from_torch(config, ours, source=str(directory), allow_nonfinite=allow_nonfinite)
  return config, params


def _config(cls: type, directory: pathlib.Path, **fields: Any) -> Any:
  try:
    return cls(**fields)
  except (config_lib.ConfigError, TypeError) as e:
    raise layout.PortError(f"{directory / CONFIG_FILE}: {e}") from None
