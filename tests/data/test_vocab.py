import hashlib
import pickle

from vlm_jax.data import vocab
from vlm_jax.data.synthetic import tokenizer as tokenizer_train


def test_special_ids_and_tokens():
  v = vocab.Vocab()
  assert v.vocab_size == tokenizer_train.VOCAB_SIZE
  assert (v.pad_id, v.eos_id, v.unk_id, v.bos_id) == (0, 1, 2, 3) and v.start_ids == [3]
  assert [v.token_id(p) for p in ("<pad>", "</s>", "<unk>", "<s>")] == [0, 1, 2, 3]
  ids = [v.token_id(t) for t in vocab.SPECIAL_TOKENS]
  assert ids == list(range(4, 4 + len(vocab.SPECIAL_TOKENS)))
  assert v.token_id("<reserved_0>") == 4 + len(vocab.SPECIAL_TOKENS)


def test_encode_decode_roundtrip():
  v = vocab.Vocab()
  text = "two red circles on the left and a blue square at the top"
  ids = v.encode(text)
  assert len(ids) == len(text.split())  # grammar words are single pieces
  assert v.decode(ids + [vocab.EOS_ID, 50, 60]) == text
  assert v.decode([vocab.BOS_ID] + v.encode("zebra ünïcode")) == "zebra ünïcode"  # byte fallback
  assert pickle.loads(pickle.dumps(v)).encode(text) == ids


def test_shipped_model_is_reproducible(tmp_path):
  path = tokenizer_train.train(str(tmp_path / "sample"))
  digest = lambda p: hashlib.md5(open(p, "rb").read()).hexdigest()
  assert digest(path) == digest(vocab.SAMPLE_MODEL)
