"""Released models' tokenizers (vlm_jax.data.vocab): our benchmark prompts, tokenized by
`Vocab` from a release's own tokenizer files, have the ids that transformers' tokenizer gives
for the reference code's prompt string on the same files.

  OpenFlamingo (MPT / RedPajama): a GPT-NeoX-style byte-level BPE tokenizer.json with
      `<|endofchunk|>`, `<image>` and `<PAD>` added as open_flamingo adds them; no BOS.
  MiniGPT-v2 (LLaMA-2): a SentencePiece model with unk/bos/eos 0/1/2 and no pad.
  Prismer (RoBERTa): a byte-level BPE vocab.json + merges.txt with <s> <pad> </s> <unk> = 0-3
      and <mask> last, as roberta-base's; Prismer reads it with RobertaTokenizer.
"""
import io
import json

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
import transformers

from test_family_benchmarks import _image, _prompt_ids
from vlm_jax import config as config_lib
from vlm_jax.cli import convert as convert_cli
from vlm_jax.data.families import flamingo as flamingo_data
from vlm_jax.data.families import minigpt_v2 as minigpt_data
from vlm_jax.data.vocab import Vocab
from vlm_jax.train import run_vocab

CORPUS = ["Question: What color is the cat? Short answer: black",
          "How many dogs are on the mat? Two dogs, one cat.",
          "A photo of a red bus on a street. Based on the image, respond to this question.",
          "give me the location of the white horse [vqa] [refer] <Img> </Img> [INST] [/INST]"]


def write_gpt_neox_tokenizer(directory) -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE tokenizer as GPT-NeoX's (bos = eos = unk = <|endoftext|>), with
  open_flamingo's additions (its factory.py: additional special tokens <|endofchunk|> and
  <image>, then pad <PAD>), saved by transformers into `directory`."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(CORPUS * 4, tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>", "<|padding|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
      unk_token="<|endoftext|>")
  tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
  tokenizer.add_special_tokens({"pad_token": "<PAD>"})
  tokenizer.save_pretrained(str(directory))
  return tokenizer


def write_llama_sentencepiece(directory) -> None:
  """A tiny LLaMA-style SentencePiece model (unk/bos/eos 0/1/2, no pad, byte fallback) as
  tokenizer.model, with LLaMA-2's tokenizer_config.json (BOS added, no EOS)."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 4), model_writer=model, model_type="bpe",
      vocab_size=330, hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
  (directory / "tokenizer.model").write_bytes(model.getvalue())
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
      "unk_token": "<unk>", "pad_token": None, "legacy": True,
      "tokenizer_class": "LlamaTokenizer"}))


def write_roberta_files(directory) -> None:
  """vocab.json + merges.txt of a tiny byte-level BPE with RoBERTa's special ids."""
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(CORPUS * 4, vocab_size=300, show_progress=False,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
  bpe.save_model(str(directory))
  vocab = json.loads((directory / "vocab.json").read_text())
  (directory / "vocab.json").write_text(json.dumps({**vocab, "<mask>": len(vocab)}))


def test_prismer_s_roberta_tokenizer_gives_the_ids_of_transformers(tmp_path):
  """Prismer's `RobertaTokenizer.from_pretrained` on the files, saved with save_pretrained as
  docs/weights.md tells, read by Vocab: the same ids, specials and decoded text."""
  write_roberta_files(tmp_path)
  reference = transformers.RobertaTokenizer.from_pretrained(str(tmp_path))
  reference.save_pretrained(str(tmp_path / "saved"))
  vocab = Vocab(str(tmp_path / "saved"))
  assert (vocab.bos_id, vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3) == (
      reference.bos_token_id, reference.pad_token_id, reference.eos_token_id,
      reference.unk_token_id)
  assert vocab.start_ids == [0] and vocab.vocab_size == len(reference) == 301
  for text in ["A photo of a red bus on a street.", " two  dogs,one cat!? (really)",
               "café naïve 日本語 🙂 — 42%", "Question: what is it? Answer: <mask> ok"]:
    ids = reference(text)["input_ids"]  # <s> text </s>, as Prismer tokenizes a caption
    assert vocab.start_ids + vocab.encode(text) + [vocab.eos_id] == ids, text
    # decoding stops at </s> and drops <s> / <pad>, as skip_special_tokens does
    assert vocab.decode(ids + [vocab.pad_id] * 2) == reference.decode(
        ids, skip_special_tokens=True) == text.replace("<mask>", ""), text


def test_flamingo_few_shot_vqa_prompt_has_the_ids_of_open_flamingo_s_tokenizer(tmp_path):
  reference = write_gpt_neox_tokenizer(tmp_path)
  vocab = Vocab(str(tmp_path))
  eos = reference.convert_tokens_to_ids("<|endoftext|>")
  assert (vocab.eos_id, vocab.bos_id, vocab.unk_id) == (eos, eos, eos)
  assert vocab.pad_id == reference.pad_token_id and vocab.start_ids == []  # no BOS (NeoX)
  assert vocab.vocab_size == len(reference)
  assert Vocab(str(tmp_path / "tokenizer.json")).pad_id == vocab.pad_id  # the file: same
  config = config_lib.load_config("configs/flamingo.py:tiny")
  shots = [("How many dogs?", "two"), ("What animal is it?", "cat")]
  example, stop = flamingo_data.benchmark_example(
      "vqa", _image(), "What color is it?", config.data, vocab,
      shots=[(_image(), q, a) for q, a in shots])
  # open_flamingo eval: "".join(get_vqa_prompt(q, a) + "\n" for demos) + get_vqa_prompt(q)
  text = "".join(f"<image>Question:{q} Short answer:{a}<|endofchunk|>\n" for q, a in shots)
  text += "<image>Question:What color is it? Short answer:"
  want = reference(text)["input_ids"]
  assert _prompt_ids(example) == want
  assert stop == reference.convert_tokens_to_ids("<|endofchunk|>")
  image_id = reference.convert_tokens_to_ids("<image>")
  assert example["image_positions"][:3].tolist() == [
      i for i, t in enumerate(want) if t == image_id]
  # A generated answer decodes as transformers decodes it, up to the stop token.
  answer = reference(" black and white", add_special_tokens=False)["input_ids"]
  assert vocab.decode(answer + [eos] + answer) == " black and white"


def test_minigpt_v2_vqa_prompt_has_the_ids_of_llama_s_tokenizer(tmp_path):
  write_llama_sentencepiece(tmp_path)
  vocab = Vocab(str(tmp_path / "tokenizer.model"))
  assert (vocab.unk_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2)
  assert vocab.pad_id == 2 and vocab.start_ids == [1]  # no pad: padded with eos (masked)
  assert Vocab(str(tmp_path)).encode("a red bus") == vocab.encode("a red bus")  # directory
  reference = transformers.LlamaTokenizer.from_pretrained(str(tmp_path))
  config = config_lib.load_config("configs/minigpt_v2.py:tiny")
  example, stop = minigpt_data.benchmark_example("vqa", _image(), "What color is the cat?",
                                                 config.data, vocab)
  # MiniGPT-v2 (minigpt_base.get_context_emb): the prompt split at <ImageHere>, BOS only on
  # the first segment.
  instruction = minigpt_data.benchmark_prompt("vqa", "What color is the cat?")
  first = reference("[INST] <Img>")["input_ids"]
  second = reference(f"</Img> {instruction} [/INST]", add_special_tokens=False)["input_ids"]
  slots = config.data.image_tokens
  ids = _prompt_ids(example)
  assert ids[:len(first)] == first and first[0] == 1
  assert ids[len(first) + slots:] == second
  assert example["image_positions"].tolist() == [len(first)]
  assert stop == 2
  answer = reference("black", add_special_tokens=False)["input_ids"]
  assert vocab.decode(answer + [2] + answer) == "black"  # decoding stops at eos 2
  assert vocab.decode(np.array([1] + answer)) == reference.decode(answer)


def test_a_run_s_recorded_tokenizer_is_used_and_checked_against_the_model(tmp_path):
  write_gpt_neox_tokenizer(tmp_path / "release")
  run_vocab.record(str(tmp_path / "run"), str(tmp_path / "release"))
  ids = Vocab(str(tmp_path / "release"))
  config = config_lib.load_config("configs/flamingo.py:tiny")
  config.model.new_token_ids = (ids.token_id("<image>"), ids.token_id("<|endofchunk|>"))
  config, vocab = run_vocab.resolve(config, str(tmp_path / "run"))
  assert config.data.vocab_path == str(tmp_path / "run" / "tokenizer")
  assert vocab.encode("Short answer:") == ids.encode("Short answer:")
  config.model.new_token_ids = (4, 5)  # the shipped vocabulary's rows
  with pytest.raises(ValueError, match=r"new_token_ids=\(4, 5\), but <image> and "):
    run_vocab.resolve(config, str(tmp_path / "run"))
  config.model.lm.vocab_size = 100
  with pytest.raises(ValueError, match="more than config.model.lm.vocab_size=100"):
    run_vocab.resolve(config, str(tmp_path / "run"))
  minigpt = config_lib.load_config("configs/minigpt_v2.py:tiny")
  minigpt.data.vocab_path = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.data.vocab_path"):
    run_vocab.resolve(minigpt, str(tmp_path / "run"))


def test_vlm_convert_checks_the_tokenizer_before_importing(tmp_path, capsys):
  write_gpt_neox_tokenizer(tmp_path / "release")  # <image> is not the config's row 4
  with pytest.raises(SystemExit) as exit_info:
    convert_cli.main(["import", str(tmp_path / "checkpoint.pt"), "--layout", "openflamingo",
                      "--config", "configs/flamingo.py:oftiny", "--workdir",
                      str(tmp_path / "run"), "--tokenizer", str(tmp_path / "release")])
  assert exit_info.value.code == 2
  assert "--tokenizer: config.model.new_token_ids=(4, 5), but" in capsys.readouterr().err
