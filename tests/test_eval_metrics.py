"""Metrics against values worked out by hand (the arithmetic is written out beside each)."""
import math

import pytest

from vlm_jax.data.boxes import percent, permille
from vlm_jax.evaluation import captions, grounding, vqa

LOG2 = math.log(2)


def test_cider_by_hand():
  # Two images with one reference each: df(a)=2, df(cat)=df(dog)=df(a cat)=df(a dog)=1,
  # idf = log(2) - log(df): 'a' weighs 0, the others log 2.
  refs = [["a cat"], ["a dog"]]
  # Perfect candidates: n=1 and n=2 similarities are 1, n=3, 4 have no n-grams (0):
  # 10 * (1 + 1 + 0 + 0) / 4 = 5 per image.
  assert captions.cider_scores(["a cat", "a dog"], refs) == pytest.approx([5.0, 5.0])
  # 'a dog' for the cat: the only weighted n-grams (dog, a dog) are not in the reference.
  assert captions.cider(["a dog", "a dog"], refs) == pytest.approx((0 + 5) / 2)
  # 'a cat cat': n=1 vector (a:0, cat:2 log2), |c| = 2 log2; reference (cat: log2):
  #   min(2 log2, log2) * log2 / (2 log2 * log2) = 1/2.
  # n=2: (a cat: log2, cat cat: log2 [df 0 -> log max(1, 0) = 0]), |c| = sqrt(2) log2:
  #   log2 * log2 / (sqrt(2) log2 * log2) = 1/sqrt(2). n=3: the reference has none: 0.
  # Bigram lengths 2 vs 1: penalty exp(-1 / 72).
  expected = 10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
  assert captions.cider_scores(["a cat cat", "a dog"], refs)[0] == pytest.approx(expected)
  # Several references: the mean of the per-reference similarities; punctuation and case
  # do not matter. Image 0 references 'a cat' (sim 1, 1 -> 5) and 'a cat' again.
  assert captions.cider_scores(["A cat.", "a dog"], [["a cat", "a cat"], ["a dog"]])[0] == \
      pytest.approx(5.0)
  # One image only: every idf is log(1) - log(1) = 0.
  assert captions.cider(["a cat"], [["a cat"]]) == 0.0


def test_bleu_by_hand():
  # 'the cat sat on the mat' vs 'the cat is on the mat': unigrams 5/6, bigrams 3/5
  # (the cat, on the, the mat), trigrams 1/4 (on the mat), 4-grams 0/3; same length: BP 1.
  b1, b2, b3, b4 = captions.bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
  assert b1 == pytest.approx(5 / 6)
  assert b2 == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
  assert b3 == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
  assert b4 == 0.0
  # Short candidate: precisions 1, brevity penalty exp(1 - 6/2).
  assert captions.bleu(["the cat"], [["the cat is on the mat"]], max_n=2)[1] == \
      pytest.approx(math.exp(-2))
  # Clipping and the closest reference length: 'the the the' vs refs of 3 and 5 words:
  # unigram precision min(3, 2)/3 with the closer (3-word) reference: BP 1.
  assert captions.bleu(["the the the"], [["the cat the", "a b c d e"]], max_n=1)[0] == \
      pytest.approx(2 / 3)


def test_exact_match():
  assert captions.exact_match(["A red square.", "a blue circle"],
                              [["a red square"], ["a green circle", "a circle"]]) == 0.5
  with pytest.raises(ValueError, match="references\\[0\\]"):
    captions.cider(["a"], ["a"])


def test_vqa_normalisation():
  assert vqa.normalize_answer("Two.") == "2"
  assert vqa.normalize_answer("the dog!") == "dog"
  assert vqa.normalize_answer(" dont\tknow ") == "don't know"
  assert vqa.normalize_answer("1,000") == "1000"
  assert vqa.normalize_answer("3.5") == "3.5"


def test_vqa_accuracy_by_hand():
  humans = ["yes"] * 2 + ["no"] * 8
  # 'yes': leaving out one of the 2 'yes' (2 subsets) leaves 1 match -> 1/3; leaving out a
  # 'no' (8 subsets) leaves 2 -> 2/3: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
  assert vqa.vqa_accuracy("yes", humans) == pytest.approx(0.6)
  assert vqa.vqa_accuracy("No", humans) == pytest.approx(1.0)  # >= 7 matches in every subset
  assert vqa.vqa_accuracy("maybe", humans) == 0.0
  # 3 matches: leaving out a match (3 subsets) -> 2/3, else 1: (3 * 2/3 + 7) / 10 = 0.9.
  three = ["two", "2", "2 "] + ["3"] * 7  # 'two' normalises to '2'
  assert vqa.vqa_accuracy("2", three) == pytest.approx(0.9)
  assert vqa.mean_vqa_accuracy(["yes", "maybe"], [humans, humans]) == pytest.approx(0.3)


def test_iou_by_hand_in_both_box_formats():
  assert grounding.iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
  assert grounding.iou((0, 0, 10, 10), (0, 0, 10, 20)) == pytest.approx(0.5)
  texts = ["<p>cat</p>{<0><0><10><10>}", "the box {<5><5><15><15>} here", "no box",
           "{<0><0><10><101>}"]  # out of range: not a box
  truths = [(0, 0, 10, 20), (0, 0, 10, 10), (0, 0, 1, 1), (0, 0, 10, 10)]
  # IoUs 0.5 (hit at >= 0.5), 1/7, none, none.
  assert grounding.iou_accuracy(texts, truths, percent) == pytest.approx(0.25)
  texts = ["It is at [[000,000,100,100]].", "[[050,050,150,150];[000,000,001,001]]", "[[1,2,3,4]]"]
  truths = [(0, 0, 100, 200), (50, 50, 150, 150), (1, 2, 3, 4)]
  # IoUs 0.5, 1 (first box), malformed (digits must be 3): 2/3.
  assert grounding.iou_accuracy(texts, truths, permille) == pytest.approx(2 / 3)
