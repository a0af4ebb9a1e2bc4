"""Files around porting (issue 29, cases 2, 7 and 8): exports never overwrite a workdir, the source
or a non-empty directory unasked, and leave nothing half-written; safetensors inputs in bfloat16
and float16 load, other dtypes, NaN and malformed files are refused by name, in one line from the
CLI; exported files get the usual permissions.

Safetensors files are built here byte by byte (an 8-byte little-endian header length, a JSON
header, the data), independently of the library that reads them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import struct
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tiny_runs

from mosaics_jax import checkpoints, config as config_lib, load, tokenizers
from mosaics_jax.cli import port as port_cli
from mosaics_jax.model import families
from mosaics_jax.port import layout, pretrained
from mosaics_jax.train import loop, workdir as workdir_lib

TOKENS = np.random.default_rng(0).integers(0, 32, (2, 12))
# Safetensors' names of the dtypes written here (its format's specification).
DTYPE_NAMES = {
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float32): "F32",
    np.dtype(np.int64): "I64",
    np.dtype(np.complex64): "C64",
    np.dtype(np.bool_): "BOOL",
}


def _safetensors(tensors: dict[str, np.ndarray], layout_name: str | None = None) -> bytes:
  """The bytes of a safetensors file of `tensors`, stored one after the other in this order."""
  header, data = {}, b""
  for name, x in tensors.items():
    raw = np.ascontiguousarray(x).tobytes()
    header[name] = {
        "dtype": DTYPE_NAMES[x.dtype],
        "shape": list(x.shape),
        "data_offsets": [len(data), len(data) + len(raw)],
    }
    data += raw
  if layout_name is not None:
    header["__metadata__"] = {"layout": layout_name}
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text)) + text + data


def _params(config: config_lib.ModelConfig, seed: int) -> dict:
  model = families.build_model(config)
  params = model.init(jax.random.key(seed), np.zeros((1, 4), np.int32))["params"]
  return jax.tree.map(np.asarray, params)


def _logits(config: config_lib.ModelConfig, params: dict) -> np.ndarray:
  """The reference: the Flax model applied directly to `params`."""
  params = jax.tree.map(jnp.asarray, params)
  return np.asarray(jax.jit(families.build_model(config).apply)({"params": params}, TOKENS))


def _port(capsys, *argv) -> tuple[int, str]:
  """(exit code, stderr) of `mosaics-port` run in process."""
  code = port_cli.main([str(a) for a in argv])
  return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, match: str) -> None:
  assert code == 2, err
  assert err.startswith("mosaics-port: error: ") and err.count("\n") == 1, err
  assert match in err, err


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  """Every file under `directory` with its bytes."""
  return {
      str(p.relative_to(directory)): p.read_bytes()
      for p in sorted(directory.rglob("*"))
      if p.is_file()
  }


def _same_params(a: dict, b: dict) -> bool:
  flat_a, flat_b = (jax.tree_util.tree_leaves_with_path(t) for t in (a, b))
  return len(flat_a) == len(flat_b) and all(
      pa == pb and np.array_equal(np.asarray(xa), np.asarray(xb))
      for (pa, xa), (pb, xb) in zip(flat_a, flat_b)
  )


@pytest.fixture(scope="module")
def experiment() -> config_lib.Experiment:
  return tiny_runs.tiny(2, train__checkpoint_every=2)


@pytest.fixture(scope="module")
def source(tmp_path_factory, experiment) -> pathlib.Path:
  """An export of the tiny model with fresh weights (not the workdir's)."""
  path = tmp_path_factory.mktemp("source") / "export"
  pretrained.save_exported(path, experiment.model, _params(experiment.model, 1), step=5)
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, experiment) -> pathlib.Path:
  """A training workdir of two steps, with a checkpoint at step 2."""
  run = tmp_path_factory.mktemp("run") / "W"
  loop.train(experiment, run, progress=False)
  return run


# Case 2: outputs go to a new directory or file ----------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_an_export_into_a_training_workdir_is_refused(capsys, source, workdir, force):
  before = load(workdir)
  config = (workdir / checkpoints.CONFIG_FILE).read_bytes()
  code, err = _port(capsys, "to-safetensors", source, workdir, *(["--force"] if force else []))
  _one_line_error(code, err, f"{workdir} is a training workdir (it has checkpoints, .lock)")
  assert (workdir / checkpoints.CONFIG_FILE).read_bytes() == config
  assert not (workdir / pretrained.WEIGHTS_FILE).exists()
  after = load(workdir)
  assert after.step == before.step == 2 and _same_params(after.params, before.params)


def test_a_run_that_has_not_saved_a_checkpoint_is_a_workdir_too(capsys, source, tmp_path):
  with workdir_lib.WorkdirLock(tmp_path):  # What every run leaves, from its first moment.
    code, err = _port(capsys, "to-safetensors", source, tmp_path, "--force")
  _one_line_error(code, err, f"it has {checkpoints.LOCK_FILE}")
  assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoints.LOCK_FILE]


def test_an_export_never_writes_into_its_source(capsys, source, workdir):
  before = _files(workdir)
  code, err = _port(capsys, "to-safetensors", workdir, workdir, "--force")
  _one_line_error(code, err, f"is, holds or lies in the source {workdir}")
  code, err = _port(capsys, "to-safetensors", workdir, workdir / "export")
  _one_line_error(code, err, "lies in the source")
  assert _files(workdir) == before and load(workdir).step == 2
  before = _files(source)
  code, err = _port(capsys, "from-safetensors", source, source, "--force")
  _one_line_error(code, err, f"is, holds or lies in the source {source}")
  code, err = _port(capsys, "from-safetensors", source, source.parent, "--force")
  _one_line_error(code, err, "holds or lies in the source")
  assert _files(source) == before


def test_a_non_empty_directory_is_replaced_only_when_forced(capsys, source, experiment, tmp_path):
  out = tmp_path / "out"
  chars = tokenizers.CharTokenizer("abcdefghijklmnopqrstuvwxyz012345")
  pretrained.save_exported(out, experiment.model, _params(experiment.model, 2), tokenizer=chars)
  (out / "notes.txt").write_text("mine")
  before = _files(out)
  code, err = _port(capsys, "from-safetensors", source, out)
  _one_line_error(code, err, f"{out} is not empty")
  assert _files(out) == before
  assert _port(capsys, "from-safetensors", source, out, "--force")[0] == 0
  # The export files are the source's (its tokenizer-less export drops the old tokenizer); the
  # user's file stays.
  assert sorted(_files(out)) == sorted(
      [checkpoints.CONFIG_FILE, pretrained.WEIGHTS_FILE, "notes.txt"]
  )
  assert (out / "notes.txt").read_text() == "mine"
  exported, original = load(out), load(source)
  assert exported.tokenizer is None and exported.step == original.step == 5
  assert _same_params(exported.params, original.params)
  # An empty directory needs no force.
  (tmp_path / "empty").mkdir()
  assert _port(capsys, "to-safetensors", source, tmp_path / "empty")[0] == 0


def test_a_failed_export_leaves_nothing_half_written(source, experiment, tmp_path, monkeypatch):
  def full_disk(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(tokenizers, "save", full_disk)  # Written after the weights and the config.
  chars = tokenizers.CharTokenizer("abc")
  params = _params(experiment.model, 3)
  with pytest.raises(OSError, match="No space left"):
    pretrained.save_exported(tmp_path / "new", experiment.model, params, tokenizer=chars)
  assert list(tmp_path.iterdir()) == []
  old = tmp_path / "old"
  shutil.copytree(source, old)
  with pytest.raises(OSError, match="No space left"):
    pretrained.save_exported(old, experiment.model, params, tokenizer=chars, force=True)
  assert _files(old) == _files(source) and [p.name for p in tmp_path.iterdir()] == ["old"]


def test_to_torch_never_overwrites_and_names_a_missing_directory(capsys, tmp_path):
  pytest.importorskip("torch")
  config = config_lib.MosaicV1Config(
      vocab_size=32, num_layers=1, width=16, num_heads=2, block_size=16, pmem_size=4
  )
  pretrained.save_exported(tmp_path / "mm1", config, _params(config, 0), step=3)
  out = tmp_path / "ckpt.pt"
  out.write_text("an earlier checkpoint")
  argv = ["to-torch", "--format", "nanomosaics", tmp_path / "mm1"]
  _one_line_error(*_port(capsys, *argv, out), f"{out} exists")
  assert out.read_text() == "an earlier checkpoint"
  missing = tmp_path / "no" / "such" / "ckpt.pt"
  _one_line_error(*_port(capsys, *argv, missing), f"no directory {tmp_path / 'no' / 'such'}")
  assert not (tmp_path / "no").exists()
  assert _port(capsys, *argv, out, "--force")[0] == 0
  import torch  # pylint: disable=import-outside-toplevel

  assert torch.load(out, weights_only=True)["iter_num"] == 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "mm1"]  # No partial file.


def test_a_directory_both_workdir_and_export_is_refused(source, workdir, tmp_path):
  both = tmp_path / "both"
  shutil.copytree(workdir, both)
  shutil.copy(source / pretrained.WEIGHTS_FILE, both)
  with pytest.raises(layout.PortError, match="both a training workdir .* and an export"):
    load(both)


def test_exports_get_the_usual_permissions(capsys, source, tmp_path):
  old_umask = os.umask(0o022)
  try:
    assert _port(capsys, "to-safetensors", source, tmp_path / "pt")[0] == 0
  finally:
    os.umask(old_umask)
  assert (tmp_path / "pt").stat().st_mode & 0o777 == 0o755
  for name in (checkpoints.CONFIG_FILE, pretrained.WEIGHTS_FILE):
    assert (tmp_path / "pt" / name).stat().st_mode & 0o777 == 0o644, name


# Case 8: dtypes and values of safetensors weights -------------------------------------------------


def _export_with(directory: pathlib.Path, config, tensors, layout_name: str) -> pathlib.Path:
  """An export directory of `config` whose weights file holds `tensors` as they are."""
  directory.mkdir()
  model = {"family": config.family, **config_lib.to_dict(config)}
  (directory / checkpoints.CONFIG_FILE).write_text(json.dumps({"model": model, "step": None}))
  (directory / pretrained.WEIGHTS_FILE).write_bytes(_safetensors(tensors, layout_name))
  return directory


def _torch_tensors(config, params, dtype) -> dict[str, np.ndarray]:
  return {n: x.astype(dtype) for n, x in layout.to_torch(config, params).items()}


@pytest.mark.parametrize(
    "dtype, layout_name",
    [(ml_dtypes.bfloat16, "pytorch"), (ml_dtypes.bfloat16, "flax"), (np.float16, "pytorch")],
)
def test_half_precision_weights_load_as_their_float32_values(
    capsys, experiment, tmp_path, dtype, layout_name
):
  config, params = experiment.model, _params(experiment.model, 4)
  if layout_name == "pytorch":
    tensors = _torch_tensors(config, params, dtype)
  else:
    flat = jax.tree_util.tree_leaves_with_path(params)
    tensors = {"/".join(k.key for k in path): x.astype(dtype) for path, x in flat}
  directory = _export_with(tmp_path / "half", config, tensors, layout_name)
  with pytest.warns(UserWarning) as caught:
    model = load(directory)
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1, messages  # The cast is said once, not per tensor.
  assert f"converted to float32, the parameters' dtype, from {np.dtype(dtype)}" in messages[0]
  rounded = jax.tree.map(lambda x: x.astype(dtype).astype(np.float32), params)
  np.testing.assert_allclose(model.logits(TOKENS), _logits(config, rounded), rtol=1e-5, atol=1e-6)
  with pytest.warns(UserWarning, match="converted to float32"):
    assert _port(capsys, "from-safetensors", directory, tmp_path / "f32")[0] == 0
  assert _same_params(load(tmp_path / "f32").params, rounded)


@pytest.mark.parametrize("dtype", [np.int64, np.complex64, np.bool_])
def test_weights_that_are_not_floats_are_refused_by_name(capsys, experiment, tmp_path, dtype):
  config = experiment.model
  tensors = _torch_tensors(config, _params(config, 0), np.float32)
  tensors["embed.weight"] = tensors["embed.weight"].astype(dtype)
  directory = _export_with(tmp_path / "bad", config, tensors, "pytorch")
  name = f"embed.weight: {DTYPE_NAMES[np.dtype(dtype)]}"
  with pytest.raises(layout.PortError, match=name):
    load(directory)
  _one_line_error(*_port(capsys, "from-safetensors", directory, tmp_path / "out"), name)


def test_nan_weights_are_refused_by_name_unless_allowed(capsys, experiment, tmp_path):
  config = experiment.model
  tensors = _torch_tensors(config, _params(config, 0), np.float32)
  tensors["classifier.weight"][0, 0] = np.nan
  tensors["embed.weight"][1, 1] = np.inf
  directory = _export_with(tmp_path / "nan", config, tensors, "pytorch")
  with pytest.raises(layout.PortError, match="NaN or infinite values in classifier.weight, embed"):
    load(directory)
  code, err = _port(capsys, "from-safetensors", directory, tmp_path / "out")
  _one_line_error(code, err, "NaN or infinite values in classifier.weight, embed.weight")
  assert not (tmp_path / "out").exists()
  with pytest.warns(UserWarning, match="non-finite values in classifier.weight, embed.weight"):
    assert (
        _port(capsys, "from-safetensors", directory, tmp_path / "out", "--allow-nonfinite")[0] == 0
    )
  with pytest.warns(UserWarning, match="non-finite"):
    model = load(tmp_path / "out", allow_nonfinite=True)
  assert np.isnan(np.asarray(model.params["classifier"]["kernel"])).sum() == 1


# Case 7: malformed safetensors files --------------------------------------------------------------


def _malformed(kind: str) -> bytes:
  """A safetensors file broken one way."""
  a, b = np.arange(4, dtype=np.float32), np.ones(2, np.float32)
  valid = _safetensors({"a": a, "b": b})
  (length,) = struct.unpack("<Q", valid[:8])
  header = json.loads(valid[8 : 8 + length])
  if kind == "truncated":
    return valid[:-5]
  if kind == "huge header":
    return struct.pack("<Q", 2**40) + valid[8:]
  if kind == "invalid JSON":
    text = b'{"a": {"dtype": "F32", "shape": [4], '
    return struct.pack("<Q", len(text)) + text + valid[8 + length :]
  if kind == "lying offsets":
    header["b"]["data_offsets"] = [16, 40]  # 24 bytes for 2 floats, past the end of the data.
  if kind == "overlapping":
    header["b"]["data_offsets"] = [8, 16]  # Inside a's bytes.
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text)) + text + valid[8 + length :]


@pytest.mark.parametrize(
    "kind", ["lying offsets", "huge header", "overlapping", "truncated", "invalid JSON"]
)
def test_a_malformed_safetensors_file_is_one_named_error(capsys, source, tmp_path, kind):
  directory = tmp_path / "broken"
  shutil.copytree(source, directory)
  weights = directory / pretrained.WEIGHTS_FILE
  weights.write_bytes(_malformed(kind))
  message = f"{weights} is not a valid safetensors file: "
  with pytest.raises(layout.PortError, match=message):
    load(directory)
  _one_line_error(*_port(capsys, "from-safetensors", directory, tmp_path / "out"), message)


def test_a_malformed_tokenizer_is_one_named_error(capsys, source, tmp_path):
  directory = tmp_path / "broken"
  shutil.copytree(source, directory)
  (directory / tokenizers.TOKENIZER_FILE).write_text("{not json")
  message = str(directory / tokenizers.TOKENIZER_FILE)  # Named, whatever the words around it.
  with pytest.raises(layout.PortError, match=re.escape(message)):
    load(directory)
  _one_line_error(*_port(capsys, "to-safetensors", directory, tmp_path / "out"), message)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x80\x02garbage that is no pickle", "holds more than tensors and plain data:"),
        (b"PK\x03\x04 a truncated zip", "is not a readable PyTorch checkpoint: "),
        (b"", "is not a readable PyTorch checkpoint: "),
    ],
    ids=["not-a-pickle", "truncated-zip", "empty"],
)
def test_a_corrupt_torch_checkpoint_is_one_named_error(capsys, tmp_path, content, match):
  pytest.importorskip("torch")
  checkpoint = tmp_path / "ckpt.pt"
  checkpoint.write_bytes(content)
  code, err = _port(capsys, "from-torch", "--format", "nanomosaics", checkpoint, tmp_path / "out")
  _one_line_error(code, err, f"{checkpoint} {match}")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["from-torch", "to-torch"])
def test_the_torch_commands_without_torch_say_so_in_one_line(
    capsys, source, tmp_path, monkeypatch, command
):
  monkeypatch.setitem(sys.modules, "torch", None)  # What `import torch` meets where it is absent.
  paths = {
      "from-torch": (tmp_path / "in.pt", tmp_path / "out"),
      "to-torch": (source, tmp_path / "o.pt"),
  }
  code, err = _port(capsys, command, "--format", "nanomosaics", *paths[command])
  _one_line_error(code, err, f"{command} needs PyTorch, which is not installed: pip install torch")
