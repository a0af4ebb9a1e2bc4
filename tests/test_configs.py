"""Configs, experiments, the paper's parameter and FLOP table, and `mosaics-info`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest

import kernels_pallas
from mosaics_jax import config as config_lib, overrides, registry
from mosaics_jax.analysis import flops
from mosaics_jax.cli import info
from mosaics_jax.model import families

# v2 paper Table 2: parameters (B) and forward FLOPs per token (B) at context 256.
PAPER = {
    "llama-large": (8.8, 16.7),
    "mm2-large": (9.9, 18.9),
    "mm2-large-no-ltm": (8.3, 15.6),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_and_flop_table(name):
  params, flops_per_token = PAPER[name]
  report = flops.count(registry.get(name).model, context=256)
  assert abs(report.params / 1e9 - params) <= 0.05
  assert abs(report.flops_per_token / 1e9 - flops_per_token) <= 0.1
  assert sum(c.params for c in report.components) == report.params


def test_flop_count_of_a_small_model_by_hand():
  """2 x matmul weights (classifier, not the embedding) + 2*2*d*(ctx/2) per memory and layer."""
  cfg = config_lib.MosaicV2Config(
      vocab_size=100, num_layers=2, width=16, num_heads=2, ffn_width=24, short_term_window=8
  )
  d, dp, layers, heads, ctx = 16, 24, 2, 2, 64
  matmul = layers * (2 * (d * d + d * d + 2 * d * heads) + 2 * d * d + 3 * d * dp) + d * 100
  report = flops.count(cfg, context=ctx)
  assert report.flops_per_token == 2 * matmul + layers * 2 * (2 * 2 * d * ctx / 2)
  # The short-term band really reads min(t, 7) pairs; the long-term band (m=64) reads none at 64.
  short_mean = sum(min(t, 7) for t in range(ctx)) / ctx
  assert report.flops_per_token_band_exact == pytest.approx(
      2 * matmul + layers * 2 * 2 * d * short_mean
  )


def test_flop_count_of_a_long_term_block_selection_by_hand():
  """With block selection the long-term band reads min(n_t, (K + R) B) pairs and scores n_t / B
  block summaries at half a pair each; the paper's convention does not change."""
  base = config_lib.MosaicV2Config(
      vocab_size=100, num_layers=2, width=16, num_heads=2, ffn_width=24, long_term_delay=4
  )
  selecting = dataclasses.replace(base, long_term_select_blocks=1, long_term_select_block_size=8)
  ctx, d, layers = 128, 16, 2
  full, selected = flops.count(base, context=ctx), flops.count(selecting, context=ctx)
  assert selected.flops_per_token == full.flops_per_token
  visible = [max(0, t - 4 + 1) for t in range(ctx)]
  saved = sum(n - min(n, 16) - n / 8 / 2 for n in visible) / ctx
  assert full.flops_per_token_band_exact - selected.flops_per_token_band_exact == pytest.approx(
      layers * 2 * 2 * d * saved
  )


@pytest.mark.slow
def test_every_experiment_builds_and_counts():
  for name, experiment in registry.all_experiments().items():
    experiment.check_lengths()
    report = flops.count(experiment.model)
    assert report.params > 0 and report.flops_per_token > 0, name


def test_required_experiments_exist():
  names = set(registry.all_experiments())
  for base in ("mm2-small", "mm2-large", "mm2-large-no-ltm", "llama-small", "llama-large"):
    assert {base, f"{base}-32k"} <= names
    assert registry.get(base).data.seq_len == 4096
    assert registry.get(f"{base}-32k").data.seq_len == 32768
  v1 = registry.get("mm1-babistories")
  assert (v1.model.num_layers, v1.model.width, v1.model.num_heads, v1.data.seq_len) == (
      12,
      768,
      12,
      512,
  )


def test_paper_recipe():
  train = registry.get("mm2-large").train
  assert (train.batch_size, train.learning_rate, train.warmup_steps) == (1024, 1e-3, 2000)
  assert (train.b1, train.b2, train.weight_decay, train.grad_clip) == (0.9, 0.95, 0.1, 1.0)
  assert train.min_lr_ratio == 0.01 and train.tokens == 10**12
  assert registry.get("mm2-small").train.learning_rate == 3e-4
  assert registry.get("mm2-large").model.long_term_delay_range == (64, 256)


def test_unknown_experiment_suggests_close_names():
  with pytest.raises(config_lib.ConfigError, match="did you mean.*mm2-large"):
    registry.get("mm2-lareg")


def test_override_by_dotted_path_and_unknown_keys():
  exp = registry.get("mm2-tiny")
  changed = overrides.override(exp, "model.num_layers", 5)
  assert changed.model.num_layers == 5 and exp.model.num_layers == 2
  assert overrides.override(exp, "train.steps", 7).train.steps == 7
  with pytest.raises(config_lib.ConfigError, match="did you mean num_layers"):
    overrides.override(exp, "model.num_layer", 5)
  with pytest.raises(config_lib.ConfigError, match="did you mean train"):
    overrides.override(exp, "trian.steps", 5)
  with pytest.raises(config_lib.ConfigError, match="not divisible"):
    overrides.override(exp, "model.width", 66)
  with pytest.raises(config_lib.ConfigError, match="scan_chunk_size must be >= 1, got 0"):
    overrides.override(exp, "model.scan_chunk_size", 0)


def test_dict_round_trip_and_unknown_keys():
  for exp in registry.all_experiments().values():
    data = json.loads(json.dumps(config_lib.to_dict(exp)))
    assert config_lib.from_dict(config_lib.Experiment, data) == exp
  data = config_lib.to_dict(registry.get("llama-tiny"))
  data["model"]["rope_thetaa"] = 1.0
  with pytest.raises(config_lib.ConfigError, match="did you mean rope_theta"):
    config_lib.from_dict(config_lib.Experiment, data)
  data["model"] = {"family": "gpt"}
  with pytest.raises(config_lib.ConfigError, match="unknown model family 'gpt'"):
    config_lib.from_dict(config_lib.Experiment, data)


def test_configs_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    registry.get("mm2-tiny").model.width = 3


def test_info_json(capsys):
  assert info.main(["mm2-large-no-ltm", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["context"] == 256
  assert abs(out["params"] / 1e9 - 8.3) <= 0.05
  assert abs(out["flops_per_token"] / 1e9 - 15.6) <= 0.1
  assert out["config"]["model"]["long_term_memory"] is False


def test_info_context_changes_memory_flops(capsys):
  info.main(["mm2-tiny", "--json", "--context", "1024"])
  long = json.loads(capsys.readouterr().out)
  info.main(["mm2-tiny", "--json"])
  short = json.loads(capsys.readouterr().out)
  assert long["flops_per_token"] > short["flops_per_token"]
  assert long["params"] == short["params"]


def test_info_list_and_table(capsys):
  assert info.main(["--list"]) == 0
  listing = capsys.readouterr().out
  assert "mm2-large-no-ltm" in listing and "mm1-babistories" in listing
  # Each line gives the experiment's parameter count, as `mosaics-info NAME --json` counts them.
  info.main(["gpt2-shakespeare-char", "--json"])
  params = json.loads(capsys.readouterr().out)["params"]
  line = next(row for row in listing.splitlines() if row.startswith("gpt2-shakespeare-char "))
  assert line.split()[:3] == ["gpt2-shakespeare-char", "gpt2", f"{params / 1e6:.2f}M"]
  assert info.main(["mm1-tiny"]) == 0
  assert "persistent memory" in capsys.readouterr().out


@pytest.mark.parametrize(
    "mosaic, transformer",
    [("mm1-library-regbench", "gpt2-regbench"), ("mm1-library-babistories", "gpt2-babistories")],
)
def test_the_v1_baselines_have_the_memory_mosaics_parameter_count(mosaic, transformer):
  counts = [families.param_count(registry.get(name).model) for name in (mosaic, transformer)]
  assert abs(counts[1] / counts[0] - 1) < 0.1, counts


def test_info_cli_unknown_experiment():
  result = subprocess.run(
      [sys.executable, "-m", "mosaics_jax.cli.info", "llama-lareg"], capture_output=True, text=True
  )
  assert result.returncode == 2
  assert "unknown experiment 'llama-lareg'" in result.stderr and "llama-large" in result.stderr


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(long_term_select_blocks=-1), "long_term_select_blocks must be >= 0"),
        (dict(long_term_select_block_size=0), "long_term_select_block_size must be >= 1"),
        (dict(long_term_select_recent=0), "long_term_select_recent must be >= 1"),
        (
            dict(long_term_memory=False, long_term_select_blocks=2),
            "long_term_select_blocks needs long_term_memory=True",
        ),
    ],
)
def test_bad_long_term_selection_is_named(fields, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.MosaicV2Config(
        vocab_size=10, num_layers=1, width=8, num_heads=2, ffn_width=8, **fields
    )


def test_long_term_summaries_are_the_ops():
  """The config's summary names are those `kernels_pallas.select` implements (config.py imports
  nothing of the project, so the list is written twice)."""
  hint = typing.get_type_hints(config_lib.MosaicV2Config)["long_term_select_summary"]
  assert typing.get_args(hint) == kernels_pallas.select.SUMMARIES
