"""Typed configs and `--set`: every value is checked against its field's type, repeated flags
accumulate, and errors name the field, the value and the type expected."""

from __future__ import annotations

import argparse
import typing

import pytest

from kernels_pallas import scans
from kernels_pallas.retrieve import ALIASES, IMPLEMENTATIONS
from mosaics_jax import config as config_lib, overrides, registry
from mosaics_jax.cli import common


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("train.steps=abc", r"train.steps=abc: TrainConfig.steps must be an int, got 'abc'"),
        ("train.learning_rate=fast", r"TrainConfig.learning_rate must be a number, got 'fast'"),
        ("model.dtype=float7", r"MosaicV2Config.dtype must be one of 'float32', 'bfloat16'"),
        ("train.steps=4.5", r"TrainConfig.steps must be an int, got 4.5"),
        ("train.steps=true", r"TrainConfig.steps must be an int, got True \(bool\)"),
        ("model.remat=1", r"MosaicV2Config.remat must be a bool \(true or false\), got 1"),
        ("model.long_term_delay_range=[1,2,3]", r"long_term_delay_range must be a list of 2"),
        ("model.retrieve_impl=nope", r"MosaicV2Config.retrieve_impl must be one of 'auto'"),
        ("train.steps", r"--set takes KEY=VALUE, got 'train.steps'"),
    ],
)
def test_bad_values_are_named(assignment, expected):
  with pytest.raises(config_lib.ConfigError, match=expected):
    overrides.apply(registry.get("mm2-tiny"), [assignment])


def test_retrieve_and_scan_names_are_the_kernels():
  names = set(typing.get_args(config_lib.RetrieveImpl))
  assert names == {*ALIASES, *IMPLEMENTATIONS}
  hint = typing.get_type_hints(config_lib.ModelConfig)["scan_impl"]
  assert set(typing.get_args(hint)) == set(scans.SCAN_IMPLEMENTATIONS)


def test_values_take_the_field_type():
  exp = overrides.apply(
      registry.get("mm2-tiny"),
      ["train.learning_rate=1", "model.long_term_delay_range=[3,9]", "data.path=123"],
  )
  assert exp.train.learning_rate == 1.0 and isinstance(exp.train.learning_rate, float)
  assert exp.model.long_term_delay_range == (3, 9)
  assert exp.data.path == "123"  # A str field keeps the text as typed.
  assert overrides.apply(exp, ["train.tokens=null"]).train.tokens is None


def test_json_configs_are_checked_too():
  data = config_lib.to_dict(registry.get("mm2-tiny"))
  for value in ("1", None, [1], 1.5, True):
    data["model"]["num_layers"] = value
    with pytest.raises(config_lib.ConfigError, match="MosaicV2Config.num_layers must be an int"):
      config_lib.from_dict(config_lib.Experiment, data)


def _parse(argv: list[str]) -> list[str]:
  parser = argparse.ArgumentParser()
  common.add_set_flag(parser)
  return parser.parse_args(argv).set


def test_repeated_set_flags_accumulate():
  assert _parse(["--set", "train.steps=4", "--set", "train.log_every=1", "model.remat=true"]) == [
      "train.steps=4",
      "train.log_every=1",
      "model.remat=true",
  ]
  exp = common.experiment("mm2-tiny", ["train.steps=4", "train.log_every=1"])
  assert (exp.train.steps, exp.train.log_every) == (4, 1)


def test_a_key_given_twice_is_an_error():
  with pytest.raises(config_lib.ConfigError, match="gives train.steps more than once"):
    common.experiment("mm2-tiny", ["train.steps=4", "train.steps=5"])


def test_sequences_longer_than_the_model_takes_are_named_after_every_assignment():
  exp = registry.get("mm1-tiny")
  longer = exp.model.block_size * 2
  with pytest.raises(
      config_lib.ConfigError, match=f"data.seq_len {longer} exceeds model.block_size"
  ):
    overrides.apply(exp, [f"data.seq_len={longer}"])
  assert overrides.apply(exp, [f"data.seq_len={longer}", f"model.block_size={longer}"])
  reordered = overrides.apply(exp, [f"model.block_size={longer}", f"data.seq_len={longer}"])
  assert reordered.model.block_size == longer
