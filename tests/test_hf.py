"""Hugging Face transformers export and import (`mosaics_jax.port.hf`, `mosaics-port to-hf` and
`from-hf`): transformers' own LlamaForCausalLM and GPT2LMHeadModel compute our logits and greedy
text from what we write, a model that transformers built itself reads into ours with its logits,
our tokenizers are real Hugging Face tokenizer files, and what ours cannot express is refused by
name. Tiny models, built here: no network."""

from __future__ import annotations

import json
import pathlib

import flax
import numpy as np
import pytest
import tiny_runs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")

# Imported after the skips: these need torch and transformers.
from mosaics_jax import checkpoints, config as config_lib, load, tokenizers  # noqa: E402
from mosaics_jax.cli import generate as generate_cli, port as port_cli  # noqa: E402
from mosaics_jax.port import hf, layout, pretrained  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TEXT = SHAKESPEARE.read_text()
PARAGRAPH = TEXT[:700]  # Speakers, newlines, blank lines and punctuation.
CHARS = tokenizers.CharTokenizer.from_text(TEXT)
TINY = dict(vocab_size=CHARS.vocab_size, num_layers=2, width=32, num_heads=4)
TOKENS = np.random.default_rng(0).integers(0, CHARS.vocab_size, (2, 29))
TOLERANCE = 1e-5  # Max abs logit difference, float32.


def _export(tmp_path, cfg: config_lib.ModelConfig, init: bool = True) -> pathlib.Path:
  """An export of `cfg` with the char tokenizer and parameters drawn around their init (or, not
  `init`, at random without compiling the model's init)."""
  if init:
    _, params = tiny_runs.params_near_init(cfg)
  else:
    rng = np.random.default_rng(0)
    params = flax.traverse_util.unflatten_dict(
        {p: rng.normal(0.0, 0.1, s).astype(np.float32) for p, s in layout.param_shapes(cfg).items()}
    )
  path = tmp_path / "ours"
  pretrained.save_exported(path, cfg, params, step=7, tokenizer=CHARS)
  return path


def _to_hf(source: pathlib.Path, out: pathlib.Path) -> None:
  assert port_cli.main(["to-hf", str(source), str(out)]) == 0


def _hf_logits(directory: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def _same(a, b) -> bool:
  fa, fb = (flax.traverse_util.flatten_dict(x) for x in (a, b))
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_llama_exports_as_a_native_llama_and_back(tmp_path):
  """to-hf: a LlamaForCausalLM (no remote code) with our logits; from-hf: our bit-exact
  parameters and the tokenizer back."""
  cfg = config_lib.LlamaConfig(**TINY, ffn_width=48, rope_theta=10_000.0, norm_eps=1e-6)
  source = _export(tmp_path, cfg)
  _to_hf(source, tmp_path / "hf")
  saved = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert saved["model_type"] == "llama" and saved["architectures"] == ["LlamaForCausalLM"]
  assert "auto_map" not in saved and not list((tmp_path / "hf").glob("*.py"))
  assert saved["rms_norm_eps"] == 1e-6 and saved["num_key_value_heads"] == 4
  ours = load(source)
  assert np.abs(_hf_logits(tmp_path / "hf", TOKENS) - ours.logits(TOKENS)).max() < TOLERANCE
  assert port_cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
  back = load(tmp_path / "back")
  assert back.config == cfg and _same(back.params, ours.params)
  assert back.tokenizer == CHARS


def test_a_llama_that_transformers_built_reads_into_ours(tmp_path):
  """transformers' own LlamaForCausalLM (its init, its RoPE; norms perturbed off one) and
  tokenizer files, saved by transformers, give its logits and ids through ours."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=TINY["vocab_size"],
      hidden_size=32,
      intermediate_size=40,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=4,
      rope_theta=1000.0,
      rms_norm_eps=1e-5,
      tie_word_embeddings=False,
  )
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    want = model(torch.as_tensor(TOKENS)).logits.numpy()
  model.save_pretrained(tmp_path / "hf")
  bpe = _hf_tokenizer()
  transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer).save_pretrained(
      tmp_path / "hf"
  )
  hf.from_hf(tmp_path / "hf", tmp_path / "ours")
  ours = load(tmp_path / "ours")
  assert ours.config.rope_theta == 1000.0 and ours.config.ffn_width == 40
  assert np.abs(ours.logits(TOKENS) - want).max() < TOLERANCE
  assert ours.encode(PARAGRAPH) == bpe.encode(PARAGRAPH).tolist()  # transformers' tokenizer files.


@pytest.mark.parametrize("bias", [True, False])
def test_gpt2_exports_as_a_native_gpt2(tmp_path, bias):
  """GPT2LMHeadModel with our logits (Conv1D weights, exact GELU, tied head); without biases,
  zero biases; and back to the same config and parameters."""
  cfg = config_lib.GPT2Config(**TINY, block_size=32, bias=bias, layer_norm_eps=1e-6)
  source = _export(tmp_path, cfg)
  _to_hf(source, tmp_path / "hf")
  saved = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert saved["model_type"] == "gpt2" and saved["activation_function"] == "gelu"
  ours = load(source)
  assert np.abs(_hf_logits(tmp_path / "hf", TOKENS) - ours.logits(TOKENS)).max() < TOLERANCE
  hf.from_hf(tmp_path / "hf", tmp_path / "back")
  back = load(tmp_path / "back")
  assert back.config == cfg and _same(back.params, ours.params)


def _hf_tokenizer() -> tokenizers.HFTokenizer:
  """A byte-level BPE of 300 ids learnt on the first 20,000 characters of tinyshakespeare."""
  bpe = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  bpe.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<|endoftext|>"],
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  bpe.train_from_iterator([TEXT[:20_000]], trainer)
  return tokenizers.HFTokenizer(bpe)


@pytest.mark.parametrize("kind", ["char", "byte", "hf"])
def test_tokenizer_files_are_hugging_faces(tmp_path, kind):
  """AutoTokenizer and tokenizers.Tokenizer.from_file encode a Shakespeare paragraph (and, but for
  char, text outside it) to our ids and decode them to the text; `load` gives ours back."""
  ours = {
      "char": CHARS,
      "byte": tokenizers.ByteTokenizer(),
      "hf": _hf_tokenizer(),
  }[kind]
  tokenizers.save(ours, tmp_path)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  library = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  texts = [PARAGRAPH] + ([] if kind == "char" else ["naïve café ✓\r\n\t  x"])
  for text in texts:
    ids = ours.encode(text).tolist()
    if kind == "byte":  # Independently of our code: ids are the UTF-8 bytes.
      assert ids == list(text.encode("utf-8"))
    elif kind == "char":
      assert ids == [CHARS.chars.index(c) for c in text]
    assert auto.encode(text) == library.encode(text).ids == ids
    assert auto.decode(ids) == library.decode(ids) == text == ours.decode(ids)
  loaded = tokenizers.load(tmp_path)
  assert tokenizers.kind(loaded) == kind
  assert loaded.encode(PARAGRAPH).tolist() == ours.encode(PARAGRAPH).tolist()
  if kind == "char":  # An unknown character is an error there too, not a silent id.
    with pytest.raises(Exception, match="Missing"):
      auto.encode("é")
  # The wrapper that runs wrote before still reads.
  if kind == "hf":
    old = {"kind": "hf", "tokenizer": json.loads(ours.tokenizer.to_str())}
  else:
    old = {"kind": "char", "chars": CHARS.chars} if kind == "char" else {"kind": "byte"}
  (tmp_path / tokenizers.CONFIG_FILE).unlink()
  (tmp_path / tokenizers.TOKENIZER_FILE).write_text(json.dumps(old))
  loaded = tokenizers.load(tmp_path)
  assert tokenizers.kind(loaded) == kind
  assert loaded.encode(PARAGRAPH).tolist() == ours.encode(PARAGRAPH).tolist()


def test_greedy_generation_of_transformers_is_ours(tmp_path, capsys):
  """50 greedy characters: transformers' `generate` (its KV cache) and tokenizer on the export,
  and `mosaics-generate` on the original."""
  cfg = config_lib.LlamaConfig(**TINY, ffn_width=48)
  source = _export(tmp_path, cfg)
  _to_hf(source, tmp_path / "hf")
  prompt = "ROMEO:\nWhat"
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
  ids = auto(prompt, return_tensors="pt").input_ids
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=50, min_new_tokens=50, do_sample=False)
  want = auto.decode(out[0, ids.shape[1] :])
  capsys.readouterr()
  argv = [str(source), "--prompt", prompt, "--max-new-tokens", "50", "--temperature", "0"]
  assert generate_cli.main(argv) == 0
  assert len(want) == 50 and capsys.readouterr().out == want + "\n"


def test_refusals_name_the_problem(tmp_path, capsys):
  """Grouped-query attention, RoPE scaling and a pickle are refused by name; an output in a
  workdir is refused before any work."""
  torch.manual_seed(0)
  base = dict(
      vocab_size=20, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
      num_attention_heads=4,
  )  # fmt: skip
  for name, extra, said in (
      ("gqa", {"num_key_value_heads": 2}, "num_key_value_heads 2: grouped-query attention"),
      (
          "scaled",
          {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
          "rope_parameters 'linear': RoPE scaling",
      ),
  ):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base, **extra))
    model.save_pretrained(tmp_path / name)
    assert port_cli.main(["from-hf", str(tmp_path / name), str(tmp_path / f"{name}-out")]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / f"{name}-out").exists()
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text((tmp_path / "gqa" / "config.json").read_text())
  torch.save({}, pickled / "pytorch_model.bin")
  with pytest.raises(layout.PortError, match="only in pytorch_model.bin, a pickle"):
    hf.from_hf(pickled, tmp_path / "out")
  (tmp_path / "run" / checkpoints.CHECKPOINTS_DIR).mkdir(parents=True)
  with pytest.raises(layout.PortError, match="is a training workdir"):
    hf.to_hf(tmp_path / "nowhere", tmp_path / "run", force=True)


@pytest.mark.slow  # 20 s: lm-eval compiles ours and loads transformers' model.
def test_lm_eval_scores_the_export_as_the_original(tmp_path):
  """lm-eval's own `hf` model on the export and our `mosaics` model on the original give the
  same log-likelihoods (every choice of every document) and metrics on a local tinyshakespeare
  multiple-choice task."""
  pytest.importorskip("lm_eval")
  import lm_eval  # pylint: disable=import-outside-toplevel
  import test_lm_harness  # pylint: disable=import-outside-toplevel
  from lm_eval import tasks as lm_eval_tasks  # pylint: disable=import-outside-toplevel

  cfg = config_lib.LlamaConfig(**TINY, ffn_width=48)
  source = _export(tmp_path, cfg)
  _to_hf(source, tmp_path / "hf")
  docs = [dict(d, answer=0) for d in test_lm_harness.DOCS]
  (tmp_path / "task").mkdir()
  task_dir = test_lm_harness._mc_task(tmp_path / "task", docs)
  prefix = f"prefix_token_id={CHARS.encode(chr(10))[0]}"
  results = {}
  for name, args in (
      ("mosaics", f"path={source},batch_size=4,chunk=64"),
      # Our char tokenizer has no BOS nor EOS: the newline is the prefix token, as ours takes.
      ("hf", f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu,batch_size=4,{prefix}"),
  ):
    results[name] = lm_eval.simple_evaluate(
        model=name,
        model_args=args,
        tasks=["mosaics_mc"],
        task_manager=lm_eval_tasks.TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
  ours, theirs = (
      np.array([r[0] for s in out["samples"]["mosaics_mc"] for r in s["filtered_resps"]])
      for out in (results["mosaics"], results["hf"])
  )
  assert len(ours) == sum(len(d["choices"]) for d in docs)
  assert np.abs(ours - theirs).max() < 1e-4
  for metric in ("acc,none", "acc_norm,none"):
    assert results["mosaics"]["results"]["mosaics_mc"][metric] == pytest.approx(
        results["hf"]["results"]["mosaics_mc"][metric]
    )


@pytest.mark.parametrize(
    "cfg",
    [
        config_lib.MosaicV1Config(**TINY, block_size=32, pmem_size=8),
        config_lib.MosaicV1LibraryConfig(**TINY, block_size=32, pmem_size=8),
        config_lib.MosaicV2Config(**TINY, ffn_width=48, short_term_window=4, long_term_delay=2),
    ],
    ids=lambda cfg: cfg.family,
)
def test_memory_mosaics_go_to_hf_with_their_code_and_back(tmp_path, cfg):
  """to-hf writes our remote code (`hf_remote`), the tokenizer and generation config; from-hf
  reads the directory back to the same config and parameters."""
  source = _export(tmp_path, cfg, init=False)
  _to_hf(source, tmp_path / "hf")
  saved = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert saved["model_type"] == "memory_mosaics" and "auto_map" in saved
  assert {p.name for p in (tmp_path / "hf").iterdir()} == set(hf.FILES)
  assert port_cli.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
  ours, back = load(source), load(tmp_path / "back")
  assert back.config == cfg and _same(back.params, ours.params) and back.tokenizer == CHARS
