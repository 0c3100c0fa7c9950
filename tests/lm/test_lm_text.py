"""Text sources, packing into BOS-first contexts, and the harvest mask."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from jumprelu.lm import text

BOS, EOS, PAD = 1, 2, 0


def word_tokenizer():
  """A word-level tokenizer with ids 3.. for words, so packed contexts are easy to read."""
  words = "the cat sat on mat a dog ran far away".split()
  vocab = {"[UNK]": 0, "<bos>": BOS, "<eos>": EOS, **{w: i + 3 for i, w in enumerate(words)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return tok


def test_stdlib_docstrings_are_deterministic_english():
  docs = list(text.stdlib_docstrings())
  assert len(docs) > 1000 and sum(map(len, docs)) > 500_000
  assert len(set(docs)) == len(docs)
  assert all(len(d) >= 100 for d in docs)
  joined = " ".join(docs[:200]).lower()
  for word in (" the ", " and ", " return ", " of "):
    assert word in joined
  # Each call collects in a fresh interpreter, untouched by what this process imported.
  assert list(text.stdlib_docstrings()) == docs


def test_pack_makes_bos_first_fixed_contexts():
  docs = ["the cat sat on the mat", "a dog ran far away", "the dog sat"]
  contexts = list(text.pack(docs, word_tokenizer(), context_len=5, bos_id=BOS, eos_id=EOS,
                            batch_docs=2))
  # 6 + 1 + 5 + 1 + 3 + 1 = 17 tokens make four contexts of 4; the last token is dropped.
  assert len(contexts) == 4
  for c in contexts:
    assert c.dtype == np.int32 and c.shape == (5,) and c[0] == BOS
  stream = np.concatenate([c[1:] for c in contexts])
  the, cat, sat, on, mat, a, dog, ran, far, away = range(3, 13)
  np.testing.assert_array_equal(
      stream, [the, cat, sat, on, the, mat, EOS, a, dog, ran, far, away, EOS, the, dog, sat])


def test_harvest_mask_drops_special_tokens():
  tokens_BxL = np.array([[BOS, 5, 6, EOS, 7], [BOS, 8, EOS, PAD, PAD]])
  want = np.array([[0, 1, 1, 0, 1], [0, 1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(text.harvest_mask(tokens_BxL, BOS, EOS, PAD), want)
  # Jax arrays work too (e.g. inside a jitted step), and a missing pad id is skipped.
  mask = text.harvest_mask(jnp.asarray(tokens_BxL), BOS, EOS, None)
  np.testing.assert_array_equal(mask, (tokens_BxL != BOS) & (tokens_BxL != EOS))


def test_local_files(tmp_path):
  (tmp_path / "b.txt").write_text("second file")
  (tmp_path / "a.txt").write_text("first file\nwith two lines")
  with open(tmp_path / "c.jsonl", "w") as f:
    for t in ["line one", "line two"]:
      f.write(json.dumps({"body": t, "id": 0}) + "\n")
  assert list(text.local_files(str(tmp_path / "*.txt"))) == [
      "first file\nwith two lines", "second file"]
  assert list(text.local_files(str(tmp_path / "*.jsonl"), field="body")) == ["line one", "line two"]
  with pytest.raises(KeyError, match="no field 'text'; its fields are \\['body', 'id'\\]"):
    list(text.local_files(str(tmp_path / "*.jsonl")))
  with pytest.raises(FileNotFoundError):
    list(text.local_files(str(tmp_path / "*.parquet")))


def test_hf_dataset_on_a_local_json_file(tmp_path):
  pytest.importorskip("datasets")
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
  for streaming in (True, False):
    docs = list(text.hf_dataset("json", split="train", field="text", streaming=streaming,
                                data_files=str(path)))
    assert docs == [f"document {i}" for i in range(5)]
