"""Data pipelines: batches, synthetic tasks, text and token windows, Grain state and sharding."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from mosaics_jax import regbench, synthetic, tokenizers
from mosaics_jax.config import DataConfig
from mosaics_jax.train import data

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
FIELDS = {
    "tokens": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "loss_mask": np.float32,
    "answer_mask": np.float32,
}


@pytest.fixture
def shakespeare() -> DataConfig:
  if not SHAKESPEARE.is_file():
    pytest.skip(f"TinyShakespeare is not at {SHAKESPEARE} (karpathy/char-rnn input.txt)")
  return DataConfig(source="text", path=str(SHAKESPEARE), tokenizer="char", seq_len=32)


def _token_file(path: pathlib.Path, ids, dtype="uint16", **kwargs) -> DataConfig:
  np.asarray(ids, dtype).tofile(path)
  return DataConfig(source="tokens", path=str(path), token_dtype=dtype, **kwargs)


@pytest.fixture
def positions(tmp_path) -> DataConfig:
  """A token file whose id at every offset is the offset: windows show where they come from."""
  return _token_file(tmp_path / "positions.bin", np.arange(1000), seq_len=16, val_fraction=0.2)


def _take(cfg: DataConfig, steps: int, **kwargs) -> list[dict[str, np.ndarray]]:
  kwargs = dict(split="train", batch_size=4, seed=0) | kwargs
  iterator = data.make_iterator(cfg, **kwargs)
  return [next(iterator) for _ in range(steps)]


def _same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in FIELDS)


SYNTHETIC = {
    "induction": DataConfig(source="synthetic_induction", seq_len=24, task_vocab=32),
    "mqar": DataConfig(source="synthetic_mqar", seq_len=24, task_vocab=16, task_pairs=4),
    "needles": DataConfig(source="synthetic_needles", seq_len=31, task_vocab=12, task_pairs=4),
    "regbench": DataConfig(source="regbench", seq_len=24, regbench_languages=40),
}


@pytest.fixture(params=["induction", "mqar", "regbench", "text", "tokens"])
def any_source(request) -> DataConfig:
  if request.param == "text":
    return request.getfixturevalue("shakespeare")
  if request.param == "tokens":
    return request.getfixturevalue("positions")
  return SYNTHETIC[request.param]


def test_batches_have_the_documented_shapes_and_dtypes(any_source):
  batch = _take(any_source, 1, batch_size=6)[0]
  assert set(batch) == set(FIELDS)
  for name, dtype in FIELDS.items():
    assert batch[name].shape == (6, any_source.seq_len) and batch[name].dtype == dtype, name
  assert batch["tokens"].max() < data.vocab_size(any_source)
  np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])


def test_same_seed_same_stream_other_seed_other_stream(any_source):
  first = _take(any_source, 3, seed=3)
  assert _same(first, _take(any_source, 3, seed=3))
  assert not _same(first, _take(any_source, 3, seed=4))


def test_state_survives_json_and_resumes_the_same_batches(any_source):
  iterator = data.make_iterator(any_source, split="train", batch_size=4, seed=1)
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(3)]
  resumed = data.make_iterator(any_source, split="train", batch_size=4, seed=1)
  resumed.set_state(state)
  assert _same(expected, [next(resumed) for _ in range(3)])


def test_processes_read_disjoint_shares_of_the_global_batch(any_source):
  whole = _take(any_source, 2, batch_size=8, seed=5)
  shares = [
      _take(any_source, 2, batch_size=8, seed=5, process_index=p, process_count=2) for p in range(2)
  ]
  for p in range(2):
    assert shares[p][0]["tokens"].shape == (4, any_source.seq_len)
    again = _take(any_source, 2, batch_size=8, seed=5, process_index=p, process_count=2)
    assert _same(shares[p], again)
  for step in range(2):
    # Stacked in process order, the shares are the single-process global batch, row for row: the
    # data ignore host count, and so do micro-batches and per-row dropout.
    for name, value in whole[step].items():
      stacked = np.concatenate([shares[0][step][name], shares[1][step][name]])
      np.testing.assert_array_equal(stacked, value, err_msg=name)


def test_batch_size_must_split_evenly_over_processes():
  with pytest.raises(data.DataError, match="batch_size 6 must be a positive multiple of"):
    data.make_iterator(SYNTHETIC["mqar"], split="train", batch_size=6, seed=0, process_count=4)


def test_trim_padding_cuts_batches_after_their_last_counted_target():
  """Every batch keeps its counted targets and ends at the next multiple of trim_padding; what
  it cuts is padding that no mask counts."""
  cfg = DataConfig(source="regbench", seq_len=200, regbench_languages=40, regbench_max_string=6)
  whole = _take(cfg, 6, batch_size=3)
  cut = _take(dataclasses.replace(cfg, trim_padding=16), 6, batch_size=3)
  lengths = set()
  for full, trimmed in zip(whole, cut, strict=True):
    counted = np.flatnonzero(full["loss_mask"].any(0))
    length = trimmed["tokens"].shape[1]
    assert length % 16 == 0 and length - 16 <= counted[-1] < length
    lengths.add(length)
    for name in FIELDS:
      np.testing.assert_array_equal(trimmed[name], full[name][:, :length])
      assert not full[name][:, length:].any() or name in ("tokens", "targets")
    assert (full["tokens"][:, length:] == regbench.PAD).all()
  assert len(lengths) > 1  # Rows of 10-19 strings of 1-6 letters: batches of several lengths.


def test_trim_batch_bounds():
  zeros = np.zeros((2, 50), np.float32)
  padding = {"tokens": zeros.astype(np.int32), "loss_mask": zeros, "answer_mask": zeros}
  assert data.trim_batch(padding, 16)["tokens"].shape == (2, 16)  # Nothing counted: one multiple.
  answer = dict(padding, answer_mask=zeros.copy())
  answer["answer_mask"][1, 49] = 1  # The answer mask counts too; never past the batch's end.
  assert data.trim_batch(answer, 16)["tokens"].shape == (2, 50)


def test_trim_padding_refuses_several_processes():
  cfg = DataConfig(source="regbench", seq_len=64, regbench_languages=40, trim_padding=16)
  with pytest.raises(data.DataError, match="trim_padding=16 .* 2 processes"):
    data.make_iterator(cfg, split="train", batch_size=4, seed=0, process_count=2)


@pytest.mark.parametrize("task_vocab", [64, 6], ids=["distinct", "repeated"])
def test_induction_answers_follow_the_rule(task_vocab):
  cfg = DataConfig(source="synthetic_induction", seq_len=31, task_vocab=task_vocab)
  batch = _take(cfg, 1, batch_size=16)[0]
  assert data.vocab_size(cfg) == task_vocab and batch["tokens"].max() < task_vocab
  np.testing.assert_array_equal(batch["loss_mask"], batch["answer_mask"])
  for tokens, targets, answers in zip(batch["tokens"], batch["targets"], batch["answer_mask"]):
    assert not answers[:16].any()
    for t in np.flatnonzero(answers):
      earlier = np.flatnonzero(tokens[:t] == tokens[t])
      assert len(earlier) and (targets[earlier] == targets[t]).all()
  answered = batch["answer_mask"].sum(axis=1)
  assert (answered <= 8).all()  # The queries sit at 16, 18, ..., 30.
  if task_vocab == 64:
    assert answered.mean() > 5  # Ambiguous only where a query repeats an earlier answer symbol.
  else:
    assert 0 < answered.mean() < 8  # Only the unambiguous answers.


def test_induction_distances_vary():
  """No position rule solves the task: the earlier occurrence is at a random distance."""
  cfg = DataConfig(source="synthetic_induction", seq_len=63, task_vocab=64)
  batch = _take(cfg, 1, batch_size=16)[0]
  distances = {
      t - np.flatnonzero(tokens[:t] == tokens[t])[0]
      for tokens, answers in zip(batch["tokens"], batch["answer_mask"])
      for t in np.flatnonzero(answers)
  }
  assert len(distances) > 20


def test_needles_are_recalled_from_their_one_occurrence():
  cfg = SYNTHETIC["needles"]
  n, vocab = cfg.task_pairs, cfg.task_vocab
  width = cfg.seq_len + 1 - 2 * n  # The context before the recalls.
  batch = _take(cfg, 1, batch_size=16)[0]
  assert data.vocab_size(cfg) == vocab
  for tokens, targets, answers, loss in zip(
      batch["tokens"], batch["targets"], batch["answer_mask"], batch["loss_mask"]
  ):
    full = np.append(tokens, targets[-1])
    context = full[:width]
    where = {k: np.flatnonzero(context == k) for k in range(n)}
    assert all(len(w) == 1 for w in where.values())  # Each key once in the context,
    assert all(where[k][0] + 1 < width and context[where[k][0] + 1] >= n for k in range(n))
    assert ((context >= 0) & (context < vocab)).all()
    queried = np.flatnonzero(answers)
    np.testing.assert_array_equal(queried, np.arange(width, cfg.seq_len, 2))
    assert sorted(tokens[queried]) == list(range(n))  # every key recalled once,
    for t in queried:  # its answer the token after its one occurrence.
      assert targets[t] == context[where[tokens[t]][0] + 1]
    np.testing.assert_array_equal(loss, answers)


def test_needles_need_room_for_their_keys():
  rng = np.random.default_rng(0)
  for pairs, vocab, seq_len in ((4, 4, 31), (4, 12, 14), (0, 12, 31)):
    with pytest.raises(ValueError, match="needles need"):
      synthetic.needles(rng, seq_len=seq_len, task_vocab=vocab, task_pairs=pairs)
  synthetic.needles(rng, seq_len=15, task_vocab=5, task_pairs=4)  # The least that fits.


def test_mqar_answers_are_the_paired_values():
  cfg = SYNTHETIC["mqar"]
  n, vocab = cfg.task_pairs, cfg.task_vocab
  batch = _take(cfg, 1, batch_size=8)[0]
  assert data.vocab_size(cfg) == vocab + 1
  for tokens, targets, answers, loss in zip(
      batch["tokens"], batch["targets"], batch["answer_mask"], batch["loss_mask"]
  ):
    keys, values = tokens[: 2 * n : 2], tokens[1 : 2 * n : 2]
    assert len(set(keys)) == n and (keys < vocab // 2).all()
    assert ((values >= vocab // 2) & (values < vocab)).all()
    pairs = dict(zip(keys, values))
    assert sorted(tokens[2 * n : 4 * n : 2]) == sorted(keys)  # Every key is queried once.
    queried = np.flatnonzero(answers)
    assert len(queried) == n
    assert [targets[t] for t in queried] == [pairs[tokens[t]] for t in queried]
    assert (tokens[4 * n :] == vocab).all()  # Padding, with no loss.
    np.testing.assert_array_equal(loss, answers)


def test_char_vocabulary_of_tinyshakespeare_is_65(shakespeare):
  assert data.vocab_size(shakespeare) == 65
  assert data.vocab_size(dataclasses.replace(shakespeare, tokenizer="byte")) == 256


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_text_windows_are_the_file_split_into_train_and_val(shakespeare, tokenizer):
  cfg = dataclasses.replace(shakespeare, tokenizer=tokenizer)
  text = SHAKESPEARE.read_text(encoding="utf-8")  # ASCII: one token per character.
  boundary = int(len(text) * (1 - cfg.val_fraction))
  decode = data.load_tokenizer(cfg).decode
  for split, region in (("train", text[:boundary]), ("val", text[boundary:])):
    batch = _take(cfg, 1, split=split, batch_size=8)[0]
    np.testing.assert_array_equal(batch["loss_mask"], 1)
    np.testing.assert_array_equal(batch["answer_mask"], 0)
    np.testing.assert_array_equal(batch["segment_ids"], 0)
    for tokens, targets in zip(batch["tokens"], batch["targets"]):
      window = decode(tokens) + decode(targets[-1:])
      assert window in region, (split, window)
      assert decode(targets) == window[1:]


def test_token_windows_lie_in_their_split(positions):
  boundary = int(1000 * (1 - positions.val_fraction))
  train = np.concatenate([b["tokens"] for b in _take(positions, 50, batch_size=8)])
  val = np.concatenate([b["tokens"] for b in _take(positions, 50, split="val", batch_size=8)])
  for windows in (train, val):
    np.testing.assert_array_equal(windows[:, 1:] - windows[:, :-1], 1)
  assert train.min() >= 0 and train.max() + 1 < boundary  # The target stays in train too.
  assert val.min() >= boundary and val.max() + 1 < 1000
  assert len(np.unique(train[:, 0])) > 100  # Shuffled starts at every offset.
  assert data.vocab_size(positions) == 1000


def test_training_reads_every_window_once_per_epoch_in_a_new_order(tmp_path):
  cfg = _token_file(tmp_path / "small.bin", np.arange(100), seq_len=8, val_fraction=0.2)
  starts = np.concatenate([b["tokens"][:, 0] for b in _take(cfg, 18, batch_size=8)])
  first, second = starts[:72], starts[72:]  # 80 training tokens hold 72 windows of 9.
  np.testing.assert_array_equal(np.sort(first), np.arange(72))
  np.testing.assert_array_equal(np.sort(second), np.arange(72))
  assert not np.array_equal(first, second)


def test_finite_val_pass_scores_every_target_once_on_every_process(positions):
  boundary = int(1000 * (1 - positions.val_fraction))
  batches = [
      list(
          data.make_iterator(
              positions,
              split="val",
              batch_size=4,
              seed=0,
              process_index=p,
              process_count=2,
              repeat=False,
          )
      )
      for p in range(2)
  ]
  assert len(batches[0]) == len(batches[1]) > 0
  scored = np.concatenate([b["targets"][b["loss_mask"] == 1] for share in batches for b in share])
  count = (1000 - boundary - 1) // positions.seq_len
  np.testing.assert_array_equal(
      np.sort(scored), np.arange(boundary + 1, boundary + 1 + count * positions.seq_len)
  )
  # A finite validation pass reads the file in order, whatever the seed.
  again = data.make_iterator(
      positions, split="val", batch_size=4, seed=9, process_index=1, process_count=2, repeat=False
  )
  assert _same(batches[1], list(again))


def test_eot_closes_its_document(tmp_path):
  eot = 99
  ids = [1, 2, eot, 3, 4, 5, eot, eot, 6, 7, 8, 9]
  # 120 tokens: the first validation window is `ids` itself, at offset 60.
  cfg = _token_file(
      tmp_path / "docs.bin", ids * 10, eot_id=eot, seq_len=len(ids) - 1, val_fraction=0.5
  )
  batch = next(data.make_iterator(cfg, split="val", batch_size=1, seed=0, repeat=False))
  np.testing.assert_array_equal(batch["tokens"][0], ids[:-1])
  np.testing.assert_array_equal(batch["segment_ids"][0], [0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3])
  # No loss on predicting the first token of the next document from an eot.
  np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(batch["answer_mask"], 0)


def test_uint32_token_files(tmp_path):
  cfg = _token_file(tmp_path / "big.bin", np.arange(70_000, 70_100), "uint32", seq_len=8)
  assert data.vocab_size(cfg) == 70_100
  batch = _take(cfg, 1)[0]
  assert batch["tokens"].min() >= 70_000
  np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)


def test_hf_tokenizer(tmp_path):
  hf = pytest.importorskip("tokenizers")
  text = "the cat sat on the mat. the dog sat on the log. " * 20
  tokenizer = hf.Tokenizer(hf.models.WordLevel(unk_token="[UNK]"))
  tokenizer.pre_tokenizer = hf.pre_tokenizers.Whitespace()
  tokenizer.train_from_iterator([text], hf.trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "text.txt").write_text(text)
  cfg = DataConfig(
      source="text",
      path=str(tmp_path / "text.txt"),
      tokenizer="hf",
      tokenizer_path=str(tmp_path / "tokenizer.json"),
      seq_len=8,
  )
  assert data.vocab_size(cfg) == tokenizer.get_vocab_size() == 9
  batch = _take(cfg, 1)[0]
  np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
  tokenizer = data.load_tokenizer(cfg)
  assert tokenizer.decode(tokenizer.encode("the cat sat")) == "the cat sat"
  as_text = lambda ids: " " + " ".join(map(str, ids)) + " "
  assert as_text(batch["tokens"][0]) in as_text(tokenizer.encode(text))
  (tmp_path / "run").mkdir()
  saved = tokenizers.load(tokenizers.save(tokenizer, tmp_path / "run").parent)
  assert saved.encode("the dog").tolist() == tokenizer.encode("the dog").tolist()


def test_char_and_byte_tokenizers_round_trip():
  char = tokenizers.CharTokenizer.from_text("héllo wörld")
  assert char.vocab_size == 9 and char.decode(char.encode("wöll")) == "wöll"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    char.encode("xyz")
  byte = tokenizers.ByteTokenizer()
  assert byte.encode("é").tolist() == [195, 169] and byte.decode(byte.encode("wörld")) == "wörld"
  assert char.decode([0, 99]) == " \ufffd"  # An id past the text's characters (padded vocab).


def test_tokenizers_are_kept_with_a_run(tmp_path):
  assert tokenizers.load(tmp_path) is None  # A run on token ids has none.
  for tokenizer in (tokenizers.CharTokenizer.from_text("héllo"), tokenizers.ByteTokenizer()):
    tokenizers.save(tokenizer, tmp_path)
    assert tokenizers.load(tmp_path) == tokenizer
  (tmp_path / tokenizers.TOKENIZER_FILE).write_text('{"kind": "words"}')
  with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer: unknown kind 'words'"):
    tokenizers.load(tmp_path)


# Each case: DataConfig fields ({tmp} is the test's directory), and what the error must say.
ERRORS = {
    "missing file": (
        dict(source="text", tokenizer="char", path="{tmp}/nope.txt"),
        "{tmp}/nope.txt does not exist",
    ),
    "empty text": (
        dict(source="text", tokenizer="char", path="{tmp}/empty.txt"),
        "{tmp}/empty.txt is empty",
    ),
    "empty tokens": (dict(source="tokens", path="{tmp}/empty.txt"), "{tmp}/empty.txt is empty"),
    "shorter than a window": (
        dict(source="tokens", path="{tmp}/short.bin", seq_len=20),
        "{tmp}/short.bin has 10 tokens, fewer than one window of seq_len \\+ 1 = 21",
    ),
    "val shorter than a window": (
        dict(source="tokens", path="{tmp}/short.bin", seq_len=6),
        "the val split of {tmp}/short.bin .* has 1 tokens, fewer than one window of seq_len \\+ 1",
    ),
    "hf without tokenizer_path": (
        dict(source="text", tokenizer="hf", path="{tmp}/text.txt"),
        "'hf' needs data.tokenizer_path, a tokenizer JSON \\({tmp}/text.txt\\)",
    ),
    "hf tokenizer missing": (
        dict(source="text", tokenizer="hf", path="{tmp}/text.txt", tokenizer_path="{tmp}/no.json"),
        "{tmp}/no.json does not exist",
    ),
    "eot_id beyond token_dtype": (
        dict(source="tokens", path="{tmp}/short.bin", eot_id=70_000),
        "eot_id 70000 is not a uint16 token id \\({tmp}/short.bin\\)",
    ),
    "ragged token file": (
        dict(source="tokens", path="{tmp}/ragged.bin", token_dtype="uint32"),
        "{tmp}/ragged.bin has 22 bytes, not a whole number of uint32 ids",
    ),
    "tokens with a tokenizer": (
        dict(source="tokens", tokenizer="char", path="{tmp}/short.bin"),
        "already tokenised \\({tmp}/short.bin\\): set data.tokenizer='none'",
    ),
    "text without a tokenizer": (
        dict(source="text", path="{tmp}/text.txt"),
        "'text' \\({tmp}/text.txt\\) needs data.tokenizer",
    ),
    "needles longer than seq_len": (
        dict(source="synthetic_needles", seq_len=8, task_pairs=4),
        "synthetic_needles needs 1 <= task_pairs < task_vocab .* got task_pairs 4, task_vocab 64,"
        " seq_len 8",
    ),
    "mqar longer than seq_len": (
        dict(source="synthetic_mqar", seq_len=8, task_pairs=4),
        "4 pairs needs seq_len >= 15",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_the_problem_and_the_file(case, tmp_path):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "text.txt").write_text("some text " * 10)
  np.arange(10, dtype=np.uint16).tofile(tmp_path / "short.bin")
  np.arange(11, dtype=np.uint16).tofile(tmp_path / "ragged.bin")
  fields, message = ERRORS[case]
  fill = lambda v: v.format(tmp=tmp_path) if isinstance(v, str) else v
  cfg = DataConfig(**{k: fill(v) for k, v in fields.items()})
  with pytest.raises(data.DataError, match=fill(message)):
    data.make_iterator(cfg, split="val", batch_size=2, seed=0)
