"""Memory Mosaics as transformers remote code (`port.hf_remote`): what transformers loads from an
export computes our logits, losses and greedy continuations; `read` inverts `save` exactly.

Tiny models with every weight moved off its initial value, built here and never fetched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Imported after the skips: these need torch.
from mosaics_jax import build_model, config as config_lib  # noqa: E402
from mosaics_jax.port import hf_remote, pretrained  # noqa: E402

TINY = dict(vocab_size=50, num_layers=2, width=32, num_heads=4)
CONFIGS = {
    "mm1": config_lib.MosaicV1Config(**TINY, block_size=64, pmem_size=16, pmem_count=2),
    "mm1-library": config_lib.MosaicV1LibraryConfig(**TINY, block_size=64, pmem_size=16),
    "mm2": config_lib.MosaicV2Config(**TINY, ffn_width=48, short_term_window=6, long_term_delay=3),
}
TOKENS = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 37))
TOLERANCE = 1e-5  # Max abs logit difference, float32.
NEW_TOKENS = 50


@pytest.fixture(scope="module", autouse=True)
def one_thread():
  """PyTorch on one thread: its threads spin against the other test workers' on small CPUs."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def export(request, tmp_path_factory):
  """(config, params, our logits of TOKENS, the export's directory)."""
  cfg = CONFIGS[request.param]
  model = build_model(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  # Every weight off its initial value (biases off 0, scales off 1), in the model's own ranges.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noise = [
      0.1 * jax.random.normal(k, x.shape) * (jnp.abs(x).mean() + 0.1) for x, k in zip(leaves, keys)
  ]
  params = jax.tree.unflatten(tree, [x + n for x, n in zip(leaves, noise)])
  logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(TOKENS)))
  directory = tmp_path_factory.mktemp(request.param)
  hf_remote.save(directory, cfg, params)
  return cfg, params, logits, directory


def _load(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)


def _same(a, b) -> bool:
  fa, fb = (flax.traverse_util.flatten_dict(x) for x in (a, b))
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_export_is_a_transformers_model_with_our_logits(export):
  cfg, _, logits, directory = export
  saved = json.loads((directory / "config.json").read_text())
  assert saved["model_type"] == hf_remote.MODEL_TYPE == "memory_mosaics"
  assert saved["architectures"] == ["MosaicsForCausalLM"] and saved["family"] == cfg.family
  model = _load(directory)
  assert isinstance(model, transformers.PreTrainedModel) and model.dtype == torch.float32
  # v1 ties its classifier to the embedding, v2 does not.
  assert model.config.tie_word_embeddings == (cfg.family != "mm2")
  with torch.no_grad():
    theirs = model(torch.as_tensor(TOKENS)).logits.numpy()
  assert np.abs(theirs - logits).max() <= TOLERANCE


def test_read_inverts_save_exactly(export, tmp_path):
  cfg, params, _, directory = export
  back_cfg, back = hf_remote.read(directory)
  assert back_cfg == cfg and _same(back, params)
  # What transformers saves of the model it loaded reads back the same.
  _load(directory).save_pretrained(tmp_path)
  back_cfg, back = hf_remote.read(tmp_path)
  assert back_cfg == cfg and _same(back, params)


def test_loss_is_the_mean_next_token_cross_entropy(export):
  _, _, logits, directory = export
  labels = TOKENS.copy()
  labels[0, 5:9] = -100  # Ignored, as transformers' causal LMs ignore them.
  with torch.no_grad():
    loss = _load(directory)(torch.as_tensor(TOKENS), labels=torch.as_tensor(labels)).loss.item()
  # -log softmax of our logits at each next token, from numpy.
  shifted = logits[:, :-1].astype(np.float64)
  log_z = np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1)) + shifted.max(-1)
  targets = labels[:, 1:]
  picked = np.take_along_axis(shifted, np.maximum(targets, 0)[..., None], -1)[..., 0]
  expected = (log_z - picked)[targets != -100].mean()
  assert abs(loss - expected) <= 1e-5


@pytest.mark.parametrize(
    "export",
    [pytest.param("mm1", marks=pytest.mark.slow), "mm1-library", "mm2"],
    indirect=True,
)
def test_greedy_generate_equals_ours(export):
  cfg, params, _, directory = export
  ours = pretrained.Pretrained(cfg, build_model(cfg), params, step=None)
  prompts = [TOKENS[0, :5].tolist(), TOKENS[1, :3].tolist()]
  expected = ours.generate(prompts, NEW_TOKENS)
  model = _load(directory)
  for prompt, new in zip(prompts, expected):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0, len(prompt) :].tolist() == new
  # A left-padded batch: each row as its own document, the same continuations.
  batch = torch.tensor([prompts[0], [0, 0] + prompts[1]])
  mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
  out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
  assert out[:, 5:].tolist() == expected


def test_padding_is_exact_and_holes_are_refused(export):
  _, _, logits, directory = export
  model = _load(directory)
  padded = np.concatenate([np.full((2, 3), 7), TOKENS[:, :20], np.full((2, 4), 9)], axis=1)
  mask = np.concatenate([np.zeros((2, 3)), np.ones((2, 20)), np.zeros((2, 4))], axis=1)
  with torch.no_grad():
    theirs = model(torch.as_tensor(padded), attention_mask=torch.as_tensor(mask)).logits.numpy()
  # Causal: the first 20 positions' logits of the unpadded rows.
  assert np.abs(theirs[:, 3:23] - logits[:, :20]).max() <= TOLERANCE
  mask[1, 10] = 0
  with pytest.raises(ValueError, match=r"attention_mask rows \[1\] have holes"):
    model(torch.as_tensor(padded), attention_mask=torch.as_tensor(mask))


@pytest.mark.parametrize("export", ["mm1"], indirect=True)  # One family: the same files.
def test_export_loads_without_mosaics_jax(export, tmp_path):
  _, _, logits, directory = export
  np.save(tmp_path / "tokens.npy", TOKENS)
  # A fresh interpreter where mosaics_jax and kernels_pallas cannot be imported.
  code = textwrap.dedent(f"""
      import sys
      class Absent:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("mosaics_jax", "kernels_pallas"):
            raise ImportError(name + " is absent")
      sys.meta_path.insert(0, Absent())
      import numpy as np, torch, transformers
      model = transformers.AutoModelForCausalLM.from_pretrained({str(directory)!r},
                                                                trust_remote_code=True)
      with torch.no_grad():
        logits = model(torch.as_tensor(np.load("tokens.npy"))).logits.numpy()
      np.save("logits.npy", logits)
      """)
  subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
  assert np.abs(np.load(tmp_path / "logits.npy") - logits).max() <= TOLERANCE
